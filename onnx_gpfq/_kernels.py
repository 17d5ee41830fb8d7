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
def greedy_block(base, boff, L, H, hoff, Q, codes, qoff, delta, doff, bsize, lo, hi, mode, lam, dead, qhq):
    """Greedy rounding of nb consecutive fan-in rows, all groups and all columns together.

    For row i of the block (fan-in index t = doff + i), with the block's rows s < t:

        L[i]  += sum_{j < i} H[hoff + i, hoff + j] * Q[qoff + j]        (the triangle)
        z      = (base[boff + i] - L[i]) / H[hoff + i, hoff + i]
        code   = quant_code(z, delta[t // bsize])                       (0 if H[t,t] <= dead)
        Q[qoff + i] = code * delta,  codes[qoff + i] = code
        qhq   += Q_t * (2 L[i] + H[t,t] Q_t)                            (builds q^T H q)

    Shapes (leading axis g = groups):
      base  (g, *, N1)   sum_{s<=t} G[t,s] W[s] (rows boff..) -- C-independent part of z*H[t,t]
      L     (g, nb, N1)  on entry sum over rows before the block of H[t,s] Q[s]; on exit the full
                         sum_{s<t} H[t,s] Q[s]
      H     (g, *, *)    Gram matrix Xt^T Xt (rows/cols hoff..)
      Q     (g, *, N1)   float64 dequantized output (rows qoff..), codes (g, *, N1) int32 likewise
      delta (g, nb_delta, N1) step per block of bsize fan-in rows; dead (g,) threshold on H[t,t]
      qhq   (g, N1)      accumulator
    The inner loops run over the N1 columns, contiguous in memory.
    """
    g, nb, n1 = L.shape
    for k in range(g):
        for i in range(nb):
            th = hoff + i
            Lrow = L[k, i]
            # triangle: four earlier rows per sweep over the columns (fewer loads/stores of Lrow)
            j = 0
            while j + 4 <= i:
                h0 = H[k, th, hoff + j]
                h1 = H[k, th, hoff + j + 1]
                h2 = H[k, th, hoff + j + 2]
                h3 = H[k, th, hoff + j + 3]
                q0 = Q[k, qoff + j]
                q1 = Q[k, qoff + j + 1]
                q2 = Q[k, qoff + j + 2]
                q3 = Q[k, qoff + j + 3]
                for c in range(n1):
                    Lrow[c] += ((h0 * q0[c] + h1 * q1[c]) + (h2 * q2[c] + h3 * q3[c]))
                j += 4
            while j < i:
                h0 = H[k, th, hoff + j]
                q0 = Q[k, qoff + j]
                for c in range(n1):
                    Lrow[c] += h0 * q0[c]
                j += 1
            htt = H[k, th, th]
            Qrow = Q[k, qoff + i]
            crow = codes[k, qoff + i]
            if not htt > dead[k]:
                for c in range(n1):
                    Qrow[c] = 0.0
                    crow[c] = 0
                continue
            drow = delta[k, (doff + i) // bsize]
            brow = base[k, boff + i]
            for c in range(n1):
                d = drow[c]
                z = (brow[c] - Lrow[c]) / htt
                code = quant_code(z, d, lo, hi, mode, lam)
                q = code * d if code != 0 else 0.0
                crow[c] = code
                Qrow[c] = q
                qhq[k, c] += q * (2.0 * Lrow[c] + htt * q)
