"""dynamic: an LSTM becomes com.microsoft DynamicQuantizeLSTM, which reads W and R as int8 codes with
per-channel scales and quantizes its input and hidden state to uint8 at run time (onnxruntime has no
LSTM kernel on a static QDQ input). Its gate products run on onnxruntime's u8s8 GEMM: the only int8
LSTM it has. Other layers, and an LSTM with an attribute it does not take, get the float32 format.

Measured on the ddddocr CRNN's BiLSTM (BENCHMARKS.md, placement section): the LSTM's time drops from
about 5.3 to 2.5 ms per sample against the float LSTM onnxruntime's own W8A8 model keeps, at 0.2 dB of
output SQNR. While only W is quantized (the capture of R's rows), the node runs in float on the
dequantized W (``Float32``): the R rows are the hidden states of the network with W quantized."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from ..errors import UserError
from .float32 import Float32

_FLOAT32 = Float32()


class DynamicLSTM(Float32):
    name = "dynamic"
    domains = {"com.microsoft": 1}
    runtime_uint8 = True  # its int8 GEMMs read activations quantized to uint8 at run time (the pair bound applies)
    REPLACES = "LSTM"
    ATTRIBUTES = ("activation_alpha", "activation_beta", "activations", "clip", "direction", "hidden_size", "input_forget")

    def for_layer(self, target):
        return self if target.op_type == self.REPLACES else _FLOAT32

    def check(self, target, layer):
        bits = layer.weight_bits
        if bits != "ternary" and bits > self.max_bits:
            raise UserError(f"DynamicQuantizeLSTM holds at most 8-bit codes: layer {target.node} has {bits} bits")
        if layer.granularity == "block":
            raise UserError(f"DynamicQuantizeLSTM takes per-channel or per-tensor steps: layer {target.node} has "
                            "block-wise ones")
        return layer

    def stored_bytes(self, codes) -> int:
        return int(codes.size)

    @staticmethod
    def supports(node) -> bool:
        """DynamicQuantizeLSTM has LSTM's attributes but layout (0 only: time-major)."""
        return all(a.name in DynamicLSTM.ATTRIBUTES or (a.name == "layout" and a.i == 0) for a in node.attribute)

    def weight_input(self, em, layer) -> str:
        """The float values (read while the node's other weight is not quantized yet) and, for
        ``emit``, the codes as DynamicQuantizeLSTM takes them: (D, fan-in, G*H), scales and zero points
        (D, G*H) or (D,)."""
        t = layer.target
        d, gh, fan_in = t.graph_shape
        codes = layer.codes.astype(np.int8).reshape(d, gh, fan_in).transpose(0, 2, 1)
        scale = layer.scale.astype(np.float32)
        scale = scale.reshape(d, gh) if scale.ndim == 1 else np.full(d, scale, np.float32)
        for suffix, value in (("codes", codes), ("scale", scale), ("zero_point", np.zeros(scale.shape, np.int8))):
            name = f"{t.w}_dynamic_{suffix}"
            em.inits[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return super().weight_input(em, layer)

    def emit(self, em, node, layer, inputs, outputs):
        """With W and R both quantized (``layer`` is R's), one DynamicQuantizeLSTM node; else the LSTM
        on W's float values."""
        t = layer.target
        w = node.input[1]
        inputs = list(inputs)
        inputs[t.WEIGHT_INPUT] = self.weight_input(em, layer)
        if t.OWN_OUTPUT is None or f"{w}_dynamic_codes" not in em.inits or not self.supports(node):
            em.nodes.extend(t.emit(node, inputs, outputs))
            return
        inputs += [""] * (8 - len(inputs))
        inputs[1], inputs[2] = f"{w}_dynamic_codes", f"{t.w}_dynamic_codes"
        inputs += [f"{w}_dynamic_scale", f"{w}_dynamic_zero_point", f"{t.w}_dynamic_scale", f"{t.w}_dynamic_zero_point"]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in self.ATTRIBUTES}
        em.nodes.append(helper.make_node("DynamicQuantizeLSTM", inputs, outputs, name=node.name, domain="com.microsoft",
                                         **attrs))

    @staticmethod
    def layer_info(node, inits) -> list[dict] | None:
        """For ``inspect``: W and R of a DynamicQuantizeLSTM node as two quantized layers."""
        if node.op_type != "DynamicQuantizeLSTM" or node.domain != "com.microsoft":
            return None
        out = []
        for k, s in ((1, 8), (2, 10)):
            codes = numpy_helper.to_array(inits[node.input[k]])
            scale = numpy_helper.to_array(inits[node.input[s]]).astype(np.float64)
            hi = int(np.abs(codes.astype(np.int64)).max(initial=0))
            bits = "ternary" if hi <= 1 else next(b for b in range(2, 9) if hi <= 2 ** (b - 1) - 1 or b == 8)
            out.append(dict(node=node.name, op_type=DynamicLSTM.REPLACES, weight=node.input[k],
                            weight_shape=tuple(int(x) for x in codes.shape), bits=bits,
                            granularity="channel" if scale.ndim == 2 else "tensor", format="DynamicQuantizeLSTM",
                            scale=scale))
        return out
