"""The protocol every weight format implements.

A format decides how a quantized layer's integer codes are stored in the output graph and what
that needs: the opset (``min_opset``), extra operator domains (``domains``), whether the layer's
input stays float (``weight_only``), the code range it can hold (``check``, ``adjust_spec``), the
bytes the codes take (``stored_bytes``) and the nodes it emits (``emit``). Formats are stateless singletons
looked up by name in ``FORMATS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx

from ..errors import UserError

if TYPE_CHECKING:  # the rewrite's types; formats are called from it
    from ..ops import Layer
    from ..rewrite import Emitter, QuantizedLayer


class WeightFormat:
    name: ClassVar[str]
    min_opset: ClassVar[int] = 13  # per-channel DequantizeLinear (axis)
    domains: ClassVar[dict[str, int]] = {}  # operator domains beyond ai.onnx the emitted nodes use
    weight_only: ClassVar[bool] = False  # layers stored this way read their input in float
    max_bits: ClassVar[int] = 8  # widest codes the container holds
    runtime_uint8: ClassVar[bool] = False  # its int8 kernel quantizes the input to uint8 at run time (weight_only too)

    def for_layer(self, target: "Layer") -> "WeightFormat":
        """The format a layer actually gets (a format that cannot store an op hands it to another)."""
        return self

    def check(self, target: "Layer", layer):
        """The layer's options (``options.LayerOptions``), adjusted to what the format needs;
        UserError when the format cannot store them."""
        bits = layer.weight_bits
        if bits != "ternary" and bits > self.max_bits:
            raise UserError(f"--weight-format {self.name} holds at most {self.max_bits}-bit codes: "
                            f"layer {target.node} has {bits} bits")
        return layer

    def adjust_spec(self, target: "Layer", spec):
        """The core's spec (``core.QuantSpec``) for a layer stored in this format. A format whose
        kernels take a narrower code range than the bit width gives restricts ``spec.alphabet``."""
        return spec

    def stored_bytes(self, codes: np.ndarray) -> int:
        """Bytes the layer's codes take in the output model."""
        raise NotImplementedError

    @staticmethod
    def layer_info(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> dict | list[dict] | None:
        """For ``inspect``: a node of the format's own op type as a quantized layer (node, op_type,
        weight, weight_shape, bits, granularity, format, scale) or a list of them, or None. QDQ formats have none:
        inspect finds their layers by the DequantizeLinear on the weight."""
        return None

    def emit(self, em: "Emitter", node: onnx.NodeProto, layer: "QuantizedLayer", inputs: list[str],
             outputs: list[str]) -> None:
        """Append to ``em`` the nodes and initializers that compute ``node`` with ``layer``'s codes.
        inputs: the node's inputs, rewired to the quantized activations; outputs: its outputs."""
        raise NotImplementedError
