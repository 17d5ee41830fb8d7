"""GPFQ math core: greedy path-following quantization of one layer. Knows nothing about ONNX.

A layer computes ``Y = X W`` with ``X`` (m, N0) and ``W`` (N0, N1), one column per output neuron.
``X`` is the layer input in the float network, ``Xt`` (X~) the same input in the partially
quantized network. For every column GPFQ walks the fan-in t = 0..N0-1 and picks

    z_t = ( sum_{s<=t} G[t,s] W[s] - sum_{s<t} H[t,s] Q[s] ) / H[t,t],   q_t = Quant(z_t)

with ``G = Xt^T X``, ``H = Xt^T Xt`` (the Gram form), which is the residual form
``z_t = <Xt_t, u_{t-1} + w_t X_t> / ||Xt_t||^2``, ``u_t = u_{t-1} + w_t X_t - q_t Xt_t`` with
the residual eliminated (see shared/GPFQ.md). Both forms are implemented; they take the same
decisions up to floating-point ties. Q holds dequantized values (code * delta).

Grouped / depthwise convolutions are ``g`` independent problems: all arrays carry a leading
group axis g; W is (g, N0, N1g) with N0 the fan-in per group and N1g the outputs per group.

Pair bound (QuantSpec.pair_bound = P): onnxruntime's default x86 int8 kernels without VNNI
(AVX2 / AVX-512BW u8s8, built on vpmaddubsw) add the products of uint8 activations and int8
weights two at a time into int16 with saturation: a_2j q_2j + a_2j+1 q_2j+1 must fit in int16
for every a in 0..255, i.e. 255 (|q_2j| + |q_2j+1|) <= 32767, so |q_2j| + |q_2j+1| <= 128.
GPFQ walks the fan-in in order and enforces the bound as it goes: the first row of a pair
takes its level from [-P, P], the second from [-(P - |q_2j|), P - |q_2j|] (both intersected
with the alphabet), and the greedy step compensates what the narrowed range costs in the rows
that follow. RTN clips the second row of each pair the same way. Pairs are rows (0, 1), (2, 3),
... of each group in the order W's rows are given (the caller permutes them into the kernel's
reduction order); with N0 odd the last row is unpaired (range [-P, P]).

Units: W, Q, delta, lam are in weight units; G, H, F in (input units)^2; errors in output units^2.
Everything is float64 internally and deterministic (same input -> same bits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import _kernels

# Rows of the fan-in per block of the blocked forward substitution (Gram form): one GEMM per block
# for all earlier rows, a B x B triangle in numba inside. 128 measured best at N0 = N1 = 2048.
GRAM_BLOCK = 128
# Residual form: per block of B rows two GEMMs cost ~4 m B N1 flops and the numba triangle
# ~B^2 N1; see residual_block() for the choice of B.
RESIDUAL_CHUNK = 1024  # fan-in rows per GEMM when evaluating ||XW - Xt Q||^2 from the rows
# Residual form with at most this many calibration rows runs fused, row by row in numba, all C of
# the grid in one sweep (see _kernels.residual_lanes); more rows: blocked with BLAS (_Residual).
RESIDUAL_FUSED_MAX_M = 64
# Columns per tile of the fused kernel. Measured (single thread, N0 = 4608, N1 = 512, 12 + 12
# lanes): 512 fastest for m = 1..64 (128: +5-15%, 2048: +0-10%), although V and the lanes' R
# then outgrow L2 at m = 64 (6.8 MB): long vector loops matter more than cache residency.
RESIDUAL_TILE = 512
# H[t,t] <= DEAD_TOL * max_s H[s,s] counts as a zero column of Xt: q_t = 0.
DEAD_TOL = 1e-12
GRAM_CHUNK_BYTES = 32 << 20  # Gram form: rows gathered before one product per matrix
ERROR_LANES_BYTES = 256 << 20  # RTN search: lanes whose errors are computed in one product
PROJECTED_BLOCK = 256  # fan-in rows per block of the projected Gram accumulation

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


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


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
      given, get codes with |q_2j| + |q_2j+1| <= P (see the module docstring), in GPFQ, in RTN
      and in the step search's errors.
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


def _positive_number(x) -> bool:
    return (not isinstance(x, bool) and isinstance(x, (int, float, np.floating, np.integer))
            and math.isfinite(x) and x > 0)


# ----------------------------------------------------------------------------------------------
# Calibration statistics
# ----------------------------------------------------------------------------------------------


class Moments:
    """Accumulates, over calibration batches, what one layer needs.

    A grouped/depthwise conv is ``groups`` independent problems: all arrays carry a leading group
    axis g. N0 = fan-in per group.

    form "gram": float64 G = Xt^T X, H = Xt^T Xt, F = X^T X, each (g, N0, N0).
    form "gram" with the layer's weights W (g, N0, N1g) given ("projected"): H, and instead of G
    and F only what GPFQ reads of them: A = tril(G) W, G W (g, N0, N1g) and ||X W||^2 per column
    (g, N1g). A is accumulated block by block of the fan-in, as in the residual form:
    A[b] += tril(Xt_b^T X_b) W_b + Xt_b^T (X[:, :b] W[:b]). Per row that is N0^2 / 2 + 3 N0 N1
    multiply-adds instead of 2 N0^2: cheaper when N1 is well under N0 (3x3 convs, bottlenecks).
    form "residual": the rows themselves, X and Xt (g, m, N0) (float32 storage, float64 kept
    when given float64).
    Both: column sums of X and Xt -> mu_x, mu_xt (g, N0), and the row count m.
    Layers reading the same input tensor can share one Moments object (quantize_layer does not
    modify it) unless it is projected on one layer's W.
    """

    def __init__(self, groups: int, n0: int, form: str, W: np.ndarray | None = None):
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
            raise ValueError(f"Moments: groups must be an int >= 1 (got {groups!r})")
        if isinstance(n0, bool) or not isinstance(n0, (int, np.integer)) or n0 < 1:
            raise ValueError(f"Moments: n0 must be an int >= 1 (got {n0!r})")
        if form not in ("gram", "residual"):
            raise ValueError(f"Moments: form must be 'gram' or 'residual' (got {form!r})")
        self.groups, self.n0, self.form = int(groups), int(n0), form
        self.m = 0
        self.rows_dtype = None  # float32 when every batch came as float32, else float64
        self._sx = np.zeros((self.groups, self.n0))
        self._sxt = np.zeros((self.groups, self.n0))
        self.W = None
        if W is not None:
            W = np.asarray(W)
            if form != "gram" or W.ndim != 3 or W.shape[:2] != (self.groups, self.n0) or W.shape[2] < 1:
                raise ValueError(f"Moments: W is for form='gram' and must be (groups={self.groups}, n0={self.n0}, N1g) "
                                 f"(got form={form!r}, W {W.shape})")
            self.W = np.array(W, dtype=np.float64)
            self._W32 = self.W.astype(np.float32)
            n1 = W.shape[2]
            self._A = np.zeros((self.groups, self.n0, n1))
            self._GW = np.zeros((self.groups, self.n0, n1))
            self._xw2 = np.zeros((self.groups, n1))
        if form == "gram":
            if self.W is None:
                self._G = np.zeros((self.groups, self.n0, self.n0))
                self._F = np.zeros((self.groups, self.n0, self.n0))
            self._H = np.zeros((self.groups, self.n0, self.n0))
            self._pending: list[tuple[np.ndarray, np.ndarray | None]] = []  # rows not yet in G, H, F
            self._pending_bytes = 0
        else:
            self._xs: list[np.ndarray] = []
            self._xts: list[np.ndarray] = []
            self._cat: tuple[np.ndarray, np.ndarray] | None = None

    def _as3d(self, a, name) -> np.ndarray:
        a = np.asarray(a)
        if a.ndim == 2 and self.groups == 1:
            a = a[None]
        if a.ndim != 3 or a.shape[0] != self.groups or a.shape[2] != self.n0:
            raise ValueError(f"Moments.update: {name} must have shape (groups={self.groups}, rows, n0={self.n0}) "
                             f"(got {a.shape})")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"Moments.update: {name} must be a float array (got {a.dtype})")
        return a

    def update(self, X: np.ndarray, Xt: np.ndarray) -> None:
        """Add one batch. X, Xt: (g, rows, N0) float32/float64, the same rows in the same order
        (X from the float network, Xt from the partially quantized one; pass the same object
        twice for a layer whose input is not yet affected by quantization)."""
        same = Xt is X
        X = self._as3d(X, "X")
        Xt = X if same else self._as3d(Xt, "Xt")
        if Xt.shape != X.shape:
            raise ValueError(f"Moments.update: X and Xt shapes differ ({X.shape} vs {Xt.shape})")
        rows = X.shape[1]
        if rows == 0:
            return
        f32 = X.dtype == Xt.dtype == np.float32
        self.rows_dtype = np.float32 if f32 and self.rows_dtype in (None, np.float32) else np.float64
        # float32 rows in the Gram form: products in float32 (twice the GEMM speed) over chunks of
        # rows, summed over chunks in float64 (within a chunk float32 keeps ~1e-6 relative
        # accuracy). Anything else is computed in float64.
        work = np.float32 if self.form == "gram" and X.dtype == Xt.dtype == np.float32 else np.float64
        X64 = X.astype(work, copy=False)
        Xt64 = X64 if same else Xt.astype(work, copy=False)
        ones = np.ones(rows, X64.dtype)  # column sums in the products' dtype, added in float64
        sx = np.matmul(ones, X64)  # column sums (g, N0); faster than sum(axis=1) for small N0
        sxt = sx if same else np.matmul(ones, Xt64)
        if not (np.isfinite(sx).all() and np.isfinite(sxt).all()):  # a NaN / inf anywhere shows here
            raise ValueError("Moments.update: X / Xt contain NaN or inf")
        self._sx += sx
        self._sxt += sxt
        self.m += rows
        if self.form == "gram":
            # Small batches (e.g. models with a fixed batch of 1) are gathered into chunks of
            # GRAM_CHUNK_BYTES first: the products' cost is in the rows, but every product also
            # adds N0^2 entries into G, H, F.
            self._pending.append((np.array(X64, copy=True), None if same else np.array(Xt64, copy=True)))
            self._pending_bytes += X64.nbytes * (1 if same else 2)
            if self._pending_bytes >= GRAM_CHUNK_BYTES:
                self._flush()
        else:
            keep = np.float64 if X.dtype == np.float64 and Xt.dtype == np.float64 else np.float32
            self._xs.append(np.array(X, dtype=keep))
            self._xts.append(self._xs[-1] if same else np.array(Xt, dtype=keep))
            self._cat = None

    def _flush(self) -> None:
        """Add the pending rows to G, H, F (one product per matrix for the whole chunk)."""
        if not self._pending:
            return
        same = all(xt is None for _, xt in self._pending)
        X64 = np.concatenate([x for x, _ in self._pending], axis=1)  # mixed dtypes promote to float64
        Xt64 = X64 if same else np.concatenate([x if xt is None else xt for x, xt in self._pending], axis=1)
        self._pending, self._pending_bytes = [], 0
        if self.W is not None:
            self._flush_projected(X64, Xt64)
            return
        if self.groups == 1:  # 2-D products: numpy uses syrk for A^T A
            F = X64[0].T @ X64[0]
            self._F[0] += F
            self._G[0] += F if same else Xt64[0].T @ X64[0]
            self._H[0] += F if same else Xt64[0].T @ Xt64[0]
        else:  # one batched product per matrix over all groups
            XT, XtT = X64.transpose(0, 2, 1), Xt64.transpose(0, 2, 1)
            F = np.matmul(XT, X64)
            self._F += F
            self._G += F if same else np.matmul(XtT, X64)
            self._H += F if same else np.matmul(XtT, Xt64)

    def _flush_projected(self, X: np.ndarray, Xt: np.ndarray) -> None:
        """H += Xt^T Xt; A, G W, ||X W||^2 from the rows (see the class docstring)."""
        W = self.W if X.dtype == np.float64 else self._W32
        XtT = Xt.transpose(0, 2, 1)
        self._H += (Xt[0].T @ Xt[0])[None] if self.groups == 1 else np.matmul(XtT, Xt)
        V = np.zeros((self.groups, X.shape[1], W.shape[2]), X.dtype)  # running X[:, :b0] W[:b0]
        for b0 in range(0, self.n0, PROJECTED_BLOCK):
            b1 = min(b0 + PROJECTED_BLOCK, self.n0)
            Xb, XtbT = X[:, :, b0:b1], XtT[:, b0:b1]
            self._A[:, b0:b1] += np.matmul(np.tril(np.matmul(XtbT, Xb)), W[:, b0:b1]) + np.matmul(XtbT, V)
            V += np.matmul(Xb, W[:, b0:b1])
        self._GW += np.matmul(XtT, V)
        self._xw2 += np.einsum("gmn,gmn->gn", V, V, dtype=np.float64)

    def _gram(self, name: str) -> np.ndarray:
        if self.form != "gram":
            raise AttributeError("G / H / F are only kept by form='gram' Moments")
        if not hasattr(self, name):
            raise AttributeError(f"{name[1:]} is not kept by Moments projected on W (it keeps A = tril(G) W, "
                                 "G W and ||X W||^2 instead)")
        self._flush()
        return getattr(self, name)

    @property
    def A(self) -> np.ndarray:
        """(g, N0, N1g) tril(G) W (projected Moments only)."""
        return self._gram("_A")

    @property
    def GW(self) -> np.ndarray:
        """(g, N0, N1g) G W (projected Moments only)."""
        return self._gram("_GW")

    @property
    def xw2(self) -> np.ndarray:
        """(g, N1g) ||X W||^2 per column (projected Moments only)."""
        return self._gram("_xw2")

    @property
    def G(self) -> np.ndarray:
        """(g, N0, N0) float64 Xt^T X."""
        return self._gram("_G")

    @property
    def H(self) -> np.ndarray:
        """(g, N0, N0) float64 Xt^T Xt."""
        return self._gram("_H")

    @property
    def F(self) -> np.ndarray:
        """(g, N0, N0) float64 X^T X."""
        return self._gram("_F")

    @property
    def mu_x(self) -> np.ndarray:
        """(g, N0) column means of X."""
        return self._sx / max(self.m, 1)

    @property
    def mu_xt(self) -> np.ndarray:
        """(g, N0) column means of Xt."""
        return self._sxt / max(self.m, 1)

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        if self.form != "residual":
            raise AttributeError("X / Xt rows are only kept by form='residual' Moments")
        if self._cat is None:
            if not self._xs:
                empty = np.zeros((self.groups, 0, self.n0), np.float32)
                self._cat = (empty, empty)
            else:
                X = np.concatenate(self._xs, axis=1)
                Xt = X if all(a is b for a, b in zip(self._xs, self._xts)) else np.concatenate(self._xts, axis=1)
                self._xs, self._xts = [X], [Xt]
                self._cat = (X, Xt)
        return self._cat

    @property
    def X(self) -> np.ndarray:
        """(g, m, N0) rows of X (residual form only)."""
        return self._rows()[0]

    @property
    def Xt(self) -> np.ndarray:
        """(g, m, N0) rows of Xt (residual form only)."""
        return self._rows()[1]


def _accumulate_flops(m: int, n0: int, n1: int, g: int, projected: bool) -> int:
    """Gram form, accumulation and per-layer products (choose_form's units): plain G, H, F then
    tril(G) W, G W, F W; or projected (H, and A, G W, ||XW||^2 from the rows)."""
    if projected:
        return 2 * g * m * n0 * n0 + 6 * g * m * n0 * n1 + 2 * g * m * min(n0, PROJECTED_BLOCK) * n0
    return 6 * g * m * n0 * n0 + 5 * g * n0 * n0 * n1


def projection_pays(m: int, n0: int, n1: int, groups: int = 1) -> bool:
    """Whether Moments projected on W (see Moments) costs less than plain G, H, F: roughly when
    6 N1 + 2 min(N0, 256) < 4 N0 (3x3 convs, bottleneck 1x1 convs; not expanding layers)."""
    return _accumulate_flops(m, n0, n1, groups, True) < _accumulate_flops(m, n0, n1, groups, False)


def _full_search(spec: "QuantSpec", m: int, n0: int, n1: int, groups: int) -> bool:
    """Whether the step search tries every C of the grid (see QuantSpec.search)."""
    return spec.search == "full" or (spec.search == "auto" and groups * n0 * n1 * min(n0, m) <= COARSE_SEARCH_FLOPS)


def search_passes(spec: "QuantSpec", m: int, n0: int, n1: int, groups: int = 1) -> int:
    """Greedy passes quantize_layer runs for the step search, GPFQ and RTN baseline together."""
    if spec.scale_rule == "fixed":
        return 2
    return 2 * _Stages.lanes(len(spec.c_grid), _full_search(spec, m, n0, n1, groups))


def choose_form(m: int, n0: int, n1: int, groups: int = 1, memory_limit_bytes: int = 2 << 30,
                passes: int = 2 * len(DEFAULT_C_GRID), projected: bool = False) -> str:
    """Pick the Gram or the residual form for a layer with m calibration rows, fan-in n0 per
    group and n1 output columns *per group* (N1g), before accumulating; projected: the Gram form
    would accumulate Moments projected on W.

    Memory (bytes):  gram     3 g N0^2 * 8            (G, H, F in float64)
                              projected: g N0^2 * 8 + 3 g N0 N1 * 8
                     residual 2 g m N0 * 8            (X, Xt as float64 while quantizing)
                              + g m N1 * 8            (the state U)
    Cost, in units of one BLAS flop (single core ~0.022 ns), g groups, ``passes`` passes (one per
    C of the grid, for GPFQ and for the RTN baseline):
      gram      6 g m N0^2                  accumulate G, H, F
                + 5 g N0^2 N1               once per layer (tril(G) W, G W, F W)
                (projected: 2 g m N0^2 + 6 g m N0 N1 + 2 g m min(N0, 256) N0 instead)
                + per pass g (N0^2 N1 + 4 min(N0, 128) N0 N1 + 1800 N0)
      residual, m <= RESIDUAL_FUSED_MAX_M (fused kernel, passes + 1 lanes of one sweep):
                (passes + 1) g N0 (770 + 115 m + N1 (27 + 7 m))
      residual, more rows (blocked):
                4 g m N0 N1 once + per pass g (4 m N0 N1 + 4 B N0 N1 + 1800 N0), B = residual_block(m)
    The numba triangle flops are weighted x4; 1800 is the per-row overhead of the triangle kernel
    (~40 ns per row, group and pass). The fused constants are measured: per lane ~17 + 2.5 m ns
    per row and group plus ~0.6 + 0.15 m ns per column (one core, AMD EPYC with AVX-512, 12 + 12
    lanes, m = 1..64, N1 = 1..512). Checked against whole quantize_layer runs (default grid, one
    core): fused residual 3x faster than gram at m = 64, N0 = 576, N1 = 64 and 7x at N0 = 2304,
    N1 = 256; as fast at m = 64, N0 = 27..64; gram 2-4x faster for depthwise 3x3 (N0 = 9, N1 = 1)
    from m = 16 on; blocked residual 5x faster at m = 256, N0 = 2304; equal at m = 1024,
    N0 = 1152, N1 = 128. A form whose memory exceeds memory_limit_bytes is ruled out (if both
    do, the smaller one wins); otherwise the one with the lower cost. A wide FC layer seen by
    few rows (m << N0, e.g. N0 = 25088, m = 32) therefore never allocates N0^2.
    """
    for name, v in (("m", m), ("n0", n0), ("n1", n1), ("groups", groups), ("passes", passes)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name == "m" else 1):
            raise ValueError(f"choose_form: {name} must be an int >= {0 if name == 'm' else 1} (got {v!r})")
    g, m, n0, n1 = int(groups), int(m), int(n0), int(n1)
    gram_bytes = (g * n0 * n0 + 3 * g * n0 * n1) * 8 if projected else 3 * g * n0 * n0 * 8
    res_bytes = 2 * g * m * n0 * 8 + g * m * n1 * 8
    gram_ok, res_ok = gram_bytes <= memory_limit_bytes, res_bytes <= memory_limit_bytes
    if gram_ok != res_ok:
        return "gram" if gram_ok else "residual"
    if not gram_ok:
        return "gram" if gram_bytes <= res_bytes else "residual"
    tri, row = 4, 1800  # weight of a triangle flop; per-row overhead of the triangle kernel
    gram_flops = (_accumulate_flops(m, n0, n1, g, projected)
                  + passes * g * (n0 * n0 * n1 + tri * min(n0, GRAM_BLOCK) * n0 * n1 + row * n0))
    if m <= RESIDUAL_FUSED_MAX_M:
        res_flops = (passes + 1) * g * n0 * (770 + 115 * m + n1 * (27 + 7 * m))
    else:
        res_flops = 4 * g * m * n0 * n1 + passes * g * (4 * m * n0 * n1 + tri * residual_block(m) * n0 * n1 + row * n0)
    return "residual" if res_flops < gram_flops else "gram"


# ----------------------------------------------------------------------------------------------
# Steps and the scalar quantizer
# ----------------------------------------------------------------------------------------------


def _mode(sparsity: Sparsity | None) -> tuple[int, float]:
    if sparsity is None:
        return _kernels.MODE_PLAIN, 0.0
    return (_kernels.MODE_SOFT if sparsity.kind == "soft" else _kernels.MODE_HARD), float(sparsity.lam)


def step_ranges(W: np.ndarray, granularity: str = "channel", group_size: int = 0) -> tuple[np.ndarray, int]:
    """r of the step rule delta = C r / K. W (g, N0, N1g).

    Returns (r, bsize): r (g, nb, N1g) = max |w| per column ("channel"; nb = 1), of the whole
    layer incl. all groups ("tensor"; nb = 1, all equal) or per column per block of group_size
    fan-in rows ("block"; nb = ceil(N0 / group_size)); bsize = fan-in rows per block of r.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}")
    if granularity == "block" and group_size < 1:
        raise ValueError("granularity='block' needs group_size >= 1")
    if (isinstance(W, np.ndarray) and W.ndim == 3 and W.dtype in (np.float64, np.float32)
            and W.shape[1] > 0 and W.size > 0):
        # one pass in numba, no |W| temporary (same values: max is exact, NaN propagates)
        g, n0, n1 = W.shape
        bs = int(group_size) if granularity == "block" else n0
        r = np.empty((g, -(-n0 // bs), n1), W.dtype)
        _kernels.abs_max_blocks(W, bs, r)
        if granularity == "tensor":
            return np.full((g, 1, n1), r.max()), n0
        return r, bs
    A = np.abs(W)
    g, n0, n1 = W.shape
    if granularity == "channel":
        return A.max(axis=1, keepdims=True), n0
    if granularity == "tensor":
        return np.full((g, 1, n1), A.max()), n0
    return np.maximum.reduceat(A, np.arange(0, n0, group_size), axis=1), int(group_size)


def steps_from_ranges(r: np.ndarray, C, K: int) -> np.ndarray:
    """delta = C r / K, (g, nb, N1g); C a scalar or (g, N1g). 0 where r == 0 (alphabet {0}:
    codes 0; stored as scale 1 by quantize_layer)."""
    C = np.asarray(C, dtype=np.float64)
    if C.ndim == 2:
        C = C[:, None, :]
    return np.ascontiguousarray(np.where(r > 0, C * r / K, 0.0))


def _delta3(delta, g: int, n0: int, n1: int, group_size: int) -> tuple[np.ndarray, int]:
    """Normalise a user-given step: scalar, (N1,), (nb, N1) or (g, nb, N1) -> ((g, nb, N1), bsize)."""
    d = np.asarray(delta, dtype=np.float64)
    if d.ndim == 0:
        d = np.full((1, 1, n1), float(d))
    elif d.ndim == 1:
        d = d[None, None, :]
    elif d.ndim == 2:
        d = d[None]
    if d.ndim != 3 or d.shape[2] != n1 or d.shape[0] not in (1, g):
        raise ValueError(f"delta shape {np.shape(delta)} does not fit W with g={g}, N0={n0}, N1={n1}")
    nb = d.shape[1]
    if nb == 1:
        bsize = n0
    else:
        if group_size < 1 or -(-n0 // group_size) != nb:
            raise ValueError(f"delta has {nb} row blocks: needs group_size with ceil(N0/group_size) == {nb}")
        bsize = int(group_size)
    if not (d.min() >= 0 and d.max() < math.inf):
        raise ValueError("delta must be finite and >= 0")
    if d.shape[0] != g or not d.flags.c_contiguous:
        d = np.ascontiguousarray(np.broadcast_to(d, (g, nb, n1)))
    return d, bsize


def _rows_of(delta: np.ndarray, bsize: int, n0: int) -> np.ndarray:
    """(g, nb, N1) per-block steps -> (g, N0, N1) per-row steps."""
    if delta.shape[1] == 1:
        return delta
    return np.repeat(delta, bsize, axis=1)[:, :n0]


def quantize_codes(z: np.ndarray, delta_rows: np.ndarray, alphabet: Alphabet,
                   sparsity: Sparsity | None = None) -> np.ndarray:
    """Vectorised Quant (same rule as the kernel): codes int32 for values z with steps delta_rows
    (broadcastable). delta <= 0 -> code 0. Round half to even, saturate at lo/hi."""
    z = np.asarray(z, dtype=np.float64)
    mode, lam = _mode(sparsity)
    d = np.asarray(delta_rows, dtype=np.float64)
    if 2 <= z.ndim <= 3 and d.ndim <= z.ndim and z.size > 0:
        # one pass in numba (no float temporaries) when delta broadcasts along whole axes
        z3 = z if z.ndim == 3 else z[None]
        d3 = d.reshape((1,) * (3 - d.ndim) + d.shape)
        if all(dn in (1, zn) for dn, zn in zip(d3.shape, z3.shape)):
            out = np.empty(z3.shape, np.int32)
            _kernels.quantize_array(z3, d3, 1, alphabet.lo, alphabet.hi, mode, lam, 0, out)
            return out.reshape(z.shape)
    d = np.broadcast_to(d, z.shape)
    if mode == _kernels.MODE_SOFT:
        z = np.sign(z) * np.maximum(np.abs(z) - lam, 0.0)
    live = d > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(live, z / np.where(live, d, 1.0), 0.0)
    k = np.clip(np.rint(x), alphabet.lo, alphabet.hi)
    if mode == _kernels.MODE_HARD:
        k = np.where(k == 0, np.where(z > 0, 1.0, -1.0), k)
        k = np.where(np.abs(z) <= lam, 0.0, k)
    k = np.where(live, k, 0.0)
    return k.astype(np.int32)


def dequantize(codes: np.ndarray, scale: np.ndarray, group_size: int = 0) -> np.ndarray:
    """codes (g, N0, N1g) int, scale (g, nb, N1g) -> (g, N0, N1g) float64 weights codes * scale,
    the scale repeated along the fan-in. group_size (rows per scale block) is needed when
    nb > 1 (block granularity); LayerResult.group_size holds it."""
    codes = np.asarray(codes)
    scale = np.asarray(scale, dtype=np.float64)
    if codes.ndim != 3 or scale.ndim != 3 or scale.shape[0] != codes.shape[0] or scale.shape[2] != codes.shape[2]:
        raise ValueError(f"dequantize: codes (g, N0, N1g) and scale (g, nb, N1g) expected "
                         f"(got {codes.shape}, {scale.shape})")
    n0, nb = codes.shape[1], scale.shape[1]
    if nb == 1:
        return codes * scale
    if group_size < 1 or -(-n0 // group_size) != nb:
        raise ValueError(f"dequantize: scale has {nb} row blocks; pass group_size with ceil(N0/group_size) == {nb}")
    return codes * _rows_of(scale, group_size, n0)


def output_error(W: np.ndarray, Q: np.ndarray, G: np.ndarray, H: np.ndarray, F: np.ndarray) -> np.ndarray:
    """Per-column squared output error ||X w - Xt q||^2 = w^T F w - 2 w^T G^T q + q^T H q.

    W, Q (N0, N1) or (g, N0, N1) float (Q dequantized); G, H, F (N0, N0) or (g, N0, N0).
    Returns (N1,) or (g, N1) in output units^2.
    """
    W, Q, G, H, F = (np.asarray(a, dtype=np.float64) for a in (W, Q, G, H, F))
    wfw = np.einsum("...in,...in->...n", W, F @ W)
    qgw = np.einsum("...in,...in->...n", Q, G @ W)
    qhq = np.einsum("...in,...in->...n", Q, H @ Q)
    return wfw - 2.0 * qgw + qhq


# ----------------------------------------------------------------------------------------------
# The greedy pass
# ----------------------------------------------------------------------------------------------


def _split(lo: int, hi: int, block: int) -> int:
    """Middle of [lo, hi) on a multiple of block from lo (both halves non-empty)."""
    nblocks = -(-(hi - lo) // block)
    return lo + block * ((nblocks + 1) // 2)


def tril_matmul(G: np.ndarray, W: np.ndarray, block: int = GRAM_BLOCK, G_off: np.ndarray | None = None) -> np.ndarray:
    """A = tril(G) @ W for G (g, N0, N0), W (g, N0, N1): A[t] = sum_{s<=t} G[t,s] W[s].

    Only the lower triangle is multiplied (half the flops of np.tril(G) @ W, no N0^2 copy), by
    recursive halving: A[mid:] += G[mid:, :mid] W[:mid] is one large GEMM, and the two diagonal
    halves recurse down to block x block triangles. Tiny problems (N0 <= 16) run in one numba loop.
    G_off: G in the dtype the large off-diagonal GEMMs run in (e.g. float32; default G)."""
    g, n0, n1 = W.shape
    A = np.empty((g, n0, n1))
    if n0 <= 16:
        _kernels.tril_matmul_small(G, W, A)
        return A

    _tril_matmul_rec(G, G if G_off is None else G_off, W, A, 0, n0, block)
    return A


def _tril_matmul_rec(G, G_off, W, A, lo, hi, block):
    # a module-level function, not a closure: a self-referencing closure is a reference cycle that
    # keeps its (large) arrays alive until the garbage collector happens to run
    if hi - lo <= block:
        np.matmul(np.tril(G[:, lo:hi, lo:hi]), W[:, lo:hi], out=A[:, lo:hi])
        return
    mid = _split(lo, hi, block)
    _tril_matmul_rec(G, G_off, W, A, lo, mid, block)
    _tril_matmul_rec(G, G_off, W, A, mid, hi, block)
    A[:, mid:hi] += np.matmul(G_off[:, mid:hi, lo:mid], W[:, lo:mid].astype(G_off.dtype, copy=False))


def _dead(H: np.ndarray) -> np.ndarray:
    """(g,) threshold on H[t,t] (H (g, N0, N0) C-contiguous) at or under which Xt's column t
    counts as zero."""
    return _kernels.dead_threshold(H, DEAD_TOL)


def _gram_pass(A, H, delta, bsize, alphabet, sparsity, dead, block=GRAM_BLOCK, H_off=None, pair=0):
    """Greedy pass in the Gram form. A = tril(G) W (g, N0, N1), H (g, N0, N0) C-contiguous,
    delta (g, nb, N1); H_off: H in the dtype of the off-diagonal GEMMs (default H). Returns codes (g, N0, N1) int32, Q (g, N0, N1) dequantized float64 and
    q^T H q per column (g, N1) (for the exact error without another product).

    The H-term sum_{s<t} H[t,s] Q[s] is a forward substitution with rounding, accumulated in L.
    Recursive blocking (like a recursive TRSM, or GPTQ's lazy batch updates applied
    hierarchically): quantize the first half of the rows, add H[mid:, :mid] Q[:mid] to the
    second half's L with one GEMM, then the second half; below `block` rows the triangle runs
    in numba. Most flops land in a few large GEMMs.
    """
    g, n0, n1 = A.shape
    mode, lam = _mode(sparsity)
    Q = np.empty((g, n0, n1))
    codes = np.empty((g, n0, n1), np.int32)
    qhq = np.zeros((g, n1))
    L = np.zeros((g, n0, n1))
    prev = np.zeros((g, n1), np.int32)  # the previous row's codes, for the pair bound

    args = (A, L, H, H if H_off is None else H_off, Q, codes, delta, bsize, alphabet.lo, alphabet.hi, mode, lam,
            dead, qhq, block, pair, prev)
    _gram_pass_rec(0, n0, *args)
    return codes, Q, qhq


def _gram_pass_rec(lo, hi, A, L, H, H_off, Q, codes, delta, bsize, a_lo, a_hi, mode, lam, dead, qhq, block, pair,
                   prev):
    args = (A, L, H, H_off, Q, codes, delta, bsize, a_lo, a_hi, mode, lam, dead, qhq, block, pair, prev)
    if hi - lo <= block:
        _kernels.greedy_block(A, lo, L, lo, H, lo, Q, codes, lo, delta, lo, bsize, hi - lo,
                              a_lo, a_hi, mode, lam, dead, qhq, pair, prev)
        return
    mid = _split(lo, hi, block)
    _gram_pass_rec(lo, mid, *args)
    L[:, mid:hi] += np.matmul(H_off[:, mid:hi, lo:mid], Q[:, lo:mid].astype(H_off.dtype, copy=False))
    _gram_pass_rec(mid, hi, *args)


def _as3(a: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    a = np.asarray(a)
    if a.ndim == 2:
        return np.ascontiguousarray(a[None], dtype=np.float64), True
    if a.ndim != 3:
        raise ValueError(f"{name} must be 2-D or 3-D (groups first) (got shape {a.shape})")
    return np.ascontiguousarray(a, dtype=np.float64), False


def gpfq_gram(W: np.ndarray, G: np.ndarray, H: np.ndarray, delta, alphabet: Alphabet,
              sparsity: Sparsity | None = None, group_size: int = 0, block: int = GRAM_BLOCK,
              pair_bound: int | None = None) -> np.ndarray:
    """One GPFQ pass in the Gram form with given steps; returns the integer codes.

    W (N0, N1) or (g, N0, N1); G = Xt^T X, H = Xt^T Xt (N0, N0) or (g, N0, N0) float64;
    delta: scalar, (N1,), (nb, N1) or (g, nb, N1) steps (weight units), nb = 1 or
    ceil(N0 / group_size). Codes int32 with W's shape.
    """
    W3, squeeze = _as3(W, "W")
    G3, _ = _as3(G, "G")
    H3, _ = _as3(H, "H")
    g, n0, n1 = W3.shape
    if G3.shape != (g, n0, n0) or H3.shape != (g, n0, n0):
        raise ValueError(f"G, H must be (g, N0, N0) = {(g, n0, n0)} (got {G3.shape}, {H3.shape})")
    d, bsize = _delta3(delta, g, n0, n1, group_size)
    A = tril_matmul(G3, W3, block)
    dead = _dead(H3)
    codes, _, _ = _gram_pass(A, H3, d, bsize, alphabet, sparsity, dead, block, pair=pair_bound or 0)
    return codes[0] if squeeze else codes


def residual_block(m: int) -> int:
    """Rows per block of the residual form for m calibration rows: about m / 4, a power of two in
    32..128. Measured single-threaded on m = 32 / 256 / 1024, N0 = 4608..9216: B = 16-32 / 64 /
    64-128 were fastest (the triangle's B^2 N1 against the GEMMs' 4 m B N1); the floor 32 halves
    the number of small BLAS calls, which matters when threaded BLAS shares busy cores (m = 32,
    N0 = 9216, N1 = 4096 on 2 oversubscribed cores: 6.3 s per pass at B = 16, 4.9 s at 32, 2.4 s
    at 128, against 0.38 s single-threaded)."""
    return int(min(128, max(32, 2 ** round(math.log2(max(m, 1) / 4)))))


class _Residual:
    """The residual form for one layer, blocked.

    With U_t = X[:, :t+1] W[:t+1] - Xt[:, :t] Q[:t] (the paper's u_{t-1} + w_t X_t), the
    decision is z_t = Xt_t^T U_t / ||Xt_t||^2. Its C-independent part
    A_t = Xt_t^T X[:, :t+1] W[:t+1] = (tril(G) W)_t is computed once per layer, streamed block by
    block without forming G; the pass then keeps the state R = Xt[:, :b0] Q[:b0] (m, N1) and per
    block of B rows: L = Xt_b^T R (one GEMM), the B x B triangle with H_bb = Xt_b^T Xt_b in numba,
    R += Xt_b Q_b (one GEMM). At the end U = X W - R, and the exact error is ||U||^2 per column.

    The GEMMs run in the rows' dtype: float32 rows (the pipeline's) give float32 products (twice
    the speed) summed into float64 states, as the Gram form does; float64 rows stay float64.
    """

    def __init__(self, W, X, Xt, block=None):
        g, n0, n1 = W.shape
        block = residual_block(X.shape[1]) if block is None else int(block)
        self.block, self.X, self.Xt = block, X, Xt
        self.work = np.float32 if X.dtype == Xt.dtype == np.float32 else np.float64
        Ww = W.astype(self.work)
        self.A = np.empty((g, n0, n1))
        self.Hb = []
        V = np.zeros((g, X.shape[1], n1))  # running X[:, :b0] W[:b0]
        diag = np.empty((g, n0))
        for b0 in range(0, n0, block):
            b1 = min(b0 + block, n0)
            Xb, Xtb = X[:, :, b0:b1], Xt[:, :, b0:b1]
            XtbT = Xtb.transpose(0, 2, 1)
            Hbb = np.ascontiguousarray(np.matmul(XtbT, Xtb), dtype=np.float64)
            self.Hb.append(Hbb)
            diag[:, b0:b1] = np.diagonal(Hbb, axis1=1, axis2=2)
            Gbb = np.matmul(XtbT, Xb)
            self.A[:, b0:b1] = np.matmul(np.tril(Gbb), Ww[:, b0:b1]) + np.matmul(XtbT, V.astype(self.work, copy=False))
            V += np.matmul(Xb, Ww[:, b0:b1])
        self.XW = V
        self.dead = np.ascontiguousarray(DEAD_TOL * diag.max(axis=1))

    def greedy(self, delta, bsize, alphabet, sparsity, pair=0):
        """One pass; returns codes (g, N0, N1) int32 and the final residual U = XW - Xt Q (g, m, N1)."""
        g, n0, n1 = self.A.shape
        mode, lam = _mode(sparsity)
        codes = np.empty((g, n0, n1), np.int32)
        R = np.zeros((g, self.X.shape[1], n1))  # running Xt[:, :b0] Q[:b0]
        qhq = np.zeros((g, n1))  # unused here: the error is ||U||^2
        prev = np.zeros((g, n1), np.int32)  # the previous row's codes, for the pair bound
        for i, b0 in enumerate(range(0, n0, self.block)):
            b1 = min(b0 + self.block, n0)
            Xtb = self.Xt[:, :, b0:b1]
            L = np.ascontiguousarray(np.matmul(Xtb.transpose(0, 2, 1), R.astype(self.work, copy=False)), dtype=np.float64)
            Qb = np.empty((g, b1 - b0, n1))
            cb = np.empty((g, b1 - b0, n1), np.int32)
            _kernels.greedy_block(self.A, b0, L, 0, self.Hb[i], 0, Qb, cb, 0, delta, b0, bsize, b1 - b0,
                                  alphabet.lo, alphabet.hi, mode, lam, self.dead, qhq, pair, prev)
            codes[:, b0:b1] = cb
            R += np.matmul(Xtb, Qb.astype(self.work, copy=False))
        return codes, self.XW - R


def gpfq_residual(W: np.ndarray, X: np.ndarray, Xt: np.ndarray, delta, alphabet: Alphabet,
                  sparsity: Sparsity | None = None, group_size: int = 0,
                  block: int | None = None, pair_bound: int | None = None) -> np.ndarray:
    """One GPFQ pass in the residual form (state of shape (m, N1), see _Residual); returns codes.

    W (N0, N1) or (g, N0, N1); X, Xt (m, N0) or (g, m, N0); delta as in gpfq_gram; block: rows
    per block (None: residual_block(m)). Never forms an N0 x N0 matrix.
    """
    W3, squeeze = _as3(W, "W")
    X3, _ = _as3(X, "X")
    Xt3, _ = _as3(Xt, "Xt")
    g, n0, n1 = W3.shape
    if X3.shape[0] != g or X3.shape[2] != n0 or Xt3.shape != X3.shape:
        raise ValueError(f"X, Xt must be (g, m, N0) with g={g}, N0={n0} (got {X3.shape}, {Xt3.shape})")
    d, bsize = _delta3(delta, g, n0, n1, group_size)
    if block is None and X3.shape[1] <= RESIDUAL_FUSED_MAX_M:
        codes = _Fused(X3, Xt3).sweep(W3, d[None], None, bsize, alphabet, sparsity, store=True, pair=pair_bound or 0)[0]
    else:
        codes, _ = _Residual(W3, X3, Xt3, block).greedy(d, bsize, alphabet, sparsity, pair=pair_bound or 0)
    return codes[0] if squeeze else codes


def rtn_codes(W: np.ndarray, delta, alphabet: Alphabet, sparsity: Sparsity | None = None,
              group_size: int = 0, pair_bound: int | None = None) -> np.ndarray:
    """Round to nearest (MSQ): codes = clip(round(W / delta), lo, hi) (with the same sparsity
    rule as GPFQ applied to w instead of z). W (N0, N1) or (g, N0, N1); delta as in gpfq_gram."""
    W3, squeeze = _as3(W, "W")
    g, n0, n1 = W3.shape
    d, bsize = _delta3(delta, g, n0, n1, group_size)
    if pair_bound:
        codes = _rtn(W3, d, bsize, alphabet, sparsity, pair_bound)
    else:
        codes = quantize_codes(W3, _rows_of(d, bsize, n0), alphabet, sparsity)
    return codes[0] if squeeze else codes


# ----------------------------------------------------------------------------------------------
# One layer: step search, errors, bias correction
# ----------------------------------------------------------------------------------------------


class _GramProblem:
    """Per-layer quantities shared by every pass: A = tril(G) W, G W, w^T F w."""

    def __init__(self, W, mom: Moments):
        self.H = np.ascontiguousarray(mom.H)
        # Rows that came as float32 (the pipeline's) carry float32 accuracy: the large off-diagonal
        # GEMMs of the passes and error products then run in float32 (twice the speed), the
        # triangles and all sums in float64. Float64 rows keep float64 throughout.
        self.H_off = self.H.astype(np.float32) if mom.rows_dtype == np.float32 else self.H
        self.W = W
        if mom.W is not None:  # projected: A, G W and ||XW||^2 were accumulated from the rows
            if mom.W.shape != W.shape or not np.array_equal(mom.W, W):
                raise ValueError("quantize_layer: these Moments were projected on other weights than W")
            self.A, self.GW, self.wfw = mom.A, mom.GW, mom.xw2
        else:
            G = np.ascontiguousarray(mom.G)
            self.A = tril_matmul(G, W)
            self.GW = np.matmul(G, W)
            self.wfw = np.einsum("gin,gin->gn", W, np.matmul(mom.F, W))
        self.dead = _dead(self.H)
        self.dH = np.ascontiguousarray(np.diagonal(self.H, axis1=1, axis2=2))

    def greedy(self, delta, bsize, alphabet, sparsity, pair=0):
        codes, Q, qhq = _gram_pass(self.A, self.H, delta, bsize, alphabet, sparsity, self.dead, H_off=self.H_off,
                                   pair=pair)
        return codes, self.wfw - 2.0 * np.einsum("gin,gin->gn", Q, self.GW) + qhq

    def errors(self, codes: list, deltas: list, bsize: int) -> list:
        """Exact per-column errors of given codes, several lanes (codes, delta) side by side as
        one wide product; q^T H q from the lower triangle only:
        q^T H q = sum_t q_t (2 (tril(H) q)_t - H[t,t] q_t)."""
        g, n0, n1 = codes[0].shape
        Q = np.empty((g, n0, len(codes), n1))
        for i, (c, d) in enumerate(zip(codes, deltas)):
            np.multiply(c, _rows_of(d, bsize, n0), out=Q[:, :, i])
        Q = Q.reshape(g, n0, len(codes) * n1)
        HQ = tril_matmul(self.H, Q, G_off=self.H_off)
        qhq = 2.0 * np.einsum("gin,gin->gn", Q, HQ)
        np.multiply(Q, Q, out=HQ)
        qhq -= np.matmul(self.dH[:, None, :], HQ)[:, 0]  # - sum_t H[t,t] q_t^2
        qgw = np.einsum("gilN,giN->glN", Q.reshape(g, n0, len(codes), n1), self.GW)
        err = self.wfw[:, None, :] - 2.0 * qgw + qhq.reshape(g, len(codes), n1)
        return [err[:, i] for i in range(len(codes))]


class _ResidualProblem:
    """Per-layer quantities of the residual form.

    m <= RESIDUAL_FUSED_MAX_M rows ("fused"): the rows transposed, H[t,t] and the dead
    threshold, O(m N0); every pass runs in _kernels.residual_lanes, all C of the grid (and the
    RTN baseline) in one sweep over W. More rows: the blocked _Residual (A, X W, ||X W||^2).
    """

    def __init__(self, W, mom: Moments):
        self.W = W
        self.fused = mom.m <= RESIDUAL_FUSED_MAX_M
        if self.fused:
            X = np.asarray(mom.X, dtype=np.float64)
            Xt = X if mom.Xt is mom.X else np.asarray(mom.Xt, dtype=np.float64)
            self.f = _Fused(X, Xt)
            self.wfw = None  # ||X W||^2 per column, set by search()
        else:  # float32 rows stay float32 (see _Residual)
            self.r = _Residual(W, mom.X, mom.Xt)
            self.m = mom.m
            self.wfw = np.einsum("gmn,gmn->gn", self.r.XW, self.r.XW)

    def greedy(self, delta, bsize, alphabet, sparsity, pair=0):  # blocked only (fused: search)
        codes, U = self.r.greedy(delta, bsize, alphabet, sparsity, pair)
        return codes, np.einsum("gmn,gmn->gn", U, U)

    def errors(self, codes: list, deltas: list, bsize: int) -> list:
        """||XW - Xt Q||^2 per column for several lanes (codes, delta) side by side."""
        g, n0, n1 = codes[0].shape
        lanes, m = len(codes), self.r.XW.shape[1]
        rows = [_rows_of(d, bsize, n0) for d in deltas]
        U = np.empty((g, m, lanes, n1))
        U[:] = self.r.XW[:, :, None, :]
        U = U.reshape(g, m, lanes * n1)
        for b0 in range(0, n0, RESIDUAL_CHUNK):  # U = XW - Xt Q without forming all of Q
            b1 = min(b0 + RESIDUAL_CHUNK, n0)
            Q = np.concatenate([c[:, b0:b1] * (r if r.shape[1] == 1 else r[:, b0:b1]) for c, r in zip(codes, rows)], axis=2)
            U -= np.matmul(self.r.Xt[:, :, b0:b1], Q.astype(self.r.work, copy=False))
        err = np.einsum("gmn,gmn->gn", U, U).reshape(g, lanes, n1)
        return [err[:, i] for i in range(lanes)]

    def search(self, r, bsize, make_stages, method, alphabet, sparsity, pair=0) -> tuple["_Choice", "_Choice"]:
        """Fused form only: the step search for `method` and for the RTN baseline, each stage's
        lanes of both in one sweep over W (errors only), then one more sweep for the codes of the
        chosen steps (GPFQ; RTN codes are a direct rounding). Same choices as _search."""
        gpfq = method == "gpfq"
        sg, sr = make_stages(), make_stages()
        stages_g = iter(sg)
        for lanes_r in sr:
            lanes_g = next(stages_g) if gpfq else ()
            dr = np.stack([steps_from_ranges(r, sr.C(i), alphabet.K) for i in lanes_r])
            dg = np.stack([steps_from_ranges(r, sg.C(i), alphabet.K) for i in lanes_g]) if gpfq else None
            _, err_g, err_r, xw2 = self.f.sweep(self.W, dg, dr, bsize, alphabet, sparsity, store=False, pair=pair)
            self.wfw = xw2
            for j, lane in enumerate(lanes_r):
                sr.best.offer(lane, err_r[j])
            for j, lane in enumerate(lanes_g):
                sg.best.offer(lane, err_g[j])
        rtn = sr.best.choice(r, alphabet.K)
        rtn = rtn._replace(codes=_rtn(self.W, rtn.delta, bsize, alphabet, sparsity, pair))
        if not gpfq:
            return rtn, rtn
        best = sg.best.choice(r, alphabet.K)
        codes, err, _, _ = self.f.sweep(self.W, best.delta[None], None, bsize, alphabet, sparsity, store=True,
                                        pair=pair)
        return best._replace(codes=codes, err=err[0]), rtn


class _Fused:
    """Rows of the residual form laid out for _kernels.residual_lanes."""

    def __init__(self, X, Xt):
        self.XT = np.ascontiguousarray(X.transpose(0, 2, 1))
        self.XtT = self.XT if Xt is X else np.ascontiguousarray(Xt.transpose(0, 2, 1))
        self.hd = np.ascontiguousarray(np.einsum("gmn,gmn->gn", Xt, Xt))  # H[t,t] = ||Xt_t||^2
        self.dead = np.ascontiguousarray(DEAD_TOL * self.hd.max(axis=1)) if self.hd.size else np.zeros(X.shape[0])

    def sweep(self, W, DG, DR, bsize, alphabet, sparsity, store, pair=0):
        """DG (nG, g, nb, N1) GPFQ steps, DR (nR, g, nb, N1) RTN steps (None: no lanes).
        Returns (codes of GPFQ lane 0 or None, err_g (nG, g, N1), err_r (nR, g, N1), ||XW||^2)."""
        g, n0, n1 = W.shape
        nb = -(-n0 // bsize)
        empty = np.zeros((0, g, nb, n1))
        DG = empty if DG is None else np.ascontiguousarray(DG)
        DR = empty if DR is None else np.ascontiguousarray(DR)
        nG, nR = DG.shape[0], DR.shape[0]
        codes = np.empty((g, n0, n1) if store else (0, 0, 0), np.int32)
        err_g, err_r, xw2 = np.empty((nG, g, n1)), np.empty((nR, g, n1)), np.empty((g, n1))
        mode, lam = _mode(sparsity)
        _kernels.residual_lanes(W, self.XT, self.XtT, self.hd, self.dead, DG, DR, bsize, alphabet.lo, alphabet.hi,
                                mode, lam, pair, _kernels.column_tile(n1, RESIDUAL_TILE, g), store, codes, err_g, err_r, xw2)
        return (codes if store else None), err_g, err_r, xw2


def _rtn(W, delta, bsize, alphabet, sparsity, pair=0):
    """RTN codes (g, N0, N1) int32 of W with steps delta (g, nb, N1) (block b for rows
    b*bsize..), one pass in numba."""
    codes = np.empty(W.shape, np.int32)
    mode, lam = _mode(sparsity)
    _kernels.quantize_array(W, np.ascontiguousarray(delta), bsize, alphabet.lo, alphabet.hi, mode, lam, pair, codes)
    return codes


class _Choice(NamedTuple):
    codes: np.ndarray  # (g, N0, N1) int32
    delta: np.ndarray  # (g, nb, N1)
    C: np.ndarray  # (g, N1)
    err: np.ndarray  # (g, N1) squared output error


class _Stages:
    """The C values a step search tries, stage by stage, as grid indices per column.

    Iterating yields, per stage, a list of lanes; a lane is a (g, N1) array of indices into the
    grid (one C per column; all equal when the choice is per layer). Full search: one stage, one
    lane per C. Coarse to fine (grids of 6 or more, unless full): every third C from the second
    on, then the two neighbours of the best so far (per column, or of the layer's best).
    """

    def __init__(self, grid, shape, per_column: bool, full: bool):
        self.grid, self.shape, self.per_column = np.asarray(grid, dtype=np.float64), shape, per_column
        self.refine = self.coarse_to_fine(len(grid), full)
        first = range(1, len(grid), 3) if self.refine else range(len(grid))
        self.first = [np.full(shape, i, np.intp) for i in first]
        self.best = _Best(per_column, self.grid)  # fed by the caller; steers the refinement

    @staticmethod
    def coarse_to_fine(n: int, full: bool) -> bool:
        return not full and n >= 6

    @staticmethod
    def lanes(n: int, full: bool) -> int:
        """Passes one search runs over a grid of n values."""
        return len(range(1, n, 3)) + 2 if _Stages.coarse_to_fine(n, full) else n

    def C(self, lane: np.ndarray) -> np.ndarray:
        return self.grid[lane]

    def __iter__(self):
        yield self.first
        if self.refine:
            i = self.best.i
            yield [np.maximum(i - 1, 0), np.minimum(i + 1, len(self.grid) - 1)]


class _Best:
    """The best lane so far, per column (or per layer): grid index, error, codes if kept.
    Ties keep the earlier lane."""

    def __init__(self, per_column: bool, grid: np.ndarray):
        self.per_column, self.grid = per_column, grid
        self.i = self.err = self.codes = None

    def offer(self, lane: np.ndarray, err: np.ndarray, codes: np.ndarray | None = None) -> None:
        if self.err is None:
            self.i, self.err, self.codes = lane.copy(), err.copy(), None if codes is None else codes.copy()
        elif self.per_column:
            better = err < self.err
            if better.any():
                self.i[better] = lane[better]
                np.copyto(self.err, err, where=better)
                if codes is not None:
                    np.copyto(self.codes, codes, where=better[:, None, :])
        elif err.sum() < self.err.sum():
            self.i, self.err, self.codes = lane.copy(), err.copy(), None if codes is None else codes.copy()

    def choice(self, r: np.ndarray, K: int) -> "_Choice":
        C = self.grid[self.i]
        return _Choice(self.codes, steps_from_ranges(r, C, K), C, self.err)


def _search(problem, r, bsize, stages: _Stages, method, alphabet, sparsity, pair=0) -> _Choice:
    """Run one pass per lane of each stage (delta = C r / K, C per column) and keep, per column or
    for the whole layer, the C with the smallest exact output error (earliest lane on ties)."""
    best = stages.best
    g, n0, n1 = problem.W.shape
    per_call = max(1, ERROR_LANES_BYTES // (8 * g * n1 * max(n0, getattr(problem, "m", 0))))
    for lanes in stages:
        if method == "gpfq":
            for lane in lanes:
                codes, err = problem.greedy(steps_from_ranges(r, stages.C(lane), alphabet.K), bsize, alphabet, sparsity,
                                            pair)
                best.offer(lane, err, codes)
            continue
        for i in range(0, len(lanes), per_call):  # RTN: codes by rounding, errors of several lanes at once
            part = lanes[i:i + per_call]
            deltas = [steps_from_ranges(r, stages.C(lane), alphabet.K) for lane in part]
            codes = [_rtn(problem.W, d, bsize, alphabet, sparsity, pair) for d in deltas]
            for lane, c, err in zip(part, codes, problem.errors(codes, deltas, bsize)):
                best.offer(lane, err, c)
    return best.choice(r, alphabet.K)


@dataclass(frozen=True)
class LayerResult:
    """What quantize_layer chose for one layer.

    codes (g, N0, N1g) int32 in [lo, hi]; scale (g, nb, N1g) float64 step delta (nb = 1 for
    channel/tensor -- all entries equal for tensor -- and ceil(N0/group_size) for block);
    dequantized weight = codes * scale repeated along the fan-in (see dequantize / weights()).
    C (g, N1g) chosen C per column. rel_error = ||XW - Xt Q||_F^2 / ||XW||_F^2 summed over all
    groups, rel_error_rtn the same for RTN with the same step rule, granularity and search.
    sparsity: fraction of zero codes. bias_delta (g, N1g) = mu_x^T W - mu_xt^T Q (add to the
    bias) when requested. form: which form computed it. group_size: fan-in rows per scale entry
    (N0 for channel/tensor).
    """

    codes: np.ndarray
    scale: np.ndarray
    C: np.ndarray
    rel_error: float
    rel_error_rtn: float
    sparsity: float
    bias_delta: np.ndarray | None
    form: str
    group_size: int = 0

    def weights(self) -> np.ndarray:
        """(g, N0, N1g) float64 dequantized weights."""
        return dequantize(self.codes, self.scale, self.group_size)


def quantize_layer(W: np.ndarray, moments: Moments, spec: QuantSpec) -> LayerResult:
    """Quantize one layer. W: (g, N0, N1g) float weights, columns = output neurons, matching
    moments (groups, n0). Runs GPFQ (or RTN) with the step rule of spec and returns codes,
    steps and exact errors. No second pass over data: errors come from G, H, F (Gram form) or
    from the residual (residual form)."""
    if not isinstance(spec, QuantSpec):
        raise ValueError("quantize_layer: spec must be a QuantSpec")
    if not isinstance(moments, Moments):
        raise ValueError("quantize_layer: moments must be a Moments")
    W = np.asarray(W)
    if W.ndim == 2 and moments.groups == 1:
        W = W[None]
    if W.ndim != 3 or W.shape[0] != moments.groups or W.shape[1] != moments.n0 or W.shape[2] < 1:
        raise ValueError(f"quantize_layer: W must be (groups={moments.groups}, N0={moments.n0}, N1g) (got {W.shape})")
    W = np.ascontiguousarray(W, dtype=np.float64)
    r, bsize = step_ranges(W, spec.granularity, spec.group_size)
    if not np.isfinite(r).all():  # max |w| is NaN or inf exactly when some w is
        raise ValueError("quantize_layer: W contains NaN or inf")
    if moments.m == 0:
        raise ValueError("quantize_layer: moments saw no calibration rows")
    g, n0, n1 = W.shape
    problem = _GramProblem(W, moments) if moments.form == "gram" else _ResidualProblem(W, moments)
    grid = spec.c_grid if spec.scale_rule == "search" else (spec.c,)
    per_column = spec.search_per_channel and spec.granularity != "tensor"

    full = _full_search(spec, moments.m, n0, n1, g)

    def stages():
        return _Stages(grid, (g, n1), per_column, full)

    pair = spec.pair_bound or 0
    if isinstance(problem, _ResidualProblem) and problem.fused:
        best, rtn = problem.search(r, bsize, stages, spec.method, spec.alphabet, spec.sparsity, pair)
    else:
        best = _search(problem, r, bsize, stages(), spec.method, spec.alphabet, spec.sparsity, pair)
        rtn = best if spec.method == "rtn" else _search(problem, r, bsize, stages(), "rtn", spec.alphabet,
                                                        spec.sparsity, pair)

    denom = float(problem.wfw.sum())

    def rel(err):
        num = max(float(err.sum()), 0.0)
        return num / denom if denom > 0 else (0.0 if num == 0 else math.inf)

    scale = np.where(best.delta > 0, best.delta, 1.0)
    bias_delta = None
    if spec.bias_correction:
        Q = best.codes * _rows_of(best.delta, bsize, n0)
        bias_delta = (np.einsum("gi,gin->gn", moments.mu_x, W) - np.einsum("gi,gin->gn", moments.mu_xt, Q))
    zeros = best.codes.size - np.count_nonzero(best.codes)  # = mean(codes == 0) * size, no bool temporary
    return LayerResult(
        codes=best.codes, scale=scale, C=best.C, rel_error=rel(best.err), rel_error_rtn=rel(rtn.err),
        sparsity=zeros / best.codes.size, bias_delta=bias_delta,
        form="projected" if moments.W is not None else moments.form, group_size=bsize,
    )
