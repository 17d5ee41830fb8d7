"""Hard sigmoid computed on the integer codes (no float round trip between layers).

HardSigmoid(x) = clip(alpha x + beta, 0, 1) has no integer kernel in onnxruntime: in a QDQ graph it runs
as dequantize -> HardSigmoid -> quantize, three passes over float32 tensors at every HardSwish of a
MobileNetV3 / PP-LCNet-class network (x * hardsigmoid(x)). But on a quantized x = s (q - z) it is an
affine map of the code clipped to a range:

    alpha x + beta = alpha s (q - z + beta / (alpha s))

so with N = 1 / (alpha s) an integer and beta N an integer, the codes of x clipped to [z - beta N,
z - beta N + N] and read with scale alpha s and zero point z - beta N give the hard sigmoid of the
dequantized x exactly:

    DequantizeLinear(Clip(q, z_h, z_h + N), alpha s, z_h) = HardSigmoid(DequantizeLinear(q, s, z)),
    z_h = z - beta N.

One Clip on uint8 replaces the three float passes, and onnxruntime's QLinearMul reads its output as it
reads any other quantized tensor. ``grids`` offers the range choice (``act_ranges.choose``) the
admissible grids next to each candidate range of x (the step just above, covering the range and
reaching down to -beta / alpha so that z_h is a valid zero point, and the step just below), scored by
the same output error as any candidate; ``derived`` is the hard sigmoid's quantization on the chosen
grid. Where no admissible grid lies within ``MAX_WIDEN`` of a candidate's (a calibrated range far above
-beta / alpha), the hard sigmoid keeps its own quantize / dequantize pair instead.

``fold_hardswish`` first turns the decomposed exports of hard swish, x * Clip(x + c, 0, H) / H
(Paddle, TF), and the HardSwish operator into Mul(x, HardSigmoid(x)) with alpha = 1 / H, beta = c / H,
so that every form takes this path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import GraphIndex
from .rewrite import ActQuant

MAX_WIDEN = 1.25  # the most x's step may grow (x's own precision) for its hard sigmoid to run on codes
HARDSIGMOID_DEFAULTS = {"alpha": 0.2, "beta": 0.5}


@dataclass(frozen=True)
class CodeClip:
    """A HardSigmoid computed on the codes of its (quantized) input ``source``."""

    source: str
    alpha: float
    beta: float


def hardsigmoid_params(node: onnx.NodeProto) -> tuple[float, float]:
    attrs = {a.name: a.f for a in node.attribute}
    return float(attrs.get("alpha", HARDSIGMOID_DEFAULTS["alpha"])), float(attrs.get("beta", HARDSIGMOID_DEFAULTS["beta"]))


def _beta_period(beta: float) -> int:
    """The smallest d <= 64 with beta d an integer (to float32 precision); 0 if none."""
    for d in range(1, 65):
        if abs(beta * d - round(beta * d)) < 1e-5:
            return d
    return 0


def grid(quant: ActQuant, alpha: float, beta: float) -> ActQuant | None:
    """x's quantization moved so that its hard sigmoid runs on codes: step s = 1 / (alpha N) with N and
    beta N integers, covering the range ``quant`` covers and reaching down to -beta / alpha (so the hard
    sigmoid's zero point z - beta N is a valid code). None when no such grid exists (alpha <= 0, an
    irrational-looking beta, a symmetric grid that cannot hold it) or it widens the step by more than
    MAX_WIDEN."""
    d = _beta_period(beta)
    if not (alpha > 0 and d and np.isfinite(quant.scale) and quant.scale > 0):
        return None
    info = np.iinfo(quant.dtype)
    s, z = float(quant.scale), int(quant.zero_point)
    below, above = (z - info.min) * s, (info.max - z) * s  # the covered range: [-below, above]
    need_below = max(beta / alpha, below)
    if quant.zero_point == 0 and info.min < 0:  # symmetric: the zero point stays 0
        fits = min(-info.min / need_below, info.max / above if above > 0 else math.inf) / alpha
    else:
        fits = (info.max - info.min - 1) / (alpha * (need_below + above))
    N = int(fits // d) * d
    if N < d:
        return None
    step = np.float32(1.0 / (alpha * N))
    if step > MAX_WIDEN * s:
        return None
    if quant.zero_point == 0 and info.min < 0:
        zero = 0
    else:
        zero = info.min + math.ceil(need_below / float(step) - 1e-6)
    zero_h = zero - round(beta * N)
    if zero_h < info.min or (info.max - zero) * float(step) < above * (1 - 1e-6):
        return None
    return ActQuant(float(step), int(zero), quant.dtype)


def grids(quant: ActQuant, alpha: float, beta: float) -> list[ActQuant]:
    """The admissible grids next to ``quant``'s: ``grid``'s (a step up, covering its range) and one a
    step down (finer: its range a little narrower at the top), for the range choice to score
    (``act_ranges.choose``); empty when neither exists."""
    found = [g for g in (grid(quant, alpha, beta), _finer(quant, alpha, beta)) if g is not None]
    return list(dict.fromkeys(found))


def _finer(quant: ActQuant, alpha: float, beta: float) -> ActQuant | None:
    """The admissible grid with the next step below ``quant``'s: N = 1 / (alpha s) rounded up to a
    multiple of beta's period, the zero point where it keeps the low end (and at least beta N)."""
    d = _beta_period(beta)
    if not (alpha > 0 and d and np.isfinite(quant.scale) and quant.scale > 0):
        return None
    info = np.iinfo(quant.dtype)
    N = math.ceil(1.0 / (alpha * quant.scale) / d - 1e-9) * d
    step = np.float32(1.0 / (alpha * N))
    if quant.zero_point == 0 and info.min < 0:
        zero = 0
    else:
        zero = info.min + max(round(beta * N), round((quant.zero_point - info.min) * quant.scale / float(step)))
    above = (info.max - quant.zero_point) * quant.scale
    if zero > info.max or zero - round(beta * N) < info.min or (info.max - zero) * float(step) < above / MAX_WIDEN:
        return None  # (or the top of the range would shrink by more than MAX_WIDEN)
    return ActQuant(float(step), int(zero), quant.dtype)


