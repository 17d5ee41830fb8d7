"""Codes stored as an integer initializer read through DequantizeLinear: the layer's node stays as
it is, its weight input reads the dequantized codes (per tensor, per channel or block-wise scales)
and, with a quantized input, its bias becomes int32 codes (see ``rewrite.Emitter.bias``)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .base import WeightFormat


class QDQFormat(WeightFormat):
    code_dtype: ClassVar[np.dtype]  # numpy dtype of the codes' container

    def weight_tensors(self, layer) -> tuple[onnx.TensorProto, onnx.TensorProto, onnx.TensorProto]:
        """Codes, scale and zero point initializers of a layer."""
        w = layer.target.w
        return (numpy_helper.from_array(layer.codes.astype(np.int8).astype(self.code_dtype), f"{w}_quantized"),
                numpy_helper.from_array(layer.scale.astype(np.float32), f"{w}_scale"),
                numpy_helper.from_array(np.zeros(layer.scale.shape, np.int8).astype(self.code_dtype), f"{w}_zero_point"))

    def weight_input(self, em, layer) -> str:
        """Emit (once per weight) the DequantizeLinear of a layer's codes; the tensor the node reads."""
        t = layer.target
        w_dq = f"{t.w}_DequantizeLinear_Output"
        read = w_dq if t.graph_shape is None else f"{t.w}_dequantized_reshaped"
        if t.w not in em.emitted_weights:  # a weight shared by several nodes is dequantized once
            em.emitted_weights.add(t.w)
            for tensor in layer.weight_tensors:
                em.inits[tensor.name] = tensor
            codes, scale, zp = (tensor.name for tensor in layer.weight_tensors)
            if layer.block_size:
                attrs = {"axis": t.fan_in_axis, "block_size": layer.block_size}
            else:
                attrs = {"axis": t.channel_axis} if layer.scale.ndim == 1 else {}
            em.nodes.append(helper.make_node("DequantizeLinear", [codes, scale, zp], [w_dq],
                                             name=f"{t.w}_DequantizeLinear", **attrs))
            if t.graph_shape is not None:  # codes stored 2-D (one scale per row), the node reads its own shape
                shape = f"{t.w}_graph_shape"
                em.inits[shape] = numpy_helper.from_array(np.array(t.graph_shape, np.int64), shape)
                em.nodes.append(helper.make_node("Reshape", [w_dq, shape], [read], name=f"{t.w}_Reshape"))
        return read

    def emit(self, em, node, layer, inputs, outputs):
        t = layer.target
        inputs = list(inputs)
        inputs[t.WEIGHT_INPUT] = self.weight_input(em, layer)
        bias_input = em.bias(node, layer)
        if bias_input is not None:
            inputs += [""] * (t.BIAS_INPUT + 1 - len(inputs))
            inputs[t.BIAS_INPUT] = bias_input
        em.nodes.extend(t.emit(node, inputs, outputs))
