"""Activation quantization: the candidate ranges of each tensor that gets QuantizeLinear/DequantizeLinear
(``act_ranges`` chooses among them; which tensors those are: placement.py).

Ranges are calibrated on the float network, tensor by tensor as the float stream produces them,
before the quantized stream runs past them, so the X~ that GPFQ sees already carries the
activation quantization the output graph applies.
"""

from __future__ import annotations

import math

import numpy as np

from .rewrite import act_quant_from_range, fake_quant

MAX_VALUES = 1 << 20  # values per tensor used by the percentile / MSE searches (seeded subsample)


def candidate_ranges(sample: np.ndarray, lo: float, hi: float, bits: int, symmetric: bool,
                     percentiles: tuple[float, ...], mse_sample: np.ndarray | None) -> dict[str, tuple[float, float]]:
    """The clip range [a, b] of the single rules for one tensor, by rule name, in a fixed order.

    sample: the tensor's values (``value_sample``); lo, hi: its full range over all batches.
    minmax: [lo, hi]. percentile:P (one per level P, e.g. 99.99): each tail clipped at P.
    mse: [a lo, a hi], a in (0, 1] on a grid of 40, minimising the mean squared fake-quantization
    error over ``mse_sample`` (the sample, or a part of it; None: no mse). A constant tensor has only
    minmax.
    """
    ranges = {"minmax": (lo, hi)}
    if lo == hi:
        return ranges
    if percentiles:
        tails = percentiles_of(sample, [q for p in percentiles for q in (100.0 - p, p)])
        for i, p in enumerate(percentiles):
            ranges[f"percentile:{p:g}"] = (float(tails[2 * i]), float(tails[2 * i + 1]))
    if mse_sample is None:
        return ranges
    sample = mse_sample
    best, best_err = None, np.inf
    for a in np.linspace(1.0, 0.05, 40):
        quant = act_quant_from_range(a * lo, a * hi, bits, symmetric)
        err = float(np.mean((fake_quant(sample, quant) - sample) ** 2))
        if err < best_err:
            best, best_err = (float(a * lo), float(a * hi)), err
    ranges["mse"] = best
    return ranges


def percentiles_of(sample: np.ndarray, levels: list[float]) -> list[float]:
    """np.percentile(sample, levels) (linear interpolation, the same float64 values) from
    partitions that set the tails apart and a sort of the tails alone: the levels of a range are
    far out in the tails, where a partition per level over the whole sample costs most."""
    n = sample.size
    at = [p / 100.0 * (n - 1) for p in levels]
    below = [h for h, p in zip(at, levels) if p < 50.0]
    above = [h for h, p in zip(at, levels) if p >= 50.0]
    lo_end = int(math.floor(max(below))) + 2 if below else 0  # sorted[:lo_end] holds every index needed below
    hi_start = int(math.floor(min(above))) if above else n
    if lo_end >= hi_start:
        return [float(v) for v in np.percentile(sample, levels)]
    # one kth per call: numpy's partition with two kth values is ~30x slower than two calls
    part = np.partition(sample, hi_start) if hi_start < n else sample
    high = np.sort(part[hi_start:])
    low = np.sort(np.partition(part[:hi_start], lo_end - 1)[:lo_end]) if lo_end else high[:0]
    out = []
    for h, p in zip(at, levels):
        i = int(math.floor(h))
        j = min(i + 1, n - 1)
        a, b = (low[i], low[j]) if p < 50.0 else (high[i - hi_start], high[j - hi_start])
        t, d = h - i, b - a
        out.append(float(b - d * (1 - t) if t >= 0.5 else a + d * t))  # numpy's _lerp
    return out


def value_sample(values, rng: np.random.Generator, limit: int = MAX_VALUES) -> np.ndarray:
    """A tensor's values over all calibration batches, flat float64: all of them, or about
    ``limit`` (MAX_VALUES) drawn uniformly (with replacement) from every batch in proportion to its
    size; memory O(limit) whatever the number of batches."""
    entries = values.entries() if hasattr(values, "entries") else values  # no reading of spilled batches
    total = sum(math.prod(e.shape) for e in entries)
    if total <= limit:
        return np.concatenate([v.reshape(-1) for v in values]).astype(np.float64)
    parts = []
    for v in values:
        k = round(limit * v.size / total)
        parts.append(v.reshape(-1)[rng.integers(0, v.size, k)].astype(np.float64))
    return np.concatenate(parts)
