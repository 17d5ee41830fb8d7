"""How much of a model's weight bytes a quantized model holds in integer form, and what stayed float.

The denominator counts the constant weight inputs of every weight-carrying op of the float model
(Conv / ConvTranspose / Gemm / MatMul and the W, R of LSTM / GRU / RNN), biases excluded, as float32
bytes. The numerator counts, in the quantized model, the integer initializers read by a
DequantizeLinear whose output reaches one of those ops (through Transpose / Reshape / ... at most),
or MatMulNBits' packed weights, or DynamicQuantizeLSTM's int8 W and R; all as the float bytes they
replace.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

WEIGHT_OPS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1), "LSTM": (1, 2), "GRU": (1, 2),
              "RNN": (1, 2)}
_PASS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Identity", "Flatten"}
_INT = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
        onnx.TensorProto.INT16, onnx.TensorProto.UINT16}


def _constants(graph) -> dict[str, onnx.TensorProto]:
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = node.attribute[0].t
    return out


def _elements(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1


def _graphs(graph):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)


def float_weights(model: onnx.ModelProto) -> tuple[int, Counter]:
    """(weight elements, elements per op type) of the weight-carrying ops reading constants."""
    total, per_op = 0, Counter()
    for graph in _graphs(model.graph):
        consts = _constants(graph)
        for node in graph.node:
            for i in WEIGHT_OPS.get(node.op_type, ()):
                if i < len(node.input) and node.input[i] in consts:
                    n = _elements(consts[node.input[i]])
                    total += n
                    per_op[node.op_type] += n
    return total, per_op


def quantized_weights(model: onnx.ModelProto) -> tuple[int, Counter]:
    """(integer weight elements reaching weight ops, float weight elements left, by op type)."""
    quant, left = 0, Counter()
    for graph in _graphs(model.graph):
        consts = _constants(graph)
        producer = {o: n for n in graph.node for o in n.output}

        def source(name, depth=0):
            node = producer.get(name)
            if node is not None and node.op_type in _PASS and depth < 4:
                return source(node.input[0], depth + 1)
            return node, name

        for node in graph.node:
            if node.op_type == "DynamicQuantizeLSTM":  # int8 W and R (inputs 1, 2) read directly
                quant += sum(_elements(consts[i]) for i in node.input[1:3] if i in consts)
            if node.op_type == "MatMulNBits":
                quant += int(dict((a.name, a.i) for a in node.attribute).get("K", 0)) * \
                    int(dict((a.name, a.i) for a in node.attribute).get("N", 0))
            for i in WEIGHT_OPS.get(node.op_type, ()):
                if i >= len(node.input):
                    continue
                prod, name = source(node.input[i])
                if prod is not None and prod.op_type == "DequantizeLinear" and prod.input[0] in consts \
                        and consts[prod.input[0]].data_type in _INT:
                    quant += _elements(consts[prod.input[0]])
                elif name in consts:
                    left[node.op_type] += _elements(consts[name])
    return quant, left


def fraction(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> dict:
    total, per_op = float_weights(float_model)
    quant, left = quantized_weights(quant_model)
    left = {op: n for op, n in left.items() if n}
    return {"weight_bytes": 4 * total, "quantized_fraction": quant / total if total else float("nan"),
            "left_float_bytes": {op: 4 * n for op, n in sorted(left.items())}}
