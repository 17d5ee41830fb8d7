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

from .rounding import MODE_PLAIN, level, pair_breaks, pair_joint, pair_limits

# H[t,t] <= DEAD_TOL * max_s H[s,s] counts as a zero column of Xt (dead channels, padding): q_t = 0,
# the data cannot see that weight.
DEAD_TOL = 1e-12


@njit(cache=True, inline="always", error_model="numpy")
def greedy_step(num, htt, d, lo, hi, mode, lam):
    """z = num / H[t,t], x = level(z) in [lo, hi]; returns (x, q = x d), the level as a float."""
    x = level(num / htt, d, lo, hi, mode, lam)
    return x, (x * d if x != 0.0 else 0.0)


@njit(cache=True, inline="always", error_model="numpy")
def joint_step(num_a, num_b, qa_old, w_b, g_ab, h11, h21, h22, da, db, lo, hi, pair):
    """The pair (rows a = 2j, b = 2j+1) re-decided jointly (rounding.pair_joint) once row b's greedy
    level broke the bound with row a's q_a = qa_old. num_a = (tril(G) W)_a - sum_{s<a} H[a,s] q_s
    (row a's z times H[a,a]); num_b the same for row b, with qa_old among the q_s; w_b row b's
    weight, g_ab = G[a,b]: c_a = num_a + G[a,b] w_b, c_b = num_b + H[b,a] qa_old.
    Returns (level a, q_a, level b, q_b)."""
    xa, xb = pair_joint(num_a + g_ab * w_b, num_b + h21 * qa_old, h11, h21, h22, da, db, lo, hi, pair)
    return xa, (xa * da if xa != 0.0 else 0.0), xb, (xb * db if xb != 0.0 else 0.0)


@njit(cache=True, inline="always", error_model="numpy")
def _revise_pair(base, tb, L, li, H, th, Q, codes, tq, qhq, W, gsup, delta, bsize, k, c, t, Lc, htt, d, lo, hi, pair):
    """greedy_block's row t (base row tb, L row li, H row th, Q row tq; group k, column c), the second of
    a pair, broke the bound with row t - 1: re-decide both (joint_step). Writes row t - 1's new Q and
    code and moves its share of q^T H q; returns row t's (level, q, L), L corrected for row t - 1's new q."""
    La = L[k, li - 1, c]
    qa_old = Q[k, tq - 1, c]
    h11 = H[k, th - 1, th - 1]
    h21 = H[k, th, th - 1]
    xa, qa, x, q = joint_step(base[k, tb - 1, c] - La, base[k, tb, c] - Lc, qa_old, W[k, t, c], gsup[k, t - 1], h11,
                              h21, htt, delta[k, (t - 1) // bsize, c], d, lo, hi, pair)
    Q[k, tq - 1, c] = qa
    codes[k, tq - 1, c] = np.int32(xa)
    qhq[k, c] += qa * (2.0 * La + h11 * qa) - qa_old * (2.0 * La + h11 * qa_old)
    Lc = (Lc - h21 * qa_old) + h21 * qa
    L[k, li, c] = Lc
    return x, q, Lc


@njit(cache=True, error_model="numpy")
def greedy_block(base, boff, L, loff, H, hoff, Q, codes, qoff, delta, doff, bsize, nb, lo, hi, mode, lam, pair, dead,
                 qhq, prev, W, gsup):
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
      W     (g, N0, N1)  the weights, gsup (g, N0) G[t, t+1] (both by fan-in index t, read only
                         for a pair re-decided jointly: joint_step)
    Under a pair bound (plain rounding) the second row of a pair whose greedy level breaks the
    bound re-decides the pair (row i - 1 too: its Q, codes, its share of q^T H q and of row i's
    L); the block must then start on an even row (a pair never straddles two blocks).
    The inner loops run over the N1 columns, contiguous in memory.
    """
    g, _, n1 = L.shape
    if n1 == 1:
        _greedy_block_one_column(base, boff, L, loff, H, hoff, Q, codes, qoff, delta, doff, bsize, nb, lo, hi, mode,
                                 lam, pair, dead, qhq, prev, W, gsup)
        return
    flo = float(lo)
    fhi = float(hi)
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
            t = doff + i
            td = t // bsize
            tb = boff + i
            joint = pair > 0 and mode == MODE_PLAIN and t % 2 == 1 and i > 0
            for c in range(n1):
                d = delta[k, td, c]
                Lc = L[k, loff + i, c]
                pv = prev[k, c]
                if joint and pv != 0 and pair_breaks(pv, level((base[k, tb, c] - Lc) / htt, d, flo, fhi, MODE_PLAIN,
                                                               0.0), pair):
                    x, q, Lc = _revise_pair(base, tb, L, loff + i, H, th, Q, codes, tq, qhq, W, gsup, delta, bsize, k,
                                            c, t, Lc, htt, d, lo, hi, pair)
                else:
                    clo, chi = pair_limits(t, pv, lo, hi, pair)
                    x, q = greedy_step(base[k, tb, c] - Lc, htt, d, clo, chi, mode, lam)
                code = np.int32(x)
                prev[k, c] = code
                codes[k, tq, c] = code
                Q[k, tq, c] = q
                qhq[k, c] += q * (2.0 * Lc + htt * q)


@njit(cache=True, error_model="numpy")
def _greedy_block_one_column(base, boff, L, loff, H, hoff, Q, codes, qoff, delta, doff, bsize, nb, lo, hi, mode,
                             lam, pair, dead, qhq, prev, W, gsup):
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
            t = doff + i
            d = delta[k, t // bsize, 0]
            pv = prev[k, 0]
            if (pair > 0 and mode == MODE_PLAIN and t % 2 == 1 and i > 0 and pv != 0
                    and pair_breaks(pv, level((base[k, boff + i, 0] - acc) / htt, d, float(lo), float(hi),
                                              MODE_PLAIN, 0.0), pair)):
                x, q, acc = _revise_pair(base, boff + i, L, loff + i, H, th, Q, codes, tq, qhq, W, gsup, delta, bsize,
                                         k, 0, t, acc, htt, d, lo, hi, pair)
            else:
                clo, chi = pair_limits(t, pv, lo, hi, pair)
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
