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

Every consumer of a quantized activation tensor reads its DequantizeLinear output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import GraphIndex, node_inputs
from .targets import Target


INT4 = helper.tensor_dtype_to_np_dtype(onnx.TensorProto.INT4)


@dataclass(frozen=True)
class ActQuant:
    """Affine quantization of one activation tensor: real = (q - zero_point) * scale."""

    scale: float
    zero_point: int
    dtype: type = np.uint8


@dataclass(frozen=True)
class QuantizedLayer:
    """What the greedy pass chose for one layer, in ONNX layout.

    codes: integer codes in the ONNX weight's shape. scale: float32 steps, shaped as
    DequantizeLinear wants them: () per tensor, (n_out,) per channel, or the weight's shape with
    the fan-in axis divided into blocks of block_size. fmt: "int8" (int8 container), "int4"
    (packed INT4, opset 21) or "matmulnbits" (com.microsoft MatMulNBits, 4-bit, block-wise).
    """

    target: Target
    codes: np.ndarray
    scale: np.ndarray
    bias: np.ndarray | None  # float32 bias after bias correction (None: keep the model's)
    block_size: int = 0
    fmt: str = "int8"

    @cached_property
    def weight_tensors(self) -> tuple[onnx.TensorProto, onnx.TensorProto, onnx.TensorProto]:
        """Codes, scale and zero point initializers (built once: rewrite.apply runs at every layer)."""
        w = self.target.w
        dtype = INT4 if self.fmt == "int4" else np.int8
        return (numpy_helper.from_array(self.codes.astype(np.int8).astype(dtype), f"{w}_quantized"),
                numpy_helper.from_array(self.scale.astype(np.float32), f"{w}_scale"),
                numpy_helper.from_array(np.zeros(self.scale.shape, np.int8).astype(dtype), f"{w}_zero_point"))

    @property
    def weight_only(self) -> bool:
        """Block-wise layers read their input in float: onnxruntime has no integer kernel for
        block-wise int8 weights (its optimiser even mis-fuses DQ(x), DQ_blocked(w) -> MatMul),
        and MatMulNBits takes a float input by design."""
        return bool(self.block_size) or self.fmt == "matmulnbits"


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


def apply(
    graph: onnx.GraphProto,
    layers: dict[str, QuantizedLayer],
    acts: dict[str, ActQuant],
) -> tuple[list[onnx.NodeProto], dict[str, onnx.TensorProto]]:
    """Nodes (topological order) and initializers of ``graph`` with ``layers`` and ``acts`` quantized.

    layers: keyed by node name; acts: keyed by tensor name. Unchanged initializers are shared with
    ``graph`` (not copied).
    """
    index = GraphIndex(graph)
    inits: dict[str, onnx.TensorProto] = dict(index.initializers)
    nodes: list[onnx.NodeProto] = []
    emitted_weights: set[str] = set()

    graph_outputs = {o.name for o in graph.output}

    def produced_name(tensor: str) -> str:
        return f"{tensor}_float" if tensor in acts and tensor in graph_outputs else tensor

    def emit_act_qdq(tensor: str) -> None:
        quant = acts[tensor]
        scale, zp = f"{tensor}_scale", f"{tensor}_zero_point"
        inits[scale] = numpy_helper.from_array(np.array(quant.scale, np.float32), scale)
        inits[zp] = numpy_helper.from_array(np.array(quant.zero_point, quant.dtype), zp)
        nodes.append(helper.make_node("QuantizeLinear", [produced_name(tensor), scale, zp], [q_name(tensor)],
                                      name=f"{tensor}_QuantizeLinear"))
        nodes.append(helper.make_node("DequantizeLinear", [q_name(tensor), scale, zp],
                                      [read_name(tensor, acts, graph_outputs)], name=f"{tensor}_DequantizeLinear"))

    graph_inputs = [i.name for i in graph.input if i.name not in inits]
    for name in graph_inputs:
        if name in acts:
            emit_act_qdq(name)

    for node in graph.node:
        layer = layers.get(node.name)
        new = node
        rewired = [read_name(n, acts, graph_outputs) for n in node.input]
        if layer is not None and layer.weight_only:
            rewired[0] = node.input[0]
        if layer is not None and layer.fmt == "matmulnbits":
            nodes.append(_matmul_nbits(node, layer, rewired[0], [produced_name(o) for o in node.output], inits))
            for out in node.output:
                if out in acts:
                    emit_act_qdq(out)
            continue
        if layer is not None:
            t = layer.target
            w_dq = f"{t.w}_DequantizeLinear_Output"
            if t.w not in emitted_weights:
                emitted_weights.add(t.w)
                nodes.append(_weight_dq(t, layer, inits))
            rewired[1] = w_dq
            bias_input = _bias(t, layer, node, acts, inits, nodes)
            if bias_input is not None:
                while len(rewired) < 3:
                    rewired.append("")
                rewired[2] = bias_input
        outputs = [produced_name(o) for o in node.output]
        if rewired != list(node.input) or outputs != list(node.output):
            new = onnx.NodeProto()
            new.CopyFrom(node)
            del new.input[:]
            new.input.extend(rewired)
            del new.output[:]
            new.output.extend(outputs)
        nodes.append(new)
        for out in node.output:
            if out in acts:
                emit_act_qdq(out)
    return nodes, inits


