"""Stage 5: rewrite the normalised float graph into a QDQ graph.

One function, ``apply``, serves twice: during capture it builds the partially quantized network
(the layers quantized so far, the activation QDQ calibrated so far) whose outputs are X~, and at the
end it builds the output model. Both runs go through the same code, so the X~ that GPFQ saw is
exactly what the deployed graph computes (onnxruntime runs QDQ pairs as fake quantization when its
optimiser is off, and fuses them into integer kernels when it is on).

Layout, per quantized layer::

    x -> QuantizeLinear -> DequantizeLinear -> Conv/Gemm/MatMul -> ...
    w_quantized (int8 codes) -> DequantizeLinear(w_scale per output channel, zero point 0) -^
    b_quantized (int32, scale = x_scale * w_scale) -> DequantizeLinear -----------------------^

Every consumer of a quantized activation tensor reads its DequantizeLinear output. What a layer's
node becomes is its weight format's choice (``formats``): the layout above, or for example one
com.microsoft MatMulNBits node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .formats import WeightFormat
from .graph import node_inputs
from .ops import Layer
from .ops.base import renamed


@dataclass(frozen=True)
class ActQuant:
    """Affine quantization of one activation tensor: real = (q - zero_point) * scale.

    codes_of: the tensor is not quantized from its float values but computed on the codes of this
    one, clipped to ``clip`` (``on_codes``: a hard sigmoid), and its producer is not emitted."""

    scale: float
    zero_point: int
    dtype: type = np.uint8
    codes_of: str | None = None
    clip: tuple[int, int] | None = None


@dataclass(frozen=True)
class QuantizedLayer:
    """What the greedy pass chose for one layer, in ONNX layout.

    codes: integer codes in the ONNX weight's shape. scale: float32 steps, shaped as
    DequantizeLinear wants them: () per tensor, (n_out,) per channel, or the weight's shape with
    the fan-in axis divided into blocks of block_size. fmt: how the codes are stored.
    """

    target: Layer
    codes: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None  # float32 bias after bias correction (None: keep the model's)
    block_size: int
    fmt: WeightFormat

    @cached_property
    def weight_tensors(self) -> tuple[onnx.TensorProto, ...]:
        """The format's codes, scale and zero point initializers (built once: rewrite.apply runs at
        every layer)."""
        return self.fmt.weight_tensors(self)

    @property
    def weight_only(self) -> bool:
        """Block-wise layers read their input in float: onnxruntime has no integer kernel for
        block-wise int8 weights (its optimiser even mis-fuses DQ(x), DQ_blocked(w) -> MatMul);
        some formats take a float input by design."""
        return bool(self.block_size) or self.fmt.weight_only or not self.target.INT8_KERNEL


def q_name(tensor: str) -> str:
    return f"{tensor}_QuantizeLinear_Output"


def dq_name(tensor: str) -> str:
    return f"{tensor}_DequantizeLinear_Output"


def read_name(tensor: str, acts: dict, graph_outputs: set[str]) -> str:
    """The name consumers of ``tensor`` read after rewriting: its DequantizeLinear output when it is
    quantized. A quantized graph output keeps its name on the DequantizeLinear output (the model's
    interface does not change) and its producer writes ``{tensor}_float`` instead."""
    if tensor not in acts:
        return tensor
    return tensor if tensor in graph_outputs else dq_name(tensor)


def act_quant_from_range(lo: float, hi: float, bits: int = 8, symmetric: bool = False) -> ActQuant:
    """Parameters covering [lo, hi] (always including 0, so zero is exact).

    Asymmetric: uint8/uint16 with a zero point; symmetric: int8/int16 with zero point 0.
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        dtype = np.int8 if bits == 8 else np.int16
        qmax = np.iinfo(dtype).max
        amax = max(-lo, hi)
        if not amax > 0 or not np.isfinite(amax):
            return ActQuant(1.0, 0, dtype)
        return ActQuant(float(np.float32(amax / qmax)), 0, dtype)
    dtype = np.uint8 if bits == 8 else np.uint16
    qmax = np.iinfo(dtype).max
    if hi - lo <= 0 or not np.isfinite(hi - lo):
        return ActQuant(1.0, 0, dtype)
    scale = np.float32((hi - lo) / qmax)
    zero_point = int(np.clip(np.round(-lo / scale), 0, qmax))
    return ActQuant(float(scale), zero_point, dtype)


