"""Gemm: Y = alpha * A' B' + beta * C with a constant B (K, N) or, with transB, (N, K); W = B' as
one (K, N) matrix, X = A' (one row per sample); C is the bias when it is a per-column vector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Layer


@dataclass(frozen=True, kw_only=True)
class Gemm(Layer):
    OP_TYPE: ClassVar[str] = "Gemm"

    trans_a: bool = False
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0

    @classmethod
    def parse(cls, node, index, shape, attrs):
        if len(shape) != 2:
            return f"Gemm weight of rank {len(shape)} (only 2-D weights are supported)"
        common = dict(**cls.node_fields(node, shape), trans_a=bool(attrs.get("transA", 0)),
                      trans_b=bool(attrs.get("transB", 0)), alpha=float(attrs.get("alpha", 1.0)),
                      beta=float(attrs.get("beta", 1.0)))
        n_out = shape[0] if common["trans_b"] else shape[1]
        c = (list(node.input) + [""] * 3)[cls.BIAS_INPUT] or None
        if c is not None and index.is_constant(c):
            c_shape = tuple(index.initializers[c].dims)
            if c_shape not in ((n_out,), (1, n_out)):
                return f"Gemm C of shape {c_shape} is not a per-column bias"
        elif c is not None:  # an activation added to the product (e.g. a fused MatMul + Add): left as it is
            return cls(b=None, bias_locked=True, **common)
        return cls(b=c, **common)

    @property
    def channel_axis(self) -> int:
        return 0 if self.trans_b else 1

    @property
    def fan_in_axis(self) -> int:
        return 1 if self.trans_b else 0

    @property
    def fan_in(self) -> int:
        return self.w_shape[self.fan_in_axis]

    @property
    def patch_key(self) -> tuple:
        return (self.x, "rows", self.trans_a)

    @property
    def integer_bias(self) -> bool:
        # the int32 bias is added unscaled to the integer product: only when alpha and beta are 1
        return (self.alpha, self.beta) == (1.0, 1.0)

    def bias_correction(self, delta: np.ndarray) -> np.ndarray | None:
        if self.bias_locked:
            return None
        return delta * self.alpha / self.beta  # C enters the output as beta * C, the product as alpha * A'B'

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        return w.T[None] if self.trans_b else w[None]

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        return m[0].T if self.trans_b else m[0]

    def samples(self, x_shape):
        return x_shape[1] if self.trans_a else x_shape[0]

    def rows_per_sample(self, x_shape):
        return 1

    def rows(self, x, positions):
        x = np.asarray(x, dtype=np.float32)
        a = x.T if self.trans_a else x
        return a.reshape(1, a.shape[0], -1)