def _weight_dq(t: Target, layer: QuantizedLayer, inits: dict[str, onnx.TensorProto]) -> onnx.NodeProto:
    """int8 or packed-int4 codes -> DequantizeLinear (per tensor, per channel, or block-wise)."""
    for tensor in layer.weight_tensors:
        inits[tensor.name] = tensor
    codes, scale, zp = (tensor.name for tensor in layer.weight_tensors)
    if layer.block_size:
        attrs = {"axis": t.fan_in_axis, "block_size": layer.block_size}
    else:
        attrs = {"axis": t.channel_axis} if layer.scale.ndim == 1 else {}
    return helper.make_node("DequantizeLinear", [codes, scale, zp], [f"{t.w}_DequantizeLinear_Output"],
                            name=f"{t.w}_DequantizeLinear", **attrs)


def _matmul_nbits(node: onnx.NodeProto, layer: QuantizedLayer, x: str, outputs: list[str],
                  inits: dict[str, onnx.TensorProto]) -> onnx.NodeProto:
    """MatMul(x, W) -> com.microsoft MatMulNBits(x, packed 4-bit codes, block scales).

    MatMulNBits stores unsigned codes u = q + 8 (its default zero point is 8), two per byte, low
    nibble first, as B[N, n_blocks, block_size / 2], and scales as [N * n_blocks].
    """
    t, bs = layer.target, layer.block_size
    k, n = t.w_shape
    n_blocks = -(-k // bs)
    u = np.full((n_blocks * bs, n), 8, np.uint8)
    u[:k] = (layer.codes.astype(np.int16) + 8).astype(np.uint8)
    u = u.T.reshape(n, n_blocks, bs)
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    b_name, s_name = f"{t.w}_nbits", f"{t.w}_nbits_scales"
    inits[b_name] = numpy_helper.from_array(packed, b_name)
    inits[s_name] = numpy_helper.from_array(layer.scale.astype(np.float32).T.reshape(-1), s_name)
    return helper.make_node("MatMulNBits", [x, b_name, s_name], outputs, name=node.name,
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=bs)


def _gemm_alpha_beta(node: onnx.NodeProto) -> tuple[float, float]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))


def _bias(
    t: Target,
    layer: QuantizedLayer,
    node: onnx.NodeProto,
    acts: dict[str, ActQuant],
    inits: dict[str, onnx.TensorProto],
    nodes: list[onnx.NodeProto],
) -> str | None:
    """The tensor the layer's bias input should read, or None to leave it as it is.

    With a quantized input and a float bias, the bias becomes int32 codes with scale
    x_scale * w_scale (what the fused integer kernels expect); otherwise a corrected bias stays float.
    """
    if t.b is None and layer.bias is None:
        return None
    bias = layer.bias if layer.bias is not None else numpy_helper.to_array(inits[t.b]).astype(np.float32)
    base = t.b or f"{t.node}_bias"
    integer_ok = (t.x in acts and not layer.block_size
                  and (t.op_type == "Conv" or (t.op_type == "Gemm" and _gemm_alpha_beta(node) == (1.0, 1.0))))
    if not integer_ok:
        if layer.bias is None:
            return None
        name = f"{base}_corrected"
        inits[name] = numpy_helper.from_array(bias.astype(np.float32), name)
        return name
    flat = bias.reshape(-1).astype(np.float64)
    scale = (np.float32(acts[t.x].scale) * layer.scale.astype(np.float32)).astype(np.float32)
    scale = np.broadcast_to(scale, flat.shape).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
    codes = np.clip(np.round(flat / safe), -(2**31) + 1, 2**31 - 1).astype(np.int32).reshape(bias.shape)
    codes_name, scale_name = f"{base}_quantized", f"{base}_quantized_scale"
    inits[codes_name] = numpy_helper.from_array(codes, codes_name)
    inits[scale_name] = numpy_helper.from_array(scale.reshape(bias.shape) if bias.ndim == 1 else scale, scale_name)
    out = f"{base}_DequantizeLinear_Output"
    attrs = {"axis": 0 if bias.ndim == 1 else 1}  # a (1, N) Gemm bias takes its per-column scale on axis 1
    nodes.append(helper.make_node("DequantizeLinear", [codes_name, scale_name], [out], name=f"{base}_DequantizeLinear", **attrs))
    return out


def build_model(base: onnx.ModelProto, nodes: list[onnx.NodeProto], inits: dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    """A complete model from ``apply``'s output: unused initializers dropped, order deterministic."""
    used = {name for node in nodes for name in node_inputs(node)} | {o.name for o in base.graph.output}
    graph = helper.make_graph(
        nodes,
        base.graph.name or "quantized",
        [i for i in base.graph.input if i.name not in inits or i.name in used],
        list(base.graph.output),
        initializer=[inits[n] for n in sorted(inits) if n in used],
    )
    opsets = list(base.opset_import)
    if any(n.domain == "com.microsoft" for n in nodes) and not any(o.domain == "com.microsoft" for o in opsets):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    # Opset 21 (INT4, 16-bit QDQ, block-wise DequantizeLinear) needs IR 10: never below what the opsets need.
    ir_version = max(base.ir_version, helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
    model.producer_name = "onnx-gpfq"
    from . import __version__

    model.producer_version = __version__
    model.functions.extend(base.functions)
    model.metadata_props.extend(base.metadata_props)
    return model

