"""Each activation tensor's range, chosen by its effect on the layers that read it (--act-calibration auto).

The candidates are the single rules of ``activations.candidate_ranges``: min-max, the percentile
clips at ``PERCENTILES`` (and at --percentile), and the clip minimising the tensor's own MSE (over
``AUTO_VALUES`` of its sampled values). Each is scored by the relative error its fake quantization
causes at the outputs of the tensor's *scoring layers*:

    score = sum over layers c of ||(fq(X_c) - X_c) W_c||^2 / ||X_c W_c||^2

X_c (rows, N0) the rows layer c forms from the tensor (``Layer.rows``: im2col patches for Conv,
tokens for MatMul/Gemm), ``SCORE_ROWS`` per layer out of a seeded pool of ``SCORE_POOL`` over all
calibration batches, half of them those with the largest values (the clipping cost lives in the
tails, which a small uniform sample misses), half uniform over the rest, weighted to stay unbiased;
W_c (g, N0, N1g) its float weight (no layer reading a tensor is quantized before the
tensor's range is chosen), at most ``SCORE_COLUMNS`` seeded output columns of it per group. The
lowest score wins; ties go to the earlier candidate, min-max first. A clipping candidate that
clips none of the scored values is left out: the values it clips are missing from the sample, and
their cost would look nil. So is one that *destroys* a scored row: an output error larger than the
row's own output, ||(fq(x) - x) W||^2 > ROW_ERROR_LIMIT ||x W||^2 for some row x, where min-max
itself leaves every row's relative error below that worst one. A sum over rows
trades a few such rows for less rounding error on all the others, which suits a CNN's rare large
values, but a transformer's massive activations (a few tokens whose FFN output is 10-100x the rest,
which later layers and the attention rely on) are such rows: on all-MiniLM-L6-v2 the clips of two
GELU outputs gave rows an output error 2.7-5.5x their output and took the embeddings' mean cosine
to float from 0.994 (min-max everywhere) to 0.82.

Scoring layers: the quantized layers that read the tensor with an integer kernel (weight-only and
recurrent layers excepted), and those reached from it through elementwise ops: the score is then
||(f(fq(X)) - f(X)) W||^2 / ||f(X) W||^2, f the functions on the way, computed exactly (``UNARY``:
Relu, Clip, LeakyRelu, Sigmoid, Tanh, HardSigmoid, HardSwish, and Mul(x, Sigmoid(x)) = SiLU); through
``LINEAR`` ops (Add, Sub, Identity) the error passes unchanged, and the functions after an Add or Sub
are taken as the identity (their input's other share is not at hand). So a Conv output before SiLU
or a residual Add is scored at the next Conv. Where no layer is reached that way (a model output, a
tensor that goes on through Concat, pooling, Softmax, a Mul by another tensor, ...) the score falls
back to the tensor's own relative error ||fq(x) - x||^2 / ||x||^2 over those values, which makes auto
the mse rule there, with one exception: a tensor whose values a layer reads in float (a recurrent or
weight-only layer, whose input has no grid of its own) unchanged or through Add, Sub, Transpose,
Reshape, Squeeze, Unsqueeze, Flatten keeps min-max, its clip's cost being unmeasured where it acts: on
the ddddocr text recogniser the MSE clip of the residual sum that goes on into its LSTM took the output
SQNR from 26.7 to 22.2 dB (every unscored tensor at min-max instead costs det 0.5 dB and nudenet
1.2 dB).

One-sided clips: a scored tensor that only functions flat at one end read (``flat_sides``: the Conv
output before a SiLU, Sigmoid, Tanh, HardSwish, ...) then has that end of the best range clipped
further, to ``ONE_SIDED`` fractions of it, where the score says so (rule e.g. ``mse+low:0.3``). A
Conv output before SiLU spans [-20, 25] on a YOLOX stem where SiLU maps everything under -6 to
about 0: clipping there took det's W8A8 output SQNR from 28.8 to 29.8 dB (data seed 1: 29.4 to 30.0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from .activations import candidate_ranges, value_sample
from .graph import GraphIndex
from .ops import Layer
from .report import ActivationReport
from .rewrite import ActQuant, act_quant_from_range, fake_quant

PERCENTILES = (99.9, 99.99, 99.999)
SCORE_ROWS = 256  # rows scored per scoring layer and tensor (``_rows``)
SCORE_POOL = 4096  # rows they are chosen from (a seeded sample over all batches)
SCORE_COLUMNS = 128  # output columns of W per group (a seeded subset beyond it): bounds the cost of wide layers
ROW_ERROR_LIMIT = 1.0  # a clip may not give any scored row an output error beyond its own output (see above)
AUTO_VALUES = 1 << 14  # values (an even stride through the sample) for auto's mse candidate and own-error scores
LINEAR = ("Add", "Sub", "Identity", "Dropout")  # the error passes unchanged (Add/Sub: the other input's share cancels)
CARRY = LINEAR + ("Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")  # values carried on unchanged
UNARY = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish")  # computed exactly
# functions flat on one side (below / above some point the input barely moves the output): a tensor that only
# such functions read may be clipped on that side alone (``flat_sides``); SiLU is Mul(x, Sigmoid(x))
FLAT_LOW = ("Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "SiLU")
FLAT_HIGH = ("Sigmoid", "Tanh", "HardSigmoid")
ONE_SIDED = (0.5, 0.3, 0.2, 0.1, 0.0)  # the clipped end's fraction of the range's, for the one-sided candidates

Step = tuple  # (op_type, *constants): one elementwise function on the way to a scoring layer


@dataclass(frozen=True)
class Scorer:
    """One scoring layer of a tensor: the layer, its float weight W, (g, N0, n) float64, n =
    min(N1g, SCORE_COLUMNS) of its output columns (the first n of a seeded permutation), and the
    elementwise steps from the tensor to the layer's input (``apply_steps``)."""

    layer: Layer
    W: np.ndarray
    steps: tuple[Step, ...] = ()

    @classmethod
    def of(cls, layer: Layer, weight: np.ndarray, rng: np.random.Generator, steps: tuple[Step, ...] = ()) -> "Scorer":
        """From the layer's ONNX weight."""
        W = layer.to_matrix(np.asarray(weight, dtype=np.float64))
        if W.shape[2] > SCORE_COLUMNS:
            W = W[:, :, np.sort(rng.permutation(W.shape[2])[:SCORE_COLUMNS])]
        return cls(layer, np.ascontiguousarray(W), steps)


