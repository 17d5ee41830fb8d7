"""SmoothQuant-style per-channel migration, before GPFQ: exact in float, easier to quantize.

An activation X (..., C) read by MatMul/Gemm layers is divided channel-wise by s (C,) in its
producer and the consumers' weight rows are multiplied by s, so every product X W is unchanged in
exact arithmetic while the outlier channels of X shrink. Producers handled:

- LayerNormalization over the last axis (constant scale gamma and bias beta): gamma / s, beta / s.
  Where the output also feeds other nodes (the residual Add of a transformer block), the smoothed
  LayerNormalization is a copy that only the MatMul/Gemm consumers read; the original stays.
- MatMul with a constant 2-D weight W1 (K, C), optionally followed by Add of a constant bias (C,):
  W1[:, j] / s_j, b_j / s_j (only where nothing else reads the product).

s_j = (max|X_j| / max_i max|W_ij|)^alpha over all consumers, alpha in SMOOTH_ALPHAS (0 = off),
chosen per tensor by the consumers' output error on the calibration data: the relative error
sum ||X W - fq(X / s) rtn(s W)||^2 / sum ||X W||^2, with fq the activation fake quantization
(min-max over all calibration data, the run's activation bits) and rtn round-to-nearest weights
at the layer's bits, one step per output column. The smoothed model then goes through the whole
pipeline, so GPFQ sees the smoothed X and X~. Every consumer of X takes the inverse scale (Q/K/V
projections sharing one LayerNormalization output), or the tensor is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from . import runtime
from .core import Alphabet
from .graph import GraphIndex, serialize
from .npyfile import as_array
from .ops import Layer, find_targets
from .options import Options
from .plan import plan_layer
from .rewrite import act_quant_from_range, fake_quant

SMOOTH_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
ROWS = 2048  # rows of X per tensor kept for the alpha search (seeded subsample over all batches)
SHAPE_ONLY = ("Shape", "Size")  # consumers that read no values: indifferent to the scaling


@dataclass(frozen=True)
class Group:
    """One activation tensor to smooth: its producer kind and the layers that read it."""

    x: str
    kind: str  # "LayerNormalization" | "MatMul" | "MatMul+Add"
    producer: str  # node name (the Add for MatMul+Add)
    consumers: tuple[Layer, ...]
    copy: bool  # other nodes read x too: the smoothed producer is a copy (LayerNormalization only)


@dataclass(frozen=True)
class Smoothed:
    """What the search chose for one tensor (for the report). Errors as in the module docstring."""

    tensor: str
    producer: str
    consumers: int
    alpha: float
    error_off: float
    error: float


def groups(model: onnx.ModelProto, targets: list[Layer]) -> list[Group]:
    """The tensors of the (normalised) graph that can be smoothed, in topological order.

    targets: the layers that will be quantized (exclusions already applied). Every target reading X
    must be a MatMul/Gemm with X as its untransposed left operand and a weight no other node reads;
    other readers (not quantized) are allowed after a LayerNormalization, which is then copied."""
    graph = model.graph
    index = GraphIndex(graph)
    by_node = {t.node: t for t in targets}
    nodes = {n.name: n for n in graph.node}
    weight_users: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            weight_users[i] = weight_users.get(i, 0) + 1
    found = []
    for node in graph.node:
        kind = _producer_kind(node, index, nodes)
        if kind is None:
            continue
        x = node.output[0]
        readers = [c for c in index.consumers.get(x, []) if c.op_type not in SHAPE_ONLY]
        layers = [by_node.get(c.name) for c in readers]
        ok = [t for t in layers if t is not None and _smoothable_consumer(t, x, nodes[t.node], weight_users)]
        if not ok or len(ok) < sum(t is not None for t in layers) or x in index.graph_outputs:
            continue  # a quantized reader that cannot take the inverse scale: all of them or none
        others = len(readers) - len(ok)  # float readers (a residual Add): they keep the original
        if others and kind != "LayerNormalization":
            continue
        found.append(Group(x, kind, node.name, tuple(ok), copy=bool(others)))
    return found


def _producer_kind(node: onnx.NodeProto, index: GraphIndex, nodes: dict) -> str | None:
    if node.op_type == "LayerNormalization":
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        gamma = node.input[1]
        beta = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if axis != -1 or len(node.output) != 1 or not index.is_constant(gamma) or (beta and not index.is_constant(beta)):
            return None
        if index.array(gamma).ndim != 1 or (beta and index.array(beta).shape != index.array(gamma).shape):
            return None
        return "LayerNormalization"
    if node.op_type == "MatMul" and _constant_2d(node.input[1], index) and _users(node.input[1], index) == 1:
        following = index.consumers.get(node.output[0], [])
        if len(following) == 1 and _bias_add(following[0], node.output[0], index) is not None:
            return None  # smoothed at the Add
        return "MatMul"
    if node.op_type == "Add":
        for i, name in enumerate(node.input):
            prod = index.producer.get(name)
            if prod is not None and prod.op_type == "MatMul" and _constant_2d(prod.input[1], index) \
                    and _users(prod.input[1], index) == 1 and _users(node.input[1 - i], index) == 1 and len(index.consumers.get(name, [])) == 1 and _bias_add(node, name, index) is not None:
                return "MatMul+Add"
    return None


def _users(name: str, index: GraphIndex) -> int:
    return len(index.consumers.get(name, []))


def _constant_2d(name: str, index: GraphIndex) -> bool:
    return index.is_constant(name) and len(index.initializers[name].dims) == 2


def _bias_add(add: onnx.NodeProto, product: str, index: GraphIndex) -> str | None:
    """The constant per-column bias (C,) that ``add`` adds to ``product``, or None."""
    if add.op_type != "Add" or len(add.input) != 2 or product not in add.input:
        return None
    other = add.input[1 - list(add.input).index(product)]
    return other if index.is_constant(other) and len(index.initializers[other].dims) == 1 else None


def _smoothable_consumer(t: Layer, x: str, node: onnx.NodeProto, weight_users: dict) -> bool:
    if t.x != x or t.op_type not in ("MatMul", "Gemm") or getattr(t, "trans_a", False):
        return False
    return node.input[0] == x and weight_users.get(t.w, 0) == 1


def smooth(model: onnx.ModelProto, batches: list[dict], options: Options) -> tuple[onnx.ModelProto, list[Smoothed]]:
    """The model with every smoothable tensor migrated at its chosen alpha (a new ModelProto when
    anything changed; ``model`` is not modified), and what was chosen per tensor.

    batches: the calibration batches ({input: array}), run once through the float model."""
    targets, _ = find_targets(model.graph)
    # excluded and weight-only layers (block-wise, MatMulNBits) read X in float: not smoothed for them
    targets = [t for t in targets if not options.is_excluded(t.node, t.op_type) and t.INT8_KERNEL
               and not plan_layer(t, options).weight_only]
    found = groups(model, targets)
    if not found or options.smooth == "off" or options.act_bits is None:
        return model, []
    data = serialize(model)
    if data is None:  # over 2 GiB: not run twice for this
        return model, []
    stats = _statistics(data, [g.x for g in found], batches, options)
    index = GraphIndex(model.graph)
    alphas = SMOOTH_ALPHAS if options.smooth == "auto" else (0.0, float(options.smooth))
    bits = 16 if options.act_bits == 16 else 8
    chosen, report = {}, []
    for g in found:
        lo, hi, amax, rows = stats[g.x]
        weights = [(t, t.to_matrix(index.array(t.w).astype(np.float64))[0]) for t in g.consumers]
        wmax = np.max([np.abs(w).max(axis=1) for _, w in weights], axis=0)
        errors = []
        for alpha in alphas:
            s = _scales(amax, wmax, alpha)
            errors.append(_error(rows, lo / s, hi / s, s, weights, bits, options))
        best = int(np.argmin(errors))  # ties: the smaller alpha (off first)
        report.append(Smoothed(g.x, g.kind, len(g.consumers), alphas[best], errors[0], errors[best]))
        if alphas[best] > 0:
            chosen[g.x] = (g, _scales(amax, wmax, alphas[best]))
    if not chosen:
        return model, report
    return _apply(model, chosen), report


def _scales(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """s (C,) = (max|X_j| / max|W_j.|)^alpha, 1 where either is zero (float64)."""
    ok = (amax > 0) & (wmax > 0)
    return np.where(ok, (np.where(ok, amax, 1.0) / np.where(ok, wmax, 1.0)) ** alpha, 1.0)


def _error(rows: np.ndarray, lo: np.ndarray, hi: np.ndarray, s: np.ndarray, weights, bits: int, options: Options) -> float:
    """Relative output error of the consumers with X / s fake-quantized and s W rounded to nearest."""
    quant = act_quant_from_range(float(lo.min()), float(hi.max()), bits, options.act_symmetric)
    xq = fake_quant(rows / s, quant)
    num = den = 0.0
    for t, w in weights:
        ws = w * s[:, None]
        levels = Alphabet.from_bits(options.layer(t.node, t.op_type).weight_bits, full_range=options.full_range).hi
        step = np.abs(ws).max(axis=0) / levels
        step = np.where(step > 0, step, 1.0)
        y = rows @ w
        num += float(np.sum((y - xq @ (np.round(ws / step) * step)) ** 2))
        den += float(np.sum(y ** 2))
    return num / den if den > 0 else 0.0


def _statistics(data: bytes, names: list[str], batches: list[dict], options: Options) -> dict:
    """Per tensor over all calibration batches: per-channel min, max, max|x| (C,) and a seeded
    subsample of at most ROWS rows (float64), from one float run of the model."""
    model = onnx.load_from_string(data)
    outputs = {o.name for o in model.graph.output}
    for name in names:
        if name not in outputs:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = runtime.session(model.SerializeToString(), options.threads, optimization="disable")
    lo, hi, rows = {}, {}, {n: [] for n in names}
    per_batch = -(-ROWS // len(batches))
    for b, batch in enumerate(batches):
        feed = {k: as_array(v) for k, v in batch.items()}  # a batch still in the user's file: read now
        for k, (name, v) in enumerate(zip(names, session.run(names, feed))):
            v = v.reshape(-1, v.shape[-1]).astype(np.float64)
            lo[name] = np.minimum(lo.get(name, np.inf), v.min(axis=0))
            hi[name] = np.maximum(hi.get(name, -np.inf), v.max(axis=0))
            pick = np.random.default_rng([options.seed, k, b]).choice(len(v), min(per_batch, len(v)), replace=False)
            rows[name].append(v[np.sort(pick)])
    return {n: (lo[n], hi[n], np.maximum(-lo[n], hi[n]), np.concatenate(rows[n])[:ROWS]) for n in names}


def _apply(model: onnx.ModelProto, chosen: dict[str, tuple[Group, np.ndarray]]) -> onnx.ModelProto:
    """A copy of ``model`` with each chosen tensor x divided by s in its producer and the
    consumers' weight rows multiplied by s (float32 initializers)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    index = GraphIndex(graph)
    inits = {t.name: t for t in graph.initializer}
    new_nodes = []

    def cur(name: str) -> np.ndarray:  # the value so far (an earlier tensor may have changed it)
        return numpy_helper.to_array(inits[name]).astype(np.float64)

    def put(name: str, array: np.ndarray) -> None:
        tensor = numpy_helper.from_array(array.astype(np.float32), name)
        if name in inits:
            inits[name].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
            inits[name] = graph.initializer[-1]

    nodes = {n.name: n for n in graph.node}
    for x, (g, s) in chosen.items():
        node = nodes[g.producer]
        read = x
        if g.kind == "LayerNormalization":
            target = node
            if g.copy:
                target = onnx.NodeProto()
                target.CopyFrom(node)
                target.name = f"{node.name}_smoothed"
                read = f"{x}_smoothed"
                target.output[0] = read
                new_nodes.append((node.name, target))
            for slot in (1, 2):
                if slot < len(node.input) and node.input[slot]:
                    name = node.input[slot]
                    target.input[slot] = f"{name}_smoothed_{_slug(read)}"
                    put(target.input[slot], cur(name) / s)
        else:
            add = node if g.kind == "MatMul+Add" else None
            matmul = node if add is None else next(
                index.producer[i] for i in add.input if i in index.producer and index.producer[i].op_type == "MatMul")
            w1 = matmul.input[1]
            put(w1, cur(w1) / s[None, :])
            if add is not None:
                bias = _bias_add(add, matmul.output[0], index)
                put(bias, cur(bias) / s)
        for t in g.consumers:
            consumer = nodes[t.node]
            consumer.input[0] = read
            w = t.to_matrix(cur(t.w))
            put(t.w, t.from_matrix(w * s[None, :, None]))
    for after, copy in new_nodes:  # each copy right after its original: the order stays topological
        position = next(i for i, n in enumerate(graph.node) if n.name == after)
        graph.node.insert(position + 1, copy)
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")[-48:]
