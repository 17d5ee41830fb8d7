"""MatMul with a constant 2-D first operand W (M, K) and an activation X (..., K, N): Y = W X.

The problem is transposed: Y^T = X^T W^T, so GPFQ's matrix is W^T (K, M), fan-in K, one output
channel per row of W, and its rows of X are the columns of X (one per position of the last axis
and of the axes before K after the sample axis). A 2-D X (K, N) is one sample of N rows.

onnxruntime (1.32) does not fuse DequantizeLinear(x), DequantizeLinear(W per row) -> MatMul with
the weight first into an integer kernel (``inspect`` reports it not on integer kernels), so the
layer is weight-only: X stays float and the MatMul runs on the dequantized W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Layer


@dataclass(frozen=True, kw_only=True)
class MatMulLeft(Layer):
    OP_TYPE: ClassVar[str] = "MatMul"
    WEIGHT_INPUT: ClassVar[int] = 0
    BIAS_INPUT: ClassVar[int | None] = None
    INT8_KERNEL: ClassVar[bool] = False

    @classmethod
    def parse(cls, node, index, shape, attrs):
        if len(shape) != 2:
            return f"MatMul constant first operand of rank {len(shape)} (only 2-D is supported)"
        return cls(**cls.node_fields(node, shape))

    @classmethod
    def node_fields(cls, node, shape):
        return dict(node=node.name, x=node.input[1], w=node.input[0], w_shape=shape)

    @property
    def channel_axis(self) -> int:
        return 0

    @property
    def fan_in(self) -> int:
        return self.w_shape[1]

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        return w.T[None]

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        return m[0].T

    def samples(self, x_shape):
        return 1 if len(x_shape) <= 2 else x_shape[0]

    def rows_per_sample(self, x_shape):
        return x_shape[-1] * (math.prod(x_shape[1:-2]) if len(x_shape) > 2 else 1)

    def rows(self, x, positions):
        x = np.swapaxes(np.asarray(x, dtype=np.float32), -1, -2)  # (..., N, K)
        k = x.shape[-1]
        per_sample = x.reshape(1 if x.ndim <= 2 else x.shape[0], -1, k)
        if positions is not None:
            per_sample = per_sample[np.arange(per_sample.shape[0])[:, None], positions]
        return per_sample.reshape(1, -1, k)
