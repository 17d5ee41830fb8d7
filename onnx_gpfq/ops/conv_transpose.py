"""ConvTranspose as a stride-1 Conv over the zero-upsampled input with the kernel flipped:
W (Cin, Cout, *kernel) as one matrix (Cin * prod(kernel), Cout)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .conv import Window, patches


@dataclass(frozen=True, kw_only=True)
class ConvTranspose(Window):
    OP_TYPE: ClassVar[str] = "ConvTranspose"
    INT8_KERNEL: ClassVar[bool] = False  # onnxruntime's CPU provider runs DequantizeLinear -> float ConvTranspose

    output_padding: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()  # explicit output spatial shape, if given

    @classmethod
    def parse(cls, node, index, shape, attrs):
        if len(shape) < 3:
            return "ConvTranspose weight of rank < 3"
        if int(attrs.get("group", 1)) != 1:
            return "grouped ConvTranspose: its per-output-channel scales cannot be laid out on the weight's axis 1"
        b, reason = cls.constant_bias(node, index)
        if reason:
            return reason
        return cls(b=b, output_padding=tuple(attrs.get("output_padding", ())),
                   output_shape=tuple(attrs.get("output_shape", ())), **cls.node_fields(node, shape),
                   **cls.window_attrs(attrs, shape))

    @property
    def channel_axis(self) -> int:
        return 1

    @property
    def fan_in(self) -> int:
        return self.w_shape[0] * math.prod(self.w_shape[2:])  # Cin * prod(kernel)

    @property
    def patch_key(self) -> tuple:
        return (self.x, self.op_type, self.kernel, self.strides, self.pads, self.dilations, self.auto_pad,
                self.output_padding, self.output_shape)

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        flipped = np.flip(w, axis=tuple(range(2, 2 + len(self.kernel))))
        return np.moveaxis(flipped, 1, -1).reshape(1, -1, w.shape[1])

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        cin, cout, *k = self.w_shape
        w = np.moveaxis(m[0].reshape(cin, *k, cout), -1, 1)
        return np.flip(w, axis=tuple(range(2, 2 + len(k))))

    def rows_per_sample(self, x_shape):
        return math.prod(self._geometry(x_shape)[2])

    def rows(self, x, positions):
        x = np.asarray(x, dtype=np.float32)
        nd = len(self.kernel)
        begin, end, _ = self._geometry(x.shape)
        up_shape = [(x.shape[2 + i] - 1) * self.strides[i] + 1 for i in range(nd)]
        up = np.zeros(x.shape[:2] + tuple(up_shape), x.dtype)
        up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in self.strides)] = x
        xp = np.pad(up, [(0, 0), (0, 0)] + [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)])
        crop = tuple(slice(max(-b, 0), xp.shape[2 + i] - max(-e, 0)) for i, (b, e) in enumerate(zip(begin, end)))
        xp = xp[(slice(None), slice(None)) + crop]
        return patches(xp, self.kernel, (1,) * nd, self.dilations, 1, positions)

    def _geometry(self, x_shape: tuple[int, ...]) -> tuple[list[int], list[int], list[int]]:
        """Pads (negative: a crop) on each side of the upsampled input, and the output spatial shape."""
        nd = len(self.kernel)
        out_pad = list(self.output_padding) or [0] * nd
        begin, end, out = [], [], []
        for i in range(nd):
            size, s, d, k = x_shape[2 + i], self.strides[i], self.dilations[i], self.kernel[i]
            full = s * (size - 1) + out_pad[i] + (k - 1) * d + 1
            if self.output_shape or self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                target = self.output_shape[i] if self.output_shape else size * s
                total = full - target  # the ONNX spec's rule for splitting the total padding
                pb = total // 2 if self.auto_pad == "SAME_UPPER" else total - total // 2
                pe = total - pb
            elif self.auto_pad == "VALID":
                pb = pe = 0
            else:
                pb, pe = self.pads[i], self.pads[nd + i]
            begin.append((k - 1) * d - pb)
            end.append((k - 1) * d - pe + out_pad[i])
            out.append(full - pb - pe)
        return begin, end, out
