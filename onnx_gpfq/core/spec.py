"""What to do with one layer: the alphabet, the sparsity rule, and the QuantSpec that holds them.

Plain data, validated on construction (ValueError with one clear line); the choice tuples
(METHODS, GRANULARITIES, ...) are the values the options layer offers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Default grid of C in delta = C r / K: geometric, ratio ~1.25, 0.1 .. 1.25, with 1.0 in it (so the
# search is never worse than the plain rule C = 1). Measured with per-channel search on correlated
# Gaussian inputs (X mixed along the fan-in, Xt = X + 5% noise), Gaussian and Student-t(4) weights,
# N0 = 256 / 1152 / 4608, ternary / 3 / 4 / 8 bits, GPFQ and RTN: the per-column best C (median)
# is 0.34-0.43 (ternary), 0.52-0.67 (3 bits), 0.66-0.83 (4 bits), ~1.0-1.15 (8 bits) for Gaussian
# weights and drops with heavy tails and wide fan-in (t4, N0 = 4608: 0.13-0.15 ternary, 0.28
# 3 bits, 0.40-0.44 4 bits). C > 1.25 never helped by more than 0.1%. With this grid the layer
# error is within 0.97x-1.084x (median ~1.02x) of the best over a fine 46-point grid 0.12..1.6 in
# all 48 cases; the spec's example grid 0.4..1.5 lost up to 2.8x (heavy tails, low bits).
DEFAULT_C_GRID: tuple[float, ...] = (0.1, 0.125, 0.16, 0.2, 0.25, 0.32, 0.4, 0.5, 0.63, 0.8, 1.0, 1.25)


@dataclass(frozen=True)
class Alphabet:
    """Integer levels lo..hi (codes); a level k stands for the weight k * delta.

    lo < 0 < hi is required (sign-symmetric rounding and the hard-threshold variant need a
    nonzero level on each side).
    """

    lo: int
    hi: int

    def __post_init__(self):
        for name in ("lo", "hi"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"Alphabet.{name} must be an int (got {v!r})")
        if not (self.lo < 0 < self.hi):
            raise ValueError(f"Alphabet needs lo < 0 < hi (got lo={self.lo}, hi={self.hi})")
        if self.hi > 2**31 - 1 or self.lo < -(2**31):
            raise ValueError("Alphabet levels must fit in int32")

    @staticmethod
    def from_bits(bits: int | str, full_range: bool = False) -> "Alphabet":
        """Levels for a bit width: "ternary" -> {-1, 0, 1}; b in 2..8 (int or digit string) ->
        -(2^(b-1) - 1) .. 2^(b-1) - 1, or the full two's-complement -2^(b-1) .. 2^(b-1) - 1."""
        if isinstance(bits, str):
            text = bits.strip().lower()
            if text == "ternary":
                return Alphabet(-1, 1)
            if not text.isdigit():
                raise ValueError(f"bits must be 2..8 or 'ternary' (got {bits!r})")
            bits = int(text)
        if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be 2..8 or 'ternary' (got {bits!r})")
        half = 2 ** (int(bits) - 1)
        return Alphabet(-half, half - 1) if full_range else Alphabet(-(half - 1), half - 1)

    @property
    def K(self) -> int:
        """Largest level magnitude max(|lo|, hi): the step rule is delta = C r / K."""
        return max(-self.lo, self.hi)


@dataclass(frozen=True)
class Sparsity:
    """Sparsity promotion with an absolute threshold lam (weight units).

    soft: q = Quant(sign(z) max(|z| - lam, 0)).
    hard: q = 0 if |z| <= lam, else the nearest *nonzero* level of the uniform alphabet. (The
    paper's hard thresholding uses the shifted grid sign(z)(lam + delta' k), which integer codes
    times one scale cannot store; this is the integer-representable variant.)
    """

    kind: str
    lam: float

    def __post_init__(self):
        if self.kind not in ("soft", "hard"):
            raise ValueError(f"Sparsity.kind must be 'soft' or 'hard' (got {self.kind!r})")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float, np.floating, np.integer)):
            raise ValueError(f"Sparsity.lam must be a number (got {self.lam!r})")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"Sparsity.lam must be finite and >= 0 (got {self.lam!r})")


