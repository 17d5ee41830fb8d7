"""The one rounding rule: the level an alphabet gives a value, and the pair bound on consecutive rows.

Quant(z) on the grid {k delta : lo <= k <= hi} is rint(z / delta) clipped to [lo, hi] (round half
to even, saturating). delta <= 0 marks an alphabet that collapsed to {0} (a column or block whose
weights are all zero): the code is 0. Sparsity promotion with an absolute threshold lam changes
the rule (see spec.Sparsity): soft, q = Quant(sign(z) max(|z| - lam, 0)); hard, q = 0 if
|z| <= lam, else the nearest *nonzero* level.

The pair bound (QuantSpec.pair_bound = P). onnxruntime's default x86 int8 kernels without VNNI
(AVX2 / AVX-512BW u8s8, built on vpmaddubsw) multiply uint8 activations by int8 weights and add
the products two at a time into int16 *with saturation*: a_2j q_2j + a_2j+1 q_2j+1 must fit in
int16 for every a in 0..255. Two codes of the same sign reach 255 (|q_2j| + |q_2j+1|), so their
magnitudes must sum to at most 128 (255 * 128 = 32640 <= 32767); codes of opposite signs partly
cancel, reach at most 255 * max(|q_2j|, |q_2j+1|) <= 255 * 128, and never saturate. The bound is
therefore max(q_2j+ + q_2j+1+, q_2j- + q_2j+1-) <= P (x+ = max(x, 0), x- = max(-x, 0)).
Codes that break it are not an error there: the sum silently clips, and the deployed model is
less accurate than its QDQ graph says. GPFQ walks the fan-in in order, so it enforces the bound
as it goes: the first row of a pair takes its level from [-P, P], the second from
[-(P - q_2j-), P - q_2j+] (both intersected with the alphabet): only the side of q_2j's sign
narrows, and the greedy step compensates what the narrowed range costs in the rows that follow.
RTN clips the second row of each pair the same way. Pairs are rows (0, 1), (2, 3), ... of each
group in the order the rows are given (the caller permutes them into the kernel's reduction
order); with N0 odd the last row is unpaired (range [-P, P]).

The pair decided jointly (GPFQ, plain rounding). Narrowing only the second row makes the first
row's greedy choice blind to the bound: a large q_2j leaves q_2j+1 almost nothing, and the error
that costs lands on the rows after it. So when the second row's unbounded greedy level would
break the bound with the first row's (``pair_breaks``), GPFQ re-decides both rows together
(``pair_joint``): the feasible pair (levels a, b) that leaves the smallest residual after both,

    min ||r - q_a Xt_a - q_b Xt_b||^2,   r = u_{2j-1} + w_2j X_2j + w_2j+1 X_2j+1,

every level a of the first row's range tried (ascending, the first minimum kept), b the nearest
level of its own greedy value z_b(a) within the range a leaves it. Expanded with c_a = <Xt_a, r>,
c_b = <Xt_b, r> and H's 2 x 2 block it is the quadratic of ``pair_joint``. Where the greedy pair
keeps the bound nothing changes (the same codes as the sequential rule), so the joint decision
only ever lowers the residual the pair leaves. Sparsity-promoting modes keep the sequential rule.

Every kernel (greedy_step in greedy.py, the fused residual kernel, quantize_array below) calls
``level`` and ``pair_limits`` (the GPFQ kernels also ``pair_breaks`` and ``pair_joint``); numba inlines them, so the loops that call them with the plain rule
still vectorise. Compiled without fastmath: same input, same bits.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from .steps import as3, delta3

# Sparsity modes understood by the kernels (kept as small ints so one compiled signature serves all).
MODE_PLAIN = 0  # q = Quant(z)
MODE_SOFT = 1  # q = Quant(sign(z) max(|z| - lam, 0))
MODE_HARD = 2  # q = 0 if |z| <= lam else nearest nonzero level


class Rule(NamedTuple):
    """The rounding rule of one layer as the kernels take it (``*rule``): levels lo..hi, sparsity
    mode and threshold lam, pair bound (0: none)."""

    lo: int
    hi: int
    mode: int
    lam: float
    pair: int

    @staticmethod
    def of(alphabet, sparsity=None, pair_bound: int | None = None) -> "Rule":
        if sparsity is None:
            mode, lam = MODE_PLAIN, 0.0
        else:
            mode, lam = (MODE_SOFT if sparsity.kind == "soft" else MODE_HARD), float(sparsity.lam)
        return Rule(int(alphabet.lo), int(alphabet.hi), mode, lam, int(pair_bound or 0))


@njit(cache=True, inline="always", error_model="numpy")
def level(z, d, lo, hi, mode, lam):
    """The integer level (as a float) for the value z with step d, in [lo, hi]: the rule of the
    module docstring. Branch-free for MODE_PLAIN (loops over columns vectorise)."""
    if mode == MODE_SOFT:
        a = abs(z) - lam
        if a <= 0.0:
            return 0.0
        z = a if z > 0.0 else -a
    elif mode == MODE_HARD:
        if abs(z) <= lam:
            return 0.0
    x = np.rint(z / d)
    x = min(max(x, lo), hi)
    if mode == MODE_HARD and x == 0.0:
        x = 1.0 if z > 0.0 else -1.0
        if x < lo or x > hi:  # only under a pair bound, which can narrow the range to {0}
            x = 0.0
    return x if d > 0.0 else 0.0


@njit(cache=True, inline="always")
def pair_limits(t, prev, lo, hi, pair):
    """Level range (lo', hi') of fan-in row t under the pair bound (pair <= 0: none, (lo, hi)).
    prev: the code chosen for row t - 1. First row of a pair: [-pair, pair]; second:
    [-(pair - max(-prev, 0)), pair - max(prev, 0)] (a code of prev's sign may only add up to pair
    with it); both intersected with [lo, hi]."""
    if pair <= 0:
        return float(lo), float(hi)
    if t % 2 == 1:
        return float(max(lo, -(pair - max(-prev, 0)))), float(min(hi, pair - max(prev, 0)))
    return float(max(lo, -pair)), float(min(hi, pair))


@njit(cache=True, inline="always")
def pair_breaks(prev, x, pair):
    """Whether codes prev (row 2j) and x (row 2j+1) of the same sign add up beyond pair (> 0)."""
    return (prev > 0 and x > 0 and prev + x > pair) or (prev < 0 and x < 0 and -(prev + x) > pair)


@njit(cache=True, inline="always", error_model="numpy")
def pair_joint(ca, cb, h11, h21, h22, da, db, lo, hi, pair):
    """Levels (a, b), as floats, of the pair (rows 2j, 2j+1) minimising

        f(a, b) = qa (h11 qa - 2 ca) + qb (h22 qb - 2 cb) + 2 h21 qa qb,   qa = a da, qb = b db

    (= ||r - qa Xt_2j - qb Xt_2j+1||^2 - ||r||^2 with ca = <Xt_2j, r>, cb = <Xt_2j+1, r>,
    h11, h21, h22 = H's 2 x 2 block) under the pair bound: a over every level of
    [max(lo, -pair), min(hi, pair)] in ascending order, b = level((cb - h21 qa) / h22, db) within
    pair_limits(a) (the exact minimiser over b for that a); the first minimum of f is kept.
    da, db > 0 and h22 > 0 (the caller's case: both rows live, both codes nonzero)."""
    best = np.inf
    ba = 0.0
    bb = 0.0
    for ia in range(max(lo, -pair), min(hi, pair) + 1):
        qa = ia * da
        xb = level((cb - h21 * qa) / h22, db, float(max(lo, -(pair - max(-ia, 0)))),
                   float(min(hi, pair - max(ia, 0))), MODE_PLAIN, 0.0)
        qb = xb * db
        f = qa * (h11 * qa - 2.0 * ca) + qb * (h22 * qb - 2.0 * cb) + 2.0 * h21 * qa * qb
        if f < best:
            best = f
            ba = float(ia)
            bb = xb
    return ba, bb


@njit(cache=True, error_model="numpy")
def quantize_array(z, d, bsize, lo, hi, mode, lam, pair, out):
    """out = level(z, d) elementwise for z (g, N0, N1) float64 and steps d (gd, nd, nd1),
    gd in (1, g), nd1 in (1, N1) (broadcast), nd = 1 (one row for all) or ceil(N0 / bsize) (row t
    uses d[:, t // bsize]); NaN z -> INT32_MIN (as NumPy's cast). pair > 0: rows t along axis 1
    obey the pair bound, row t limited by row t - 1's code."""
    g, n0, n1 = z.shape
    gd, nd, nd1 = d.shape
    flo = float(lo)
    fhi = float(hi)
    for k in range(g):
        kd = k if gd > 1 else 0
        for t in range(n0):
            zr = z[k, t]
            dr = d[kd, t // bsize if nd > 1 else 0]
            o = out[k, t]
            if mode == MODE_PLAIN and nd1 == n1 and pair <= 0:
                for c in range(n1):
                    dc = dr[c]
                    y = zr[c]
                    x = level(y, dc, flo, fhi, MODE_PLAIN, 0.0)
                    o[c] = np.int32(x) if (y == y or not dc > 0.0) else np.int32(-2147483648)
            else:
                for c in range(n1):
                    dc = dr[c if nd1 > 1 else 0]
                    zc = zr[c]
                    if zc != zc and dc > 0.0:
                        o[c] = -2147483648
                    else:
                        clo, chi = pair_limits(t, out[k, t - 1, c] if t > 0 else 0, lo, hi, pair)
                        o[c] = np.int32(level(zc, dc, clo, chi, mode, lam))


def quantize_codes(z: np.ndarray, delta_rows: np.ndarray, alphabet, sparsity=None) -> np.ndarray:
    """Codes int32 for values z (any shape) with steps delta_rows (broadcastable to z), by the rule
    of the module docstring (no pair bound: the values need not be rows of a fan-in)."""
    z = np.asarray(z, dtype=np.float64)
    d = np.asarray(delta_rows, dtype=np.float64)
    out = np.empty(z.shape, np.int32)
    if z.size == 0:
        return out
    if 2 <= z.ndim <= 3 and d.ndim <= z.ndim:  # broadcast inside the kernel, no copy of d
        z3 = z if z.ndim == 3 else z[None]
        d3 = d.reshape((1,) * (3 - d.ndim) + d.shape)
        if any(dn not in (1, zn) for dn, zn in zip(d3.shape, z3.shape)):
            raise ValueError(f"quantize_codes: steps of shape {d.shape} do not broadcast to {z.shape}")
    else:
        z3 = z.reshape(1, 1, -1)
        d3 = np.ascontiguousarray(np.broadcast_to(d, z.shape)).reshape(1, 1, -1)
    quantize_array(np.ascontiguousarray(z3), d3, 1, *Rule.of(alphabet, sparsity), out.reshape(z3.shape))
    return out


def rtn(W: np.ndarray, delta: np.ndarray, bsize: int, rule: Rule) -> np.ndarray:
    """Round to nearest (the paper's MSQ): codes (g, N0, N1) int32 of W (g, N0, N1) with steps
    delta (g, nb, N1) (block b for rows b*bsize..), under the rule (pair bound included)."""
    codes = np.empty(W.shape, np.int32)
    quantize_array(W, np.ascontiguousarray(delta), bsize, *rule, codes)
    return codes


def rtn_codes(W: np.ndarray, delta, alphabet, sparsity=None, group_size: int = 0,
              pair_bound: int | None = None) -> np.ndarray:
    """Round to nearest (MSQ): codes = clip(round(W / delta), lo, hi) (the same sparsity rule and
    pair bound as GPFQ, applied to w instead of z). W (N0, N1) or (g, N0, N1); delta: scalar,
    (N1,), (nb, N1) or (g, nb, N1), nb = 1 or ceil(N0 / group_size)."""
    W3, squeeze = as3(W, "W")
    g, n0, n1 = W3.shape
    d, bsize = delta3(delta, g, n0, n1, group_size)
    codes = rtn(W3, d, bsize, Rule.of(alphabet, sparsity, pair_bound))
    return codes[0] if squeeze else codes
