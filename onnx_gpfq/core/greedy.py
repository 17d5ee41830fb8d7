"""The greedy step, and the numba kernels that take it row after row (no ONNX, no options).

GPFQ's decision for fan-in row t of a column, in either form, is

    z_t = (a_t - l_t) / H[t,t],   q_t = Quant(z_t) (rounding.level, within pair_limits),

with a_t = (tril(G) W)_t = <Xt_t, X[:, :t+1] w[:t+1]> and l_t = sum_{s<t} H[t,s] q_s =
<Xt_t, Xt[:, :t] q[:t]>: the paper's z_t = <Xt_t, u_{t-1} + w_t X_t> / ||Xt_t||^2 with the
residual u written out. ``greedy_step`` is that line; every kernel calls it (greedy_block here
for the blocked Gram and residual forms, the fused residual kernel in fused.py).

The sequential part of a blocked pass is the triangle inside one block of B rows, where each
decision feeds the next row; the products for everything earlier are BLAS calls in gram.py and
residual.py. Compiled with ``cache=True`` and without fastmath (no reassociation, no FMA
contraction): same input, same bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .rounding import level, pair_limits

# H[t,t] <= DEAD_TOL * max_s H[s,s] counts as a zero column of Xt (dead channels, padding): q_t = 0,
# the data cannot see that weight.
DEAD_TOL = 1e-12


@njit(cache=True, inline="always", error_model="numpy")
def greedy_step(num, htt, d, lo, hi, mode, lam):
    """z = num / H[t,t], x = level(z) in [lo, hi]; returns (x, q = x d), the level as a float."""
    x = level(num / htt, d, lo, hi, mode, lam)
    return x, (x * d if x != 0.0 else 0.0)


@njit(cache=True, error_model="numpy")
def greedy_block(base, boff, L, loff, H, hoff, Q, codes, qoff, delta, doff, bsize, nb, lo, hi, mode, lam, pair, dead,
                 qhq, prev):
    """Greedy rounding of nb consecutive fan-in rows, all groups and all columns together.

    For row i = 0..nb-1 of the block (fan-in index t = doff + i), with the block's rows s < t:

        L[loff + i] += sum_{j < i} H[hoff + i, hoff + j] * Q[qoff + j]  (the triangle)
        z      = (base[boff + i] - L[loff + i]) / H[hoff + i, hoff + i]
        code   = level(z, delta[t // bsize])  (greedy_step; 0 if H[t,t] <= dead)
        Q[qoff + i] = code * delta,  codes[qoff + i] = code
        qhq   += Q_t * (2 L[loff + i] + H[t,t] Q_t)                     (builds q^T H q)

    Shapes (leading axis g = groups):
      base  (g, *, N1)   sum_{s<=t} G[t,s] W[s] (rows boff..) -- C-independent part of z*H[t,t]
      L     (g, *, N1)   rows loff..: on entry the sum over rows before the block of H[t,s] Q[s];
                         on exit the full sum_{s<t} H[t,s] Q[s]
      H     (g, *, *)    Gram matrix Xt^T Xt (rows/cols hoff..)
      Q     (g, *, N1)   float64 dequantized output (rows qoff..), codes (g, *, N1) int32 likewise
      delta (g, nb_delta, N1) step per block of bsize fan-in rows; dead (g,) threshold on H[t,t]
      qhq   (g, N1)      accumulator
      lo..pair           the rounding.Rule; prev (g, N1) int32: the code of the row before the
                         block on entry (read under a pair bound), of the block's last row on exit
    The inner loops run over the N1 columns, contiguous in memory.
    """
    g, _, n1 = L.shape
    if n1 == 1:
        _greedy_block_one_column(base, boff, L, loff, H, hoff, Q, codes, qoff, delta, doff, bsize, nb, lo, hi, mode,
                                 lam, pair, dead, qhq, prev)
        return
    # Row i of every group before row i + 1 of any: the groups are independent, so a depthwise
    # layer (g large, N1 = 1) is throughput-bound instead of latency-bound on the row chain.
    for i in range(nb):
        for k in range(g):
            dk = dead[k]
            th = hoff + i
            # triangle: four earlier rows per sweep over the columns (fewer loads/stores of L)
            j = 0
            while j + 4 <= i:
                h0 = H[k, th, hoff + j]
                h1 = H[k, th, hoff + j + 1]
                h2 = H[k, th, hoff + j + 2]
                h3 = H[k, th, hoff + j + 3]
                s = qoff + j
                for c in range(n1):
                    L[k, loff + i, c] += ((h0 * Q[k, s, c] + h1 * Q[k, s + 1, c])
                                          + (h2 * Q[k, s + 2, c] + h3 * Q[k, s + 3, c]))
                j += 4
            while j < i:
                h0 = H[k, th, hoff + j]
                s = qoff + j
                for c in range(n1):
                    L[k, loff + i, c] += h0 * Q[k, s, c]
                j += 1
            htt = H[k, th, th]
            tq = qoff + i
            if not htt > dk:
                for c in range(n1):
                    Q[k, tq, c] = 0.0
                    codes[k, tq, c] = 0
                    prev[k, c] = 0
                continue
            td = (doff + i) // bsize
            tb = boff + i
            for c in range(n1):
                d = delta[k, td, c]
                Lc = L[k, loff + i, c]
                clo, chi = pair_limits(doff + i, prev[k, c], lo, hi, pair)
                x, q = greedy_step(base[k, tb, c] - Lc, htt, d, clo, chi, mode, lam)
                code = np.int32(x)
                prev[k, c] = code
                codes[k, tq, c] = code
                Q[k, tq, c] = q
                qhq[k, c] += q * (2.0 * Lc + htt * q)


@njit(cache=True, error_model="numpy")
def _greedy_block_one_column(base, boff, L, loff, H, hoff, Q, codes, qoff, delta, doff, bsize, nb, lo, hi, mode,
                             lam, pair, dead, qhq, prev):
    """greedy_block for N1 == 1 (depthwise convs): the same arithmetic in the same order, without
    the per-row overhead of loops over one column."""
    g = L.shape[0]
    for i in range(nb):
        for k in range(g):
            th = hoff + i
            acc = L[k, loff + i, 0]
            j = 0
            while j + 4 <= i:
                s = qoff + j
                acc += ((H[k, th, hoff + j] * Q[k, s, 0] + H[k, th, hoff + j + 1] * Q[k, s + 1, 0])
                        + (H[k, th, hoff + j + 2] * Q[k, s + 2, 0] + H[k, th, hoff + j + 3] * Q[k, s + 3, 0]))
                j += 4
            while j < i:
                acc += H[k, th, hoff + j] * Q[k, qoff + j, 0]
                j += 1
            L[k, loff + i, 0] = acc
            htt = H[k, th, th]
            tq = qoff + i
            if not htt > dead[k]:
                Q[k, tq, 0] = 0.0
                codes[k, tq, 0] = 0
                prev[k, 0] = 0
                continue
            d = delta[k, (doff + i) // bsize, 0]
            clo, chi = pair_limits(doff + i, prev[k, 0], lo, hi, pair)
            x, q = greedy_step(base[k, boff + i, 0] - acc, htt, d, clo, chi, mode, lam)
            code = np.int32(x)
            prev[k, 0] = code
            codes[k, tq, 0] = code
            Q[k, tq, 0] = q
            qhq[k, 0] += q * (2.0 * acc + htt * q)


@njit(cache=True)
def tril_matmul_small(G, W, A):
    """A[k, t] = sum_{s<=t} G[k, t, s] W[k, s] for small N0 (one block), all groups."""
    g, n0, n1 = W.shape
    for k in range(g):
        for t in range(n0):
            for c in range(n1):
                acc = 0.0
                for s in range(t + 1):
                    acc += G[k, t, s] * W[k, s, c]
                A[k, t, c] = acc


def dead_threshold(H, tol=DEAD_TOL):
    """(g,) tol * max_t H[k, t, t] for H (g, N0, N0) C-contiguous: H[t,t] at or below it counts as a
    zero column of Xt."""
    out = np.empty(H.shape[0])
    _dead_threshold_into(H, tol, out)
    return out


@njit(cache=True)
def _dead_threshold_into(H, tol, out):
    """dead_threshold into out (g,) float64. Allocates nothing: a kernel that allocates makes
    loading it from the cache import numba.np.arrayobj (~0.04 s of a cold start)."""
    g, n0, _ = H.shape
    for k in range(g):
        m = 0.0
        for t in range(n0):
            if H[k, t, t] > m:
                m = H[k, t, t]
        out[k] = tol * m
