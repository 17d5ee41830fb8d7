"""Activation quantization: the range of each tensor that gets QuantizeLinear/DequantizeLinear
(which tensors those are: placement.py).

Ranges are calibrated on the float network, tensor by tensor as the float stream produces them,
before the quantized stream runs past them, so the X~ that GPFQ sees already carries the
activation quantization the output graph applies.
"""

from __future__ import annotations

import math

import numpy as np

from .rewrite import ActQuant, act_quant_from_range, fake_quant

MAX_VALUES = 1 << 20  # values per tensor used by the percentile / MSE searches (seeded subsample)


def calibrate(values: list[np.ndarray], method: str, bits: int, symmetric: bool, percentile: float,
              rng: np.random.Generator) -> ActQuant:
    """Quantization parameters of one tensor from its values over all calibration batches.

    minmax: the full range. percentile: each tail clipped at ``percentile`` (e.g. 99.99).
    mse: the range [a lo, a hi], a in (0, 1], minimising the mean squared fake-quantization error.
    """
    lo, hi = math.inf, -math.inf
    for v in values:
        lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    if method == "minmax" or lo == hi:
        return act_quant_from_range(lo, hi, bits, symmetric)
    sample = _sample(values, rng)
    if method == "percentile":
        p_lo, p_hi = np.percentile(sample, [100.0 - percentile, percentile])
        return act_quant_from_range(float(p_lo), float(p_hi), bits, symmetric)
    best, best_err = None, np.inf
    for a in np.linspace(1.0, 0.05, 40):
        quant = act_quant_from_range(a * lo, a * hi, bits, symmetric)
        err = float(np.mean((fake_quant(sample, quant) - sample) ** 2))
        if err < best_err:
            best, best_err = quant, err
    return best


def _sample(values, rng: np.random.Generator) -> np.ndarray:
    """All values, or about MAX_VALUES of them drawn uniformly (with replacement) from every
    batch in proportion to its size; memory O(MAX_VALUES) whatever the number of batches."""
    entries = values.entries() if hasattr(values, "entries") else values  # no reading of spilled batches
    total = sum(math.prod(e.shape) for e in entries)
    if total <= MAX_VALUES:
        return np.concatenate([v.reshape(-1) for v in values]).astype(np.float64)
    parts = []
    for v in values:
        k = round(MAX_VALUES * v.size / total)
        parts.append(v.reshape(-1)[rng.integers(0, v.size, k)].astype(np.float64))
    return np.concatenate(parts)
