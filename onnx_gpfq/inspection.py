"""``onnx-gpfq inspect``: what a quantized model holds, and what onnxruntime actually runs.

The integer-kernel check does not assume anything: it lets onnxruntime's CPU optimiser (all levels,
as deployed) write the graph it will execute, and counts which quantized layers became integer
kernels (QLinearConv, QGemm, QLinearMatMul, MatMulIntegerToFloat, ...). A layer is quantized when
its weight is an integer initializer read through DequantizeLinear (or a MatMulNBits node).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from . import cpu, runtime
from .formats import FORMATS, RECURRENT_FORMATS
from .graph import consumers
from .ops import OPS

INTEGER_KERNELS = {
    "QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "MatMulIntegerToFloat", "ConvInteger",
    "DynamicQuantizeMatMul", "MatMulNBits", "QAttention", "DynamicQuantizeLSTM", "QLinearConvTranspose",
}
CODE_TYPES = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT8: "uint8"}


@dataclass(frozen=True)
class LayerInfo:
    node: str
    op_type: str
    weight: str
    weight_shape: tuple[int, ...]
    bits: int | str  # from the codes' range: the smallest b with all codes in the signed b-bit range
    granularity: str  # "channel" | "tensor" | "block"
    format: str  # "int8" | "int4" | "uint8" | "MatMulNBits"
    scale_min: float
    scale_median: float
    scale_max: float


def _bits_of(codes: np.ndarray) -> int | str:
    hi = int(np.abs(codes.astype(np.int64)).max()) if codes.size else 0
    if hi <= 1:
        return "ternary"
    for b in range(2, 9):
        if -(2 ** (b - 1)) <= codes.min() and codes.max() <= 2 ** (b - 1) - 1:
            return b
    return 8


def _info(node: str, op_type: str, weight: str, weight_shape, bits, granularity: str, format: str,
          scale: np.ndarray) -> LayerInfo:
    return LayerInfo(node, op_type, weight, tuple(weight_shape), bits, granularity, format,
                     float(scale.min()), float(np.median(scale)), float(scale.max()))


def quantized_layers(model: onnx.ModelProto) -> list[LayerInfo]:
    """Every layer whose weight is stored as integers."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers = consumers(graph.node)
    layers = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            w = inits[node.input[0]]
            if w.data_type == onnx.TensorProto.INT32:
                continue  # a bias
            users = [c for c in readers.get(node.output[0], []) if c.op_type in OPS]
            if not users:
                continue
            codes = numpy_helper.to_array(w)
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            granularity = "block" if attrs.get("block_size", 0) else ("channel" if scale.ndim == 1 and scale.size > 1 else "tensor")
            fmt = CODE_TYPES.get(w.data_type, str(w.data_type))
            for user in users:
                layers.append(_info(user.name, user.op_type, w.name, w.dims, _bits_of(codes), granularity, fmt, scale))
            continue
        for weight_format in (*FORMATS.values(), *RECURRENT_FORMATS.values()):
            info = weight_format.layer_info(node, inits)
            if info is not None:  # one layer, or a list (DynamicQuantizeLSTM: W and R)
                layers.extend(_info(**i) for i in (info if isinstance(info, list) else [info]))
                break
    return layers


def optimised_ops(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes onnxruntime's CPU provider runs after all its graph optimisations."""
    with tempfile.TemporaryDirectory(prefix="onnx_gpfq_inspect_") as tmp:
        src, dst = os.path.join(tmp, "model.onnx"), os.path.join(tmp, "optimised.onnx")
        onnx.save(model, src)
        runtime.session(src, optimization="all", spinning=True, optimized_model_path=dst)
        return list(onnx.load(dst).graph.node)


def kernel_codes(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Per int8 Conv / Gemm / MatMul layer: its weight codes (K, N), rows in the order onnxruntime's int8
    kernel reduces the fan-in (Conv: (kernel..., channel) per group; see onnx_gpfq.cpu)."""
    inits = {t.name: t for t in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    out = {}
    for node in model.graph.node:
        src = dq.get(node.input[1]) if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 else None
        if src is None or inits[src.input[0]].data_type != onnx.TensorProto.INT8:
            continue
        codes = numpy_helper.to_array(inits[src.input[0]]).astype(np.int64)
        if node.op_type == "Conv":  # (O, C/g, *k) -> rows in the kernel's (k..., c) order
            codes = codes.transpose(0, *range(2, codes.ndim), 1).reshape(codes.shape[0], -1).T
        elif node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            codes = codes.T  # (N, K) -> (K, N)
        out[node.name] = codes
    return out


def pair_sums(model: onnx.ModelProto) -> dict[str, int]:
    """Per int8 layer: the largest cpu.pair_reach over the pairs of its fan-in that onnxruntime's AVX2 int8
    kernels add in int16 (same-sign |q_2j| + |q_2j+1|; within cpu.PAIR_BOUND no activation can saturate them)."""
    return {node: int(cpu.pair_reach(codes).max(initial=0)) for node, codes in kernel_codes(model).items()}


def inspect(model: onnx.ModelProto, path: str | None = None) -> dict:
    """Per-layer summary, sizes, and the fraction of quantized layers that run as integer kernels."""
    layers = quantized_layers(model)
    optimised = optimised_ops(model)
    weights = {layer.weight for layer in layers}
    integer_users = {i for n in optimised if n.op_type in INTEGER_KERNELS for i in n.input}
    # A layer runs on an integer kernel when its integer weight feeds one directly.
    on_integer = [layer for layer in layers if layer.weight in integer_users]
    weight_bytes = sum(_nbytes(t) for t in model.graph.initializer)
    sums = pair_sums(model)
    return {
        "int8_path": cpu.int8_path(),
        "int8_path_text": cpu.int8_path_text(),
        "target": {p.key: p.value for p in model.metadata_props}.get("onnx_gpfq.target"),
        # layers some x86 CPU without VNNI saturates on (codes beyond the pair bound), whatever this CPU is
        "saturating_layers": sorted(node for node, s in sums.items() if s > cpu.PAIR_BOUND),
        "path": path,
        "model_bytes": os.path.getsize(path) if path else model.ByteSize(),
        "initializer_bytes": weight_bytes,
        "quantized_layers": len(layers),
        "integer_kernel_layers": len(on_integer),
        "integer_kernel_fraction": (len(on_integer) / len(layers)) if layers else 0.0,
        "float_layers": [layer.node for layer in layers if layer.weight not in integer_users],
        "optimised_op_counts": _counts(n.op_type for n in optimised),
        "distinct_quantized_weights": len(weights),
        "layers": [vars(layer) | {"weight_shape": list(layer.weight_shape)} for layer in layers],
    }


def _nbytes(t: onnx.TensorProto) -> int:
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (int(np.prod(t.dims)) + 1) // 2
    return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _counts(ops) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))
