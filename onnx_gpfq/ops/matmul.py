"""MatMul with a constant 2-D right operand W (K, N): X holds the input's last axis, one row per
token (every position of the leading axes after the sample axis)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Layer, tokens


@dataclass(frozen=True, kw_only=True)
class MatMul(Layer):
    OP_TYPE: ClassVar[str] = "MatMul"
    BIAS_INPUT: ClassVar[int | None] = None

    @classmethod
    def parse(cls, node, index, shape, attrs):
        if len(shape) != 2:
            return f"MatMul weight of rank {len(shape)} (only 2-D weights are supported)"
        return cls(**cls.node_fields(node, shape))

    @property
    def channel_axis(self) -> int:
        return 1

    @property
    def fan_in_axis(self) -> int:
        return 0

    @property
    def fan_in(self) -> int:
        return self.w_shape[0]

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        return w[None]

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        return m[0]

    def rows_per_sample(self, x_shape):
        return tokens(x_shape)

    def row_tokens(self, x_shape, positions):
        if len(x_shape) != 3:
            return None
        samples, length = x_shape[0], x_shape[1]
        picked = np.broadcast_to(np.arange(length), (samples, length)) if positions is None else positions
        return (np.arange(samples)[:, None] * length + picked).reshape(-1)

    def rows(self, x, positions):
        x = np.asarray(x, dtype=np.float32)
        k = x.shape[-1]
        if x.ndim <= 2 or positions is None:
            return x.reshape(1, -1, k)
        per_sample = x.reshape(x.shape[0], -1, k)
        return per_sample[np.arange(x.shape[0])[:, None], positions].reshape(1, -1, k)