METHODS = ("gpfq", "rtn")
GRANULARITIES = ("channel", "tensor", "block")
SCALE_RULES = ("search", "fixed")
SEARCHES = ("auto", "full", "coarse")
COARSE_SEARCH_FLOPS = 1e8  # a pass above this (about 5 ms) makes "auto" search coarse to fine


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one layer.

    method: "gpfq" (greedy, data-aware) or "rtn" (round to nearest, the paper's MSQ).
    granularity: "channel" one step per output column; "tensor" one step for the whole layer
      (all groups); "block" one step per output column per block of group_size fan-in rows.
    scale_rule: "search" picks C in delta = C r / K from c_grid by the exact output error;
      "fixed" uses C = c. search_per_channel: choose C per output column (columns are
      independent problems) instead of per layer; ignored (per layer) for "tensor".
    search: "full" runs one pass per C of the grid; "coarse" (grids of 6 or more values) goes
      coarse to fine: every third C from the second on, then the two grid neighbours of each
      column's best (columns take different C in one pass): 6 passes instead of 12 on the default
      grid, the same choice whenever the best C lies within one grid step of the coarse best.
      "auto" (default): "full" where a pass costs at most COARSE_SEARCH_FLOPS (g N0 N1 min(N0, m)
      multiply-adds), "coarse" on larger layers.
    pair_bound: None, or P >= 1: consecutive fan-in rows (2j, 2j+1), in the order W's rows are
      given, get codes whose same-sign magnitudes add up to at most P (|q_2j| + |q_2j+1| <= P when
      both have one sign; see onnx_gpfq.core.rounding), in GPFQ, in RTN and in the step search's errors.
    damp: a ridge term against fitting the calibration rows. GPFQ then minimises
      ||X w - Xt q||^2 + lam ||w - q||^2 with lam = damp x the mean of H[t,t] = ||Xt_t||^2 over the
      fan-in (per group): exactly GPFQ on X and Xt with the rows sqrt(lam) I appended. It pulls each
      decision toward rounding w itself, and makes rows with a zero column of Xt round w (instead of
      0). The step search compares the damped errors; the reported errors are the data term. 0: none.
    upstream: beta in [0, 1], the share of the error quantization upstream leaves in the layer's input,
      (X - Xt) w, that the layer's codes take back: GPFQ fits Xt q to X_b w, X_b = Xt + beta (X - Xt)
      (Moments.blend). 1 (the paper's path following): the whole of it; 0: none, only the layer's own
      rounding error on the inputs it will see, ||Xt (w - q)||^2 (GPTQ's objective). Fitting the
      upstream error also fits its noise on the calibration rows; where those are few, less of it
      generalises better. Reported errors stay those of X (||X w - Xt q||^2); bias correction takes back
      the mean of the fitted error, mu_b^T w - mu_xt^T q (mu_b: X_b's mean).
    """

    alphabet: Alphabet
    method: str = "gpfq"
    granularity: str = "channel"
    group_size: int = 0
    scale_rule: str = "search"
    c: float = 1.0
    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    search_per_channel: bool = True
    search: str = "auto"
    sparsity: Sparsity | None = None
    bias_correction: bool = False
    pair_bound: int | None = None
    damp: float = 0.0
    upstream: float = 1.0

    def __post_init__(self):
        if not isinstance(self.alphabet, Alphabet):
            raise ValueError(f"QuantSpec.alphabet must be an Alphabet (got {self.alphabet!r})")
        if self.method not in METHODS:
            raise ValueError(f"QuantSpec.method must be one of {METHODS} (got {self.method!r})")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantSpec.granularity must be one of {GRANULARITIES} (got {self.granularity!r})")
        gs = self.group_size
        if isinstance(gs, bool) or not isinstance(gs, (int, np.integer)):
            raise ValueError(f"QuantSpec.group_size must be an int (got {gs!r})")
        if self.granularity == "block" and gs < 1:
            raise ValueError(f"granularity='block' needs group_size >= 1 (got {gs})")
        if self.granularity != "block" and gs != 0:
            raise ValueError(f"group_size is only used with granularity='block' (got group_size={gs} "
                             f"with granularity={self.granularity!r}); leave it 0")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"QuantSpec.scale_rule must be one of {SCALE_RULES} (got {self.scale_rule!r})")
        if not _positive_number(self.c):
            raise ValueError(f"QuantSpec.c must be a finite number > 0 (got {self.c!r})")
        try:
            grid = tuple(float(c) for c in self.c_grid)
        except (TypeError, ValueError):
            raise ValueError(f"QuantSpec.c_grid must be a sequence of numbers (got {self.c_grid!r})") from None
        if not grid or not all(_positive_number(c) for c in grid):
            raise ValueError("QuantSpec.c_grid must be a non-empty sequence of finite numbers > 0 "
                             f"(got {self.c_grid!r})")
        object.__setattr__(self, "c_grid", grid)
        if self.search not in SEARCHES:
            raise ValueError(f"QuantSpec.search must be one of {SEARCHES} (got {self.search!r})")
        for name in ("search_per_channel", "bias_correction"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"QuantSpec.{name} must be a bool (got {getattr(self, name)!r})")
        if self.sparsity is not None and not isinstance(self.sparsity, Sparsity):
            raise ValueError(f"QuantSpec.sparsity must be a Sparsity or None (got {self.sparsity!r})")
        pb = self.pair_bound
        if pb is not None and (isinstance(pb, bool) or not isinstance(pb, (int, np.integer)) or pb < 1):
            raise ValueError(f"QuantSpec.pair_bound must be None or an int >= 1 (got {pb!r})")
        if isinstance(self.damp, bool) or not (self.damp == 0 or _positive_number(self.damp)):
            raise ValueError(f"QuantSpec.damp must be a finite number >= 0 (got {self.damp!r})")
        up = self.upstream
        if isinstance(up, bool) or not isinstance(up, (int, float, np.floating, np.integer)) or not 0.0 <= up <= 1.0:
            raise ValueError(f"QuantSpec.upstream must be a number in [0, 1] (got {up!r})")


def _positive_number(x) -> bool:
    return (not isinstance(x, bool) and isinstance(x, (int, float, np.floating, np.integer))
            and math.isfinite(x) and x > 0)

