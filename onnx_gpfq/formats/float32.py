"""float32: the layer's codes stored as their dequantized values, codes x scale in float32 (what
DequantizeLinear would compute, bit for bit), so that nothing is dequantized at run time: GPFQ's
weights and accuracy, the float model's size and speed. The layer reads its input in float.

For recurrent layers onnxruntime runs in float anyway (GRU, RNN: no integer kernel; see
``ops/_recurrent``), where a DequantizeLinear of the codes would run on every inference."""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from ..errors import UserError
from .qdq import QDQFormat


class Float32(QDQFormat):
    name = "float32"
    weight_only = True
    code_dtype = np.dtype(np.int8)

    def check(self, target, layer):
        layer = super().check(target, layer)
        if layer.granularity == "block":
            raise UserError(f"the float32 weight format stores per-channel or per-tensor steps: layer {target.node} "
                            "has block-wise ones")
        return layer

    def stored_bytes(self, codes) -> int:
        return 4 * int(codes.size)

    @staticmethod
    def values(layer) -> np.ndarray:
        """codes x scale in float32, in the shape the node reads (``Layer.graph_shape`` or the weight's)."""
        t = layer.target
        scale = layer.scale.astype(np.float32)
        if scale.ndim == 1:  # per channel: along the weight's channel axis
            scale = scale.reshape([-1 if a == t.channel_axis else 1 for a in range(layer.codes.ndim)])
        w = (layer.codes.astype(np.float32) * scale).astype(np.float32)
        return w.reshape(t.graph_shape) if t.graph_shape is not None else w

    def weight_input(self, em, layer) -> str:
        name = f"{layer.target.w}_dequantized"
        if name not in em.inits:
            em.inits[name] = numpy_helper.from_array(self.values(layer), name)
        return name