def fake_quant(x: np.ndarray, quant: ActQuant) -> np.ndarray:
    """x -> DequantizeLinear(QuantizeLinear(x)) in float64 (for calibration searches)."""
    info = np.iinfo(quant.dtype)
    q = np.clip(np.rint(x / quant.scale) + quant.zero_point, info.min, info.max)
    return (q - quant.zero_point) * quant.scale


@dataclass
class Emitter:
    """The output graph under construction: what ``apply`` and the weight formats append to."""

    acts: dict[str, ActQuant]
    graph_outputs: set[str]
    inits: dict[str, onnx.TensorProto]
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    emitted_weights: set[str] = field(default_factory=set)

    def produced_name(self, tensor: str) -> str:
        """The name the producer of ``tensor`` writes (see ``read_name``)."""
        return f"{tensor}_float" if tensor in self.acts and tensor in self.graph_outputs else tensor

    def act_qdq(self, tensor: str) -> None:
        """QuantizeLinear -> DequantizeLinear on an activation tensor."""
        quant = self.acts[tensor]
        scale, zp = f"{tensor}_scale", f"{tensor}_zero_point"
        self.inits[scale] = numpy_helper.from_array(np.array(quant.scale, np.float32), scale)
        self.inits[zp] = numpy_helper.from_array(np.array(quant.zero_point, quant.dtype), zp)
        self.nodes.append(helper.make_node("QuantizeLinear", [self.produced_name(tensor), scale, zp], [q_name(tensor)],
                                           name=f"{tensor}_QuantizeLinear"))
        self.nodes.append(helper.make_node("DequantizeLinear", [q_name(tensor), scale, zp],
                                           [read_name(tensor, self.acts, self.graph_outputs)],
                                           name=f"{tensor}_DequantizeLinear"))

    def code_clip(self, tensor: str) -> None:
        """Clip on the codes of another quantized tensor -> DequantizeLinear (``ActQuant.codes_of``)."""
        quant = self.acts[tensor]
        lo, hi, scale, zp = (f"{tensor}_{k}" for k in ("clip_min", "clip_max", "scale", "zero_point"))
        for name, value in ((lo, quant.clip[0]), (hi, quant.clip[1]), (zp, quant.zero_point)):
            self.inits[name] = numpy_helper.from_array(np.array(value, quant.dtype), name)
        self.inits[scale] = numpy_helper.from_array(np.array(quant.scale, np.float32), scale)
        self.nodes.append(helper.make_node("Clip", [q_name(quant.codes_of), lo, hi], [q_name(tensor)], name=f"{tensor}_Clip"))
        self.nodes.append(helper.make_node("DequantizeLinear", [q_name(tensor), scale, zp],
                                           [read_name(tensor, self.acts, self.graph_outputs)],
                                           name=f"{tensor}_DequantizeLinear"))

    def constant_dq(self, tensor: str) -> None:
        """A constant operand (``placement.Placement.constants``) as 8-bit codes read through
        DequantizeLinear: what onnxruntime's QLinearAdd/QLinearMul take for it."""
        quant = self.acts[tensor]
        info = np.iinfo(quant.dtype)
        values = numpy_helper.to_array(self.inits[tensor]).astype(np.float64)
        codes = np.clip(np.rint(values / quant.scale) + quant.zero_point, info.min, info.max).astype(quant.dtype)
        names = f"{tensor}_codes", f"{tensor}_scale", f"{tensor}_zero_point"
        for name, value in zip(names, (codes, np.array(quant.scale, np.float32), np.array(quant.zero_point, quant.dtype))):
            self.inits[name] = numpy_helper.from_array(value, name)
        self.nodes.append(helper.make_node("DequantizeLinear", list(names), [dq_name(tensor)],
                                           name=f"{tensor}_DequantizeLinear"))

    def bias(self, node: onnx.NodeProto, layer: QuantizedLayer) -> str | None:
        """The tensor the layer's bias input should read, or None to leave it as it is.

        With a quantized input and a float bias, the bias becomes int32 codes with scale
        x_scale * w_scale where the op allows it (``Layer.integer_bias``: what the fused integer
        kernels expect); otherwise a corrected bias stays float.
        """
        t = layer.target
        if t.b is None and layer.bias is None:
            return None
        bias = layer.bias if layer.bias is not None else numpy_helper.to_array(self.inits[t.b]).astype(np.float32)
        base = t.b or f"{t.node}_bias"
        if not (t.x in self.acts and not layer.block_size and t.integer_bias):
            if layer.bias is None:
                return None
            name = f"{base}_corrected"
            self.inits[name] = numpy_helper.from_array(bias.astype(np.float32), name)
            return name
        flat = bias.reshape(-1).astype(np.float64)
        scale = (np.float32(self.acts[t.x].scale) * layer.scale.astype(np.float32)).astype(np.float32)
        scale = np.broadcast_to(scale, flat.shape).astype(np.float32)
        safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
        codes = np.clip(np.round(flat / safe), -(2**31) + 1, 2**31 - 1).astype(np.int32).reshape(bias.shape)
        codes_name, scale_name = f"{base}_quantized", f"{base}_quantized_scale"
        self.inits[codes_name] = numpy_helper.from_array(codes, codes_name)
        self.inits[scale_name] = numpy_helper.from_array(scale.reshape(bias.shape) if bias.ndim == 1 else scale, scale_name)
        out = f"{base}_DequantizeLinear_Output"
        attrs = {"axis": 0 if bias.ndim == 1 else 1}  # a (1, N) Gemm bias takes its per-column scale on axis 1
        self.nodes.append(helper.make_node("DequantizeLinear", [codes_name, scale_name], [out],
                                           name=f"{base}_DequantizeLinear", **attrs))
        return out


