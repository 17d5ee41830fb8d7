"""int8: codes in int8 containers, which onnxruntime runs on its integer kernels (QLinearConv,
QGemm, MatMulInteger, ...) when the input is quantized too. Any width up to 8 bits."""

from __future__ import annotations

import numpy as np

from .qdq import QDQFormat


class Int8(QDQFormat):
    name = "int8"
    code_dtype = np.dtype(np.int8)

    def stored_bytes(self, codes: np.ndarray) -> int:
        return int(codes.size)
