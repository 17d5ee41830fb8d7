"""Conv: W (Cout, C/g, *kernel) as g matrices (C/g * prod(kernel), Cout/g); X = im2col patches of
the input, unfolded with the node's real kernel, strides, pads, dilations and groups."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..cpu import conv_kernel_order
from .base import Layer


@dataclass(frozen=True, kw_only=True)
class Window(Layer):
    """The sliding-window attributes Conv and ConvTranspose share."""

    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # ONNX order: all begins, then all ends (auto_pad resolved per input)
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"

    @staticmethod
    def window_attrs(attrs: dict, shape: tuple[int, ...]) -> dict:
        """kernel, strides, pads, dilations and auto_pad of a node, ONNX defaults filled in."""
        nd = len(shape) - 2
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        return dict(kernel=tuple(int(k) for k in attrs.get("kernel_shape", shape[2:])),
                    strides=tuple(attrs.get("strides", (1,) * nd)), pads=tuple(attrs.get("pads", (0,) * (2 * nd))),
                    dilations=tuple(attrs.get("dilations", (1,) * nd)), auto_pad=auto_pad or "NOTSET")

    @classmethod
    def constant_bias(cls, node, index) -> tuple[str | None, str | None]:
        """The bias input (None without one), or the reason the node stays in float."""
        b = (list(node.input) + [""] * 3)[cls.BIAS_INPUT] or None
        if b is not None and not index.is_constant(b):
            return None, f"{node.op_type} bias is not constant"
        return b, None


@dataclass(frozen=True, kw_only=True)
class Conv(Window):
    OP_TYPE: ClassVar[str] = "Conv"
    QUANTIZE_OUTPUT: ClassVar[bool] = True  # DQ -> Conv -> (Relu) -> Q fuses into QLinearConv

    groups: int = 1

    @classmethod
    def parse(cls, node, index, shape, attrs):
        if len(shape) < 3:
            return "Conv weight of rank < 3"
        b, reason = cls.constant_bias(node, index)
        if reason:
            return reason
        return cls(b=b, groups=int(attrs.get("group", 1)), **cls.node_fields(node, shape),
                   **cls.window_attrs(attrs, shape))

    @property
    def channel_axis(self) -> int:
        return 0

    @property
    def fan_in(self) -> int:
        return math.prod(self.w_shape[1:])  # C/g * prod(kernel)

    def kernel_order(self) -> np.ndarray:
        """onnxruntime's int8 Conv reduces over (kernel..., channel) within each group, after its NHWC
        rewrite (measured: onnx_gpfq.cpu)."""
        return conv_kernel_order(self.w_shape[1], self.kernel)

    @property
    def patch_key(self) -> tuple:
        return (self.x, self.op_type, self.groups, self.kernel, self.strides, self.pads, self.dilations, self.auto_pad)

    @property
    def integer_bias(self) -> bool:
        return True

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(self.groups, w.shape[0] // self.groups, -1).transpose(0, 2, 1)

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        return m.transpose(0, 2, 1).reshape(self.w_shape)

    def rows_per_sample(self, x_shape):
        begin, end = self.explicit_pads(x_shape)
        out = [(x_shape[2 + i] + begin[i] + end[i] - (self.dilations[i] * (k - 1) + 1)) // self.strides[i] + 1
               for i, k in enumerate(self.kernel)]
        return math.prod(out)

    def rows(self, x, positions):
        x = np.asarray(x, dtype=np.float32)
        begin, end = self.explicit_pads(x.shape)
        if positions is not None:  # a few positions per sample: gathered, the input is not padded whole
            out = [(x.shape[2 + i] + begin[i] + end[i] - (self.dilations[i] * (k - 1) + 1)) // self.strides[i] + 1
                   for i, k in enumerate(self.kernel)]
            return gathered_patches(x, self.kernel, self.strides, self.dilations, begin, out, self.groups, positions)
        xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
        return patches(xp, self.kernel, self.strides, self.dilations, self.groups, positions)

    def explicit_pads(self, x_shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
        """Begin and end pads for an input of ``x_shape``, auto_pad resolved as the ONNX spec says."""
        nd = len(self.kernel)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for i in range(nd):
                size = x_shape[2 + i]
                ext = self.dilations[i] * (self.kernel[i] - 1) + 1
                total = max((-(-size // self.strides[i]) - 1) * self.strides[i] + ext - size, 0)
                small, big = total // 2, total - total // 2
                begin.append(small if self.auto_pad == "SAME_UPPER" else big)
                end.append(big if self.auto_pad == "SAME_UPPER" else small)
            return begin, end
        if self.auto_pad == "VALID":
            return [0] * nd, [0] * nd
        return list(self.pads[:nd]), list(self.pads[nd:])


def patches(xp: np.ndarray, kernel, strides, dilations, groups: int, positions: np.ndarray | None) -> np.ndarray:
    """Unfold a padded input (N, C, *S) into conv patches (g, N*P, C/g * prod(kernel)).

    Each row is one output position's receptive field, channel-major then kernel positions (the
    order of a Conv weight (Cout, C/g, *kernel) flattened). positions: (N, P) output positions per
    sample to keep, or None for all.
    """
    nd = len(kernel)
    ext = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    win = sliding_window_view(xp, ext, axis=tuple(range(2, 2 + nd)))  # (N, C, *P, *ext)
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, d) for d in dilations)]  # (N, C, *O, *k)
    out = win.shape[2:2 + nd]
    n = xp.shape[0]
    if positions is None:
        positions = np.broadcast_to(np.arange(math.prod(out)), (n, math.prod(out)))
    coords = np.unravel_index(positions.reshape(-1), out)
    sample = np.repeat(np.arange(n), positions.shape[1])
    rows = win[(sample, slice(None)) + tuple(coords)]  # (N*P, C, *k)
    rows = rows.reshape(rows.shape[0], groups, -1)  # channel-major, then kernel positions
    return np.ascontiguousarray(rows.transpose(1, 0, 2))


def gathered_patches(x: np.ndarray, kernel, strides, dilations, begin, out, groups: int,
                     positions: np.ndarray) -> np.ndarray:
    """``patches`` of the input padded by ``begin`` (and zeros beyond its end), for the given
    output positions only (positions (N, P) into the output grid ``out``), without padding the
    whole input: each kernel tap is read from x where it falls inside, +0.0 where it falls in the
    padding. The same values as ``patches(np.pad(x, ...), ...)``, at the cost of the rows kept."""
    nd = len(kernel)
    n = x.shape[0]
    r = positions.size
    coords = np.unravel_index(positions.reshape(-1), out)
    idx, valid = [], np.ones((r, *kernel), bool)
    for i in range(nd):  # input coordinate of tap k along axis i: o * stride - begin + k * dilation
        c = coords[i][:, None] * strides[i] - begin[i] + np.arange(kernel[i])[None, :] * dilations[i]
        shape = [r] + [1] * nd
        shape[1 + i] = kernel[i]
        c = c.reshape(shape)
        valid &= (c >= 0) & (c < x.shape[2 + i])
        idx.append(np.clip(c, 0, x.shape[2 + i] - 1))
    sample = np.repeat(np.arange(n), positions.shape[1]).reshape([r] + [1] * nd)
    c = x.shape[1]
    x = np.ascontiguousarray(x)
    # one flat index per tap into x (N, C, *S): offset of (sample, tap) plus channel * prod(S), so that
    # np.take gives (C, R, *k) in C order directly
    flat = sample * (c * math.prod(x.shape[2:]))
    for i in range(nd):
        flat = flat + idx[i] * math.prod(x.shape[3 + i:])
    flat = flat[None] + (np.arange(c) * math.prod(x.shape[2:])).reshape([c] + [1] * (1 + nd))
    taps = np.take(x.reshape(-1), flat)
    np.copyto(taps, np.float32(0.0), where=~valid)  # taps in the padding: +0.0, as np.pad gives
    taps = taps.reshape(groups, c // groups, r, -1)  # (g, C/g, R, prod(k))
    if c // groups > 1:  # rows channel-major, then kernel positions (depthwise: already in place)
        taps = np.ascontiguousarray(taps.transpose(0, 2, 1, 3))
    return taps.reshape(groups, r, -1)