def apply_steps(steps: tuple[Step, ...], x: np.ndarray) -> np.ndarray:
    """The elementwise functions ``steps`` applied to x in turn (float64)."""
    for op, *k in steps:
        if op == "Relu":
            x = np.maximum(x, 0.0)
        elif op == "Clip":
            x = np.clip(x, k[0], k[1])
        elif op == "LeakyRelu":
            x = np.where(x >= 0, x, k[0] * x)
        elif op == "Sigmoid":
            x = 0.5 * (1.0 + np.tanh(0.5 * x))
        elif op == "Tanh":
            x = np.tanh(x)
        elif op == "HardSigmoid":
            x = np.clip(k[0] * x + k[1], 0.0, 1.0)
        elif op == "HardSwish":
            x = x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)
        elif op == "SiLU":
            x = x * 0.5 * (1.0 + np.tanh(0.5 * x))
    return x


def _step(node: onnx.NodeProto, name: str, index: GraphIndex) -> Step | None:
    """The elementwise function ``node`` applies to tensor ``name``, or None when it is none the
    scoring follows (Mul(x, Sigmoid(x)) is SiLU)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Mul" and len(node.input) == 2 and name in node.input:
        other = index.producer.get(node.input[1] if node.input[0] == name else node.input[0])
        if other is not None and other.op_type == "Sigmoid" and list(other.input) == [name]:
            return ("SiLU",)
        return None
    if node.op_type not in UNARY or node.input[0] != name:
        return None
    if node.op_type == "Clip":
        bounds = []
        for i, default in ((1, -np.inf), (2, np.inf)):
            b = node.input[i] if len(node.input) > i else ""
            if b and not index.is_constant(b):
                return None
            bounds.append(float(index.array(b)) if b else attrs.get(("min", "max")[i - 1], default))
        return ("Clip", *bounds)
    if node.op_type == "LeakyRelu":
        return ("LeakyRelu", float(attrs.get("alpha", 0.01)))
    if node.op_type == "HardSigmoid":
        return ("HardSigmoid", float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5)))
    return (node.op_type,)


def read_in_float(graph: onnx.GraphProto, targets: list[Layer], integer_input: set[str]) -> frozenset[str]:
    """The tensors whose values a layer reads in float (one not in ``integer_input``: recurrent and
    weight-only layers, whose input has no grid of its own) unchanged or through ``CARRY`` ops only."""
    index = GraphIndex(graph)
    found: set[str] = set()
    stack = [t.x for t in targets if t.node not in integer_input and t.x]
    while stack:
        name = stack.pop()
        if name in found or index.is_constant(name):
            continue
        found.add(name)
        node = index.producer.get(name)
        if node is not None and node.op_type in CARRY:
            stack.extend(i for i in (node.input if node.op_type in LINEAR else node.input[:1]) if i)
    return frozenset(found)


def flat_sides(index: GraphIndex, name: str) -> tuple[bool, bool]:
    """(low, high): every reader of ``name`` applies to it an elementwise function flat below (low) or
    above (high) some point (``FLAT_LOW`` / ``FLAT_HIGH``, a Clip with that bound), so that clipping that
    end alone costs little where it acts: the pre-activation Conv output before a SiLU, whose values
    under -6 all map to about 0 and may take half its range. Candidates clipping one end are then
    scored (``choose``) like every other."""
    readers = index.consumers.get(name, [])
    if not readers or name in index.graph_outputs:
        return False, False
    low = high = True
    for node in readers:
        step = _step(node, name, index)  # a SiLU's two readers: its Sigmoid, and the Mul (SiLU)
        if step is None:
            return False, False
        op = step[0]
        low = low and (op in FLAT_LOW or (op == "Clip" and np.isfinite(step[1])))
        high = high and (op in FLAT_HIGH or (op == "Clip" and np.isfinite(step[2])))
    return low, high


def scoring_layers(graph: onnx.GraphProto, targets: list[Layer], integer_input: set[str]
                   ) -> dict[str, list[tuple[Layer, tuple[Step, ...]]]]:
    """Tensor -> the layers its quantization error is scored at, each with the elementwise steps
    from the tensor to the layer's input (see the module docstring), for every tensor some layer is
    reached from. ``integer_input``: node names of the targets whose input is quantized (the layers
    the error reaches as the deployed graph computes it)."""
    index = GraphIndex(graph)
    readers: dict[str, list[Layer]] = {}
    for t in targets:
        if t.node in integer_input and t.OWN_OUTPUT is None and not t.extra_inputs:
            readers.setdefault(t.x, []).append(t)

    def reached(name: str, steps: tuple, linear: bool, seen: set[str]) -> list:
        if name in seen:
            return []
        seen.add(name)
        found = [(layer, steps) for layer in readers.get(name, [])]
        for node in index.consumers.get(name, []):
            if node.op_type in LINEAR and node.input and (node.op_type in ("Add", "Sub") or node.input[0] == name):
                more = reached(node.output[0], steps, linear or node.op_type in ("Add", "Sub"), seen)
            elif (step := _step(node, name, index)) is not None:  # after an Add: taken as the identity
                more = reached(node.output[0], steps if linear else steps + (step,), linear, seen)
            else:
                continue
            found += [f for f in more if f not in found]
        return found

    tensors = {name for node in graph.node for name in node.output} | {i.name for i in graph.input}
    return {name: found for name in sorted(tensors) if (found := reached(name, (), False, set()))}


def choose(name: str, values, method: str, bits: int, symmetric: bool, percentile: float, scorers: list[Scorer],
           rng: np.random.Generator, grids: Callable[[ActQuant], list[ActQuant]] | None = None,
           read_in_float: bool = False, flat: tuple[bool, bool] = (False, False)) -> tuple[ActQuant, ActivationReport]:
    """The quantization of tensor ``name`` (its values over all calibration batches, as the float
    stream holds them) under rule ``method`` ("auto" or a single rule), and its report row.

    grids: the admissible grids near a candidate's (``on_codes.grids``: those on which a hard sigmoid
    runs on the codes), scored in its place; a candidate with none is scored as it is.
    read_in_float: a layer reads the tensor's values in float (``read_in_float``); with no scorers
    auto then keeps min-max (no clip whose cost was not measured where it matters).
    flat: (low, high) of ``flat_sides``; with scorers, auto then clips that end of the best range
    further, to ``ONE_SIDED`` fractions of it (rules RULE+low:f, RULE+high:f), where that scores better."""
    # min-max needs the values only for the report's SQNR: a smaller sample, and rows without a pool
    sample = value_sample(values, rng, AUTO_VALUES) if method == "minmax" else value_sample(values, rng)
    lo, hi = float(sample.min()), float(sample.max())
    for v in values:  # the full range, not the sample's
        lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    levels = {"auto": tuple(sorted({*PERCENTILES, percentile})), "percentile": (percentile,)}.get(method, ())
    small = sample[::-(-sample.size // AUTO_VALUES)] if method == "auto" else sample
    ranges = candidate_ranges(sample, lo, hi, bits, symmetric, levels, small if method in ("auto", "mse") else None)
    rows = [_rows(s, values, rng, SCORE_POOL if method == "auto" else SCORE_ROWS) for s in scorers]
    rows = [(r, apply_steps(s.steps, r), w) for s, (r, w) in zip(scorers, rows)]
    if method == "auto" and (scorers or not read_in_float):
        cands = list(ranges.items())
    elif method == "auto":
        cands = [("minmax", ranges["minmax"])]
    else:
        cands = [next(((rule, r) for rule, r in ranges.items() if rule.split(":")[0] == method),
                      ("minmax", ranges["minmax"]))]  # a constant tensor
    scored = [r[0] for r in rows]
    seen_lo = min(float(x.min()) for x in scored) if scorers else float(small.min())
    seen_hi = max(float(x.max()) for x in scored) if scorers else float(small.max())
    minmax_worst = 0.0

    def better(cands: list, best: tuple | None) -> tuple:
        """The best of ``best`` and the candidates: (score, rule, (a, b), quant)."""
        nonlocal minmax_worst
        for rule, (a, b) in cands:
            if method == "auto" and rule != "minmax" and not (seen_lo < min(a, 0.0) or seen_hi > max(b, 0.0)):
                continue  # it clips only values the scored data lacks: its cost would look nil
            quant = act_quant_from_range(a, b, bits, symmetric)
            for quant in (grids(quant) if grids else None) or [quant]:
                score, worst_row = _score(quant, small, scorers, rows)
                if rule == "minmax":
                    minmax_worst = max(minmax_worst, worst_row)
                elif method == "auto" and worst_row > max(ROW_ERROR_LIMIT, minmax_worst):
                    continue  # it destroys some row's output (a massive activation clipped)
                if best is None or score < best[0]:
                    best = (score, rule, (a, b), quant)
        return best

    best = better(cands, None)
    if method == "auto" and scorers and not symmetric and any(flat):
        _, rule, (a, b), _ = best  # then the end only flat functions see, clipped further from the best range
        best = better([(f"{rule}+low:{f:g}", (f * a, b)) for f in ONE_SIDED if flat[0] and a < 0]
                      + [(f"{rule}+high:{f:g}", (a, f * b)) for f in ONE_SIDED if flat[1] and b > 0], best)
    _, rule, (a, b), quant = best
    err = float(np.sum((fake_quant(small, quant) - small) ** 2))
    own = _db(float(np.sum(small ** 2)), err)
    errors = [_layer_error(quant, s, r)[:2] for s, r in zip(scorers, rows)]
    layer_db = _db(sum(ref for _, ref in errors), sum(e for e, _ in errors)) if errors else None
    return quant, ActivationReport(name, bits, rule, a, b, own, layer_db, tuple(s.layer.node for s in scorers))


def _rows(scorer: Scorer, values, rng: np.random.Generator, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """The scored rows of the layer's X from the tensor, (g, rows, N0) float64, and each row's
    weight (rows,): from a seeded pool of at most ``pool`` rows over all batches (SCORE_POOL for
    auto), the SCORE_ROWS / 2 with the largest |x| (weight 1: where clipping costs, and a small
    uniform sample would miss them) and SCORE_ROWS / 2 drawn uniformly from the rest (weight: the rest's rows per row drawn),
    so that weighted sums estimate the pool's totals without bias."""
    t = scorer.layer
    shapes = values.shapes() if hasattr(values, "shapes") else [v.shape for v in values]
    samples = sum(t.samples(s) for s in shapes)
    per_sample = max(1, pool // max(samples, 1))
    parts = []
    for v, shape in zip(values, shapes):
        parts.append(np.asarray(t.rows(v, t.positions(shape, per_sample, rng)), dtype=np.float32))
    rows = np.concatenate(parts, axis=1)
    if rows.shape[1] > pool:
        rows = rows[:, np.sort(rng.choice(rows.shape[1], pool, replace=False))]
    n = rows.shape[1]
    if n <= SCORE_ROWS:
        return rows.astype(np.float64), np.ones(n)
    half = SCORE_ROWS // 2
    largest = np.maximum(rows.max(axis=0), -rows.min(axis=0)).max(axis=1)  # max |x| per row; = np.abs(rows).max(axis=(0, 2)),
    order = np.argsort(-largest, kind="stable")  # 8x faster on a depthwise Conv's (g, rows, 9)
    rest = np.sort(rng.choice(order[half:], half, replace=False))
    keep = np.concatenate([np.sort(order[:half]), rest])
    weights = np.concatenate([np.ones(half), np.full(half, (n - half) / half)])
    return rows[:, keep].astype(np.float64), weights


def on_codes_row(name: str, quant: ActQuant, source: ActQuant, source_values, values) -> ActivationReport:
    """The report row of a hard sigmoid computed on its input's codes (``on_codes``): the range its codes
    cover, and its SQNR against the float tensor on the first calibration batch."""
    x, h = (np.asarray(next(iter(v)), np.float64) for v in (source_values, values))
    scale = quant.scale / source.scale  # alpha
    beta = (source.zero_point - quant.zero_point) * quant.scale
    approx = np.clip(scale * fake_quant(x, source) + beta, 0.0, 1.0)
    lo, hi = ((c - quant.zero_point) * quant.scale for c in quant.clip)
    bits = np.iinfo(quant.dtype).bits
    return ActivationReport(name, bits, f"codes of {quant.codes_of}", lo, hi, _db(float(np.sum(h ** 2)),
                            float(np.sum((approx - h) ** 2))), None, ())


def _layer_error(quant: ActQuant, scorer: Scorer, rows: tuple[np.ndarray, np.ndarray]) -> tuple[float, float, float]:
    """(||(f(fq(X)) - f(X)) W||^2, ||f(X) W||^2) over the rows (weighted, ``_rows``), summed over
    the groups, f the scorer's steps, and the largest ratio of the two in one row (rows with an output).
    fq(0) = 0, so the error at the zero padding of im2col rows stays 0."""
    x, fx, weights = rows
    if x.shape[-1] != scorer.W.shape[1]:  # reached through a broadcasting Add: not this layer's rows
        return 0.0, 0.0, 0.0
    err = apply_steps(scorer.steps, fake_quant(x, quant)) - fx
    row_err = np.sum(np.matmul(err, scorer.W) ** 2, axis=(0, 2))  # per row, groups and columns summed
    row_ref = np.sum(np.matmul(fx, scorer.W) ** 2, axis=(0, 2))
    seen = row_ref > 0
    worst = float(np.max(row_err[seen] / row_ref[seen])) if seen.any() else 0.0
    return float(row_err @ weights), float(row_ref @ weights), worst


def _score(quant: ActQuant, sample: np.ndarray, scorers: list[Scorer], rows: list[tuple]) -> tuple[float, float]:
    """(sum of the scoring layers' relative output errors, or the tensor's own relative error; the
    largest relative output error of one scored row, 0 without scoring layers)."""
    total, counted, worst = 0.0, 0, 0.0
    for s, r in zip(scorers, rows):
        err, ref, row = _layer_error(quant, s, r)
        worst = max(worst, row)
        if ref > 0:
            total, counted = total + err / ref, counted + 1
    if counted:
        return total, worst
    return float(np.sum((fake_quant(sample, quant) - sample) ** 2)) / max(float(np.sum(sample ** 2)), 1e-300), worst


def _db(signal: float, noise: float) -> float:
    """10 log10(signal / noise); inf without noise."""
    if noise <= 0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, 1e-300) / noise))