def apply(
    graph: onnx.GraphProto,
    layers: dict[str, QuantizedLayer],
    acts: dict[str, ActQuant],
) -> tuple[list[onnx.NodeProto], dict[str, onnx.TensorProto]]:
    """Nodes (topological order) and initializers of ``graph`` with ``layers`` and ``acts`` quantized.

    layers: keyed by ``Layer.key`` (a node with several weights, LSTM W and R, has one layer per
    weight: the last one's format emits the node, the others only their dequantized weight);
    acts: keyed by tensor name (an initializer among them is stored as codes: ``Emitter.constant_dq``).
    Unchanged initializers are shared with ``graph`` (not copied).
    """
    by_node: dict[str, list[QuantizedLayer]] = {}
    for q in layers.values():
        by_node.setdefault(q.target.node, []).append(q)
    em = Emitter(acts, {o.name for o in graph.output}, {t.name: t for t in graph.initializer})
    for name in sorted(acts):
        if name in em.inits:  # a constant operand of an integer Add/Mul
            em.constant_dq(name)
    for name in (i.name for i in graph.input if i.name not in em.inits):
        if name in acts:
            em.act_qdq(name)
    for node in graph.node:
        group = by_node.get(node.name)
        inputs = [read_name(n, acts, em.graph_outputs) for n in node.input]
        outputs = [em.produced_name(o) for o in node.output]
        if any(acts[o].codes_of for o in node.output if o in acts):
            em.code_clip(node.output[0])  # the node runs on its input's codes
            continue
        if group is None:
            em.nodes.append(renamed(node, inputs, outputs))
        else:
            layer = group[-1]
            if layer.weight_only:
                inputs[0] = node.input[0]
            for other in group[:-1]:
                inputs[other.target.WEIGHT_INPUT] = other.fmt.weight_input(em, other)
            layer.fmt.emit(em, node, layer, inputs, outputs)
        for out in node.output:
            if out in acts:
                em.act_qdq(out)
    return em.nodes, em.inits


def build_model(base: onnx.ModelProto, nodes: list[onnx.NodeProto], inits: dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    """A complete model from ``apply``'s output: unused initializers dropped, order deterministic.

    ``base`` must already import every operator domain the nodes use (``plan.add_domains``)."""
    used = {name for node in nodes for name in node_inputs(node)} | {o.name for o in base.graph.output}
    graph = helper.make_graph(
        nodes,
        base.graph.name or "quantized",
        [i for i in base.graph.input if i.name not in inits or i.name in used],
        list(base.graph.output),
        initializer=[inits[n] for n in sorted(inits) if n in used],
    )
    opsets = list(base.opset_import)
    # Opset 21 (INT4, 16-bit QDQ, block-wise DequantizeLinear) needs IR 10: never below what the opsets need.
    ir_version = max(base.ir_version, helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
    model.producer_name = "onnx-gpfq"
    from . import __version__

    model.producer_version = __version__
    model.functions.extend(base.functions)
    model.metadata_props.extend(base.metadata_props)
    return model
