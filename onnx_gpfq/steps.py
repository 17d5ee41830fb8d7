"""Checks on the weight steps the core computes, and the step of all-zero output channels.

Every step written to the model must be finite and > 0 in float32 (a tiny C can underflow it).
An output channel whose weights are all zero has a free step (its codes are 0 whatever the step),
but with a quantized input its bias becomes int32 codes on the grid x_scale * w_step: a step that
ignores the bias (1.0) moves the bias, and so the channel's whole output, by up to half a grid
step. Its step is chosen instead so that onnxruntime's DequantizeLinear, float(code) * scale in
float32, gives the float bias back exactly.
"""

from __future__ import annotations

import numpy as np

from .errors import UserError


def check_weights_finite(targets, index) -> None:
    """A weight with NaN or Inf cannot be quantized (its step would be NaN): one line naming it."""
    for t in targets:
        if not np.isfinite(index.array(t.w)).all():
            raise UserError(f"layer {t.node}: its weight {t.w!r} holds NaN or Inf values")


def check_steps(node: str, scale: np.ndarray, c) -> None:
    """Every step finite and > 0 in float32, else one line naming the layer."""
    s = np.asarray(scale, np.float32)
    if not (np.isfinite(s).all() and (s > 0).all()):
        bad = s[~(np.isfinite(s) & (s > 0))].reshape(-1)[0]
        raise UserError(f"layer {node}: a weight step is {bad} in float32 (C = {float(np.median(c)):g}): "
                        "choose a C nearer 1 (--c)")


def _bias_exact(bias: np.ndarray, x_scale: np.float32, step: np.float32) -> bool:
    """Whether the bias survives int32 quantization on x_scale * step exactly (as rewrite and onnxruntime compute it)."""
    v = np.float32(x_scale) * np.float32(step)
    if not (np.isfinite(v) and v > 0):
        return False
    codes = np.round(bias.astype(np.float64) / np.float64(v))
    if np.abs(codes).max() >= 2**31 - 1:
        return False
    return bool(np.all(codes.astype(np.float32) * v == bias))  # float(int32 code) * scale, in float32


def exact_step(bias: np.ndarray, x_scale: float) -> np.float32 | None:
    """A step s (float32) with which every value of ``bias`` is exactly code * fl32(x_scale * s), or None."""
    bias = np.asarray(bias, np.float32).reshape(-1)
    nonzero = np.abs(bias[bias != 0])
    if nonzero.size == 0 or not np.isfinite(nonzero).all():
        return None
    sx = np.float32(x_scale)
    smallest = float(nonzero.min())
    # grid candidates: the smallest |b| itself (code +-1 when there is one value), and the finest
    # power of two that holds every value (the least significant bit of the smallest one)
    targets = [smallest, smallest / 2, smallest / 4, 2.0 ** (np.frexp(smallest)[1] - 24)]
    for target in targets:
        s0 = np.float32(target / float(sx))
        if not (np.isfinite(s0) and s0 > 0):
            continue
        for direction in (np.float32(np.inf), np.float32(0)):
            s = s0
            for _ in range(8):
                if s > 0 and np.isfinite(s) and _bias_exact(bias, sx, s):
                    return s
                s = np.nextafter(s, direction)
    return None


def zero_channel_steps(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, x_scale: float | None) -> np.ndarray:
    """``scale`` (per channel (N,), or one value) with the steps of all-zero channels replaced by
    exact ones for their bias. codes: the core's (g, N0, N1g); bias: float32, N values."""
    if bias is None or x_scale is None:
        return scale
    bias = np.asarray(bias, np.float32).reshape(-1)
    zero = ~codes.any(axis=1).reshape(-1)  # (N,) output channels whose codes are all 0
    if not zero.any() or zero.size != bias.size:
        return scale
    scale = np.array(scale, np.float32)
    if scale.ndim == 0:  # one step for the layer: free only when every channel is zero
        if zero.all():
            s = exact_step(bias, x_scale)
            if s is not None:
                scale = np.array(s, np.float32)
        return scale
    for j in np.flatnonzero(zero):
        s = exact_step(bias[j:j + 1], x_scale)
        if s is not None:
            scale[j] = s
    return scale
