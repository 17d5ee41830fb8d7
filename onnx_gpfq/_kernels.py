"""Numba kernels of the GPFQ greedy pass (no ONNX, no options: plain arrays and scalars).

Only the sequential part lives here: the triangle inside one block of B fan-in rows, where
each rounding decision feeds the next row. Everything that can be a matrix product stays in
numpy (BLAS) in :mod:`onnx_gpfq.gpfq`. Compiled with ``cache=True`` and without fastmath, so
results are deterministic: same input -> same bits.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Sparsity modes understood by the kernels (kept as small ints so one compiled signature serves all).
MODE_PLAIN = 0  # q = Quant(z)
MODE_SOFT = 1  # q = Quant(sign(z) max(|z| - lam, 0))
MODE_HARD = 2  # q = 0 if |z| <= lam else nearest nonzero level


@njit(cache=True)
def quant_code(z, delta, lo, hi, mode, lam):
    """Integer level for the value z (weight units) on the grid {k delta : lo <= k <= hi}.

    Rounds half to even (np.rint), saturates at lo/hi. delta <= 0 marks an alphabet that
    collapsed to {0} (a block or column whose weights are all zero): the code is 0.
    """
    if not delta > 0.0:
        return 0
    if mode == MODE_SOFT:
        a = abs(z) - lam
        if a <= 0.0:
            return 0
        z = a if z > 0.0 else -a
    elif mode == MODE_HARD:
        if abs(z) <= lam:
            return 0
    x = np.rint(z / delta)
    if x < lo:
        x = lo
    elif x > hi:
        x = hi
    k = int(x)
    if mode == MODE_HARD and k == 0:
        k = 1 if z > 0.0 else -1
    return k


@njit(cache=True)
def greedy_block(base, boff, L, loff, H, hoff, Q, codes, qoff, delta, doff, bsize, nb, lo, hi, mode, lam, dead, qhq):
    """Greedy rounding of nb consecutive fan-in rows, all groups and all columns together.

    For row i = 0..nb-1 of the block (fan-in index t = doff + i), with the block's rows s < t:

        L[loff + i] += sum_{j < i} H[hoff + i, hoff + j] * Q[qoff + j]  (the triangle)
        z      = (base[boff + i] - L[loff + i]) / H[hoff + i, hoff + i]
        code   = quant_code(z, delta[t // bsize])                       (0 if H[t,t] <= dead)
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
    The inner loops run over the N1 columns, contiguous in memory.
    """
    g, _, n1 = L.shape
    if n1 == 1:
        _greedy_block_one_column(base, boff, L, loff, H, hoff, Q, codes, qoff, delta, doff, bsize, nb, lo, hi, mode,
                                 lam, dead, qhq)
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
                continue
            td = (doff + i) // bsize
            tb = boff + i
            for c in range(n1):
                d = delta[k, td, c]
                Lc = L[k, loff + i, c]
                z = (base[k, tb, c] - Lc) / htt
                code = quant_code(z, d, lo, hi, mode, lam)
                q = code * d if code != 0 else 0.0
                codes[k, tq, c] = code
                Q[k, tq, c] = q
                qhq[k, c] += q * (2.0 * Lc + htt * q)


@njit(cache=True)
def _greedy_block_one_column(base, boff, L, loff, H, hoff, Q, codes, qoff, delta, doff, bsize, nb, lo, hi, mode,
                             lam, dead, qhq):
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
                continue
            d = delta[k, (doff + i) // bsize, 0]
            z = (base[k, boff + i, 0] - acc) / htt
            code = quant_code(z, d, lo, hi, mode, lam)
            q = code * d if code != 0 else 0.0
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


@njit(cache=True)
def dead_threshold(H, tol):
    """(g,) tol * max_t H[k, t, t]: H[t,t] at or below it counts as a zero column of Xt."""
    g, n0, _ = H.shape
    out = np.empty(g)
    for k in range(g):
        m = 0.0
        for t in range(n0):
            if H[k, t, t] > m:
                m = H[k, t, t]
        out[k] = tol * m
    return out