def exact(quant: ActQuant, alpha: float, beta: float) -> bool:
    """Whether the hard sigmoid runs exactly on the codes of a tensor quantized by ``quant`` (``grid``'s
    result is)."""
    d = _beta_period(beta)
    if not (alpha > 0 and d and quant.scale > 0):
        return False
    n = 1.0 / (alpha * quant.scale)
    N = round(n)
    return abs(n - N) < 1e-3 and N % d == 0 and quant.zero_point - round(beta * N) >= np.iinfo(quant.dtype).min


def derived(source: str, quant: ActQuant, alpha: float, beta: float) -> ActQuant:
    """The hard sigmoid's quantization on its input's codes (``quant`` from ``grid``): scale alpha s,
    zero point z - beta N, codes = Clip(codes of ``source``, z_h, min(z_h + N, max code))."""
    info = np.iinfo(quant.dtype)
    N = round(1.0 / (alpha * quant.scale))
    zero_h = int(quant.zero_point) - round(beta * N)
    return ActQuant(float(np.float32(alpha * quant.scale)), zero_h, quant.dtype, codes_of=source,
                    clip=(zero_h, min(zero_h + N, int(info.max))))


def fold_hardswish(graph: onnx.GraphProto) -> int:
    """Rewrite hard swish into Mul(x, HardSigmoid(x)) in place; the number of rewrites.

    Two forms: the HardSwish operator (alpha 1/6, beta 1/2), and x * Clip(x + c, 0, H) / H with scalar
    constants c, H > 0 (or * (1 / H)), whose intermediate tensors nothing else reads: HardSigmoid with
    alpha = 1 / H, beta = c / H. The result equals the original to float32 rounding. Node names and the
    final output name are kept."""
    index = GraphIndex(graph)
    outputs = set(index.graph_outputs)
    replaced: dict[str, list[onnx.NodeProto]] = {}  # name of the node to replace -> its replacement
    dropped: set[str] = set()
    count = 0

    def scalar(name: str) -> float | None:
        if not index.is_constant(name) or name not in index.initializers:
            return None
        v = numpy_helper.to_array(index.initializers[name])
        return float(v.reshape(-1)[0]) if v.size == 1 and np.isfinite(v).all() else None

    def only(tensor: str, op: str) -> onnx.NodeProto | None:
        readers = index.consumers.get(tensor, [])
        if tensor in outputs or len(readers) != 1 or readers[0].op_type != op:
            return None
        return readers[0]

    for node in graph.node:
        if node.op_type == "HardSwish" and node.domain in ("", "ai.onnx"):
            hs = f"{node.output[0]}_hardsigmoid"
            replaced[node.name] = [
                helper.make_node("HardSigmoid", [node.input[0]], [hs], name=f"{node.name}_hardsigmoid",
                                 alpha=1.0 / 6.0, beta=0.5),
                helper.make_node("Mul", [node.input[0], hs], [node.output[0]], name=node.name)]
            count += 1
            continue
        if node.op_type != "Add" or len(node.input) != 2 or node.name in dropped:
            continue
        k = 1 if index.is_constant(node.input[1]) else 0
        x, c = node.input[1 - k], scalar(node.input[k])
        clip = only(node.output[0], "Clip")
        if c is None or index.is_constant(x) or clip is None or len(clip.input) != 3:
            continue
        lo, H = scalar(clip.input[1]), scalar(clip.input[2])
        mul = only(clip.output[0], "Mul")
        if lo != 0.0 or H is None or not H > 0 or mul is None or set(mul.input) != {x, clip.output[0]}:
            continue
        scale = index.consumers.get(mul.output[0], [])
        if mul.output[0] in outputs or len(scale) != 1 or scale[0].op_type not in ("Div", "Mul"):
            continue
        last = scale[0]
        factor = scalar(last.input[1]) if last.input[0] == mul.output[0] else None
        if factor is None or not math.isclose(factor if last.op_type == "Div" else 1.0 / factor, H, rel_tol=1e-6):
            continue
        hs = f"{clip.output[0]}_hardsigmoid"
        replaced[node.name] = [helper.make_node("HardSigmoid", [x], [hs], name=node.name, alpha=1.0 / H, beta=c / H)]
        replaced[last.name] = [helper.make_node("Mul", [x, hs], [last.output[0]], name=last.name)]
        dropped |= {clip.name, mul.name}
        count += 1
    if not count:
        return 0
    nodes = []
    for node in graph.node:
        if node.name in dropped:
            continue
        nodes.extend(replaced.get(node.name, [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    return count
