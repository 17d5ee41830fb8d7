"""int4: codes packed two per byte as ONNX INT4 (opset 21), for codes of at most 4 bits."""

from __future__ import annotations

import onnx
from onnx import helper

from .qdq import QDQFormat


class Int4(QDQFormat):
    name = "int4"
    min_opset = 21
    max_bits = 4
    code_dtype = helper.tensor_dtype_to_np_dtype(onnx.TensorProto.INT4)

    def stored_bytes(self, codes) -> int:
        return (int(codes.size) + 1) // 2
