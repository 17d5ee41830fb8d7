"""matmulnbits: a MatMul becomes com.microsoft MatMulNBits (4-bit codes, block-wise scales along
the fan-in, float input). Other layers are stored as int8."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from onnx import helper, numpy_helper

from ..errors import UserError
from .base import WeightFormat
from .int8 import Int8


_INT8 = Int8()


class MatMulNBits(WeightFormat):
    name = "matmulnbits"
    domains = {"com.microsoft": 1}
    weight_only = True  # MatMulNBits reads a float input by design
    max_bits = 4
    REPLACES = "MatMul"  # the one op type MatMulNBits computes

    def for_layer(self, target):
        return self if target.op_type == self.REPLACES else _INT8

    def check(self, target, layer):
        bits = layer.weight_bits
        if bits != "ternary" and bits > self.max_bits:
            raise UserError(f"--weight-format matmulnbits stores 4-bit codes: layer {target.node} has {bits} bits")
        bs = layer.block_size
        if bs < 16 or bs & (bs - 1):
            raise UserError(f"MatMulNBits needs a block size that is a power of two >= 16 (got {bs})")
        return replace(layer, granularity="block")

    def stored_bytes(self, codes) -> int:
        return (int(codes.size) + 1) // 2

    def emit(self, em, node, layer, inputs, outputs):
        """MatMul(x, W) -> MatMulNBits(x, packed codes, block scales).

        MatMulNBits stores unsigned codes u = q + 8 (its default zero point is 8), two per byte,
        low nibble first, as B[N, n_blocks, block_size / 2], and scales as [N * n_blocks].
        """
        t, bs = layer.target, layer.block_size
        k, n = t.w_shape
        n_blocks = -(-k // bs)
        u = np.full((n_blocks * bs, n), 8, np.uint8)
        u[:k] = (layer.codes.astype(np.int16) + 8).astype(np.uint8)
        u = u.T.reshape(n, n_blocks, bs)
        packed = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
        b_name, s_name = f"{t.w}_nbits", f"{t.w}_nbits_scales"
        em.inits[b_name] = numpy_helper.from_array(packed, b_name)
        em.inits[s_name] = numpy_helper.from_array(layer.scale.astype(np.float32).T.reshape(-1), s_name)
        em.nodes.append(helper.make_node("MatMulNBits", [inputs[0], b_name, s_name], outputs, name=node.name,
                                         domain="com.microsoft", K=k, N=n, bits=4, block_size=bs))

    @staticmethod
    def layer_info(node, inits) -> dict | None:
        """What ``inspect`` reports for a MatMulNBits node, or None for any other node."""
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        scale = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        return dict(node=node.name, op_type=MatMulNBits.REPLACES, weight=node.input[1],
                    weight_shape=(int(attrs["K"]), int(attrs["N"])), bits=int(attrs.get("bits", 4)),
                    granularity="block", format="MatMulNBits", scale=scale)
