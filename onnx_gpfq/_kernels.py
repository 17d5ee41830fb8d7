"""Numba kernels of the GPFQ greedy pass (no ONNX, no options: plain arrays and scalars).

The sequential part: the triangle inside one block of B fan-in rows, where each rounding
decision feeds the next row, and the whole residual-form pass for few calibration rows
(residual_lanes, where the block products would be tiny). Plus one-pass elementwise kernels
over the weight (max |w|, rounding) that avoid numpy's full-size temporaries. Everything that
is a sizeable matrix product stays in numpy (BLAS) in :mod:`onnx_gpfq.gpfq`. Compiled with
``cache=True`` and without fastmath (no reassociation, no FMA contraction), so results are
deterministic: same input -> same bits.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

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
        if k < lo or k > hi:  # only under a pair bound, which can narrow the range to {0}
            k = 0
    return k


@njit(cache=True, inline="always")
def pair_limits(t, prev, lo, hi, pair):
    """Level range [lo', hi'] of fan-in row t under the pair bound |q_2j| + |q_2j+1| <= pair
    (pair <= 0: no bound, [lo, hi]). prev: the code chosen for row t - 1. The first row of a pair
    gets [-pair, pair] (so that its partner always has a level, 0), the second what is left,
    [-(pair - |prev|), pair - |prev|]; both intersected with [lo, hi]."""
    if pair <= 0:
        return lo, hi
    b = pair - abs(prev) if t % 2 == 1 else pair
    return max(lo, -b), min(hi, b)


MIN_TILE = 32  # columns: the smallest share of a layer's columns given to one of numba's threads


def column_tile(n1: int, largest: int, groups: int = 1) -> int:
    """Columns per task for residual_lanes, which splits (group, column tile) pairs over numba's
    threads: ``largest`` when the groups alone give every thread a task, else the columns split
    evenly over the threads, within MIN_TILE..largest. A column's arithmetic never depends on it."""
    threads = numba.get_num_threads()
    if groups >= threads:
        return largest
    return max(1, min(largest, max(MIN_TILE, -(-n1 // threads))))


@njit(cache=True)
def greedy_block(base, boff, L, loff, H, hoff, Q, codes, qoff, delta, doff, bsize, nb, lo, hi, mode, lam, dead, qhq,
                 pair, prev):
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
      pair, prev (g, N1) int32: the pair bound (0: none, see pair_limits) and the code of the row
                         before the block on entry, of the block's last row on exit
    The inner loops run over the N1 columns, contiguous in memory.
    """
    g, _, n1 = L.shape
    if n1 == 1:
        _greedy_block_one_column(base, boff, L, loff, H, hoff, Q, codes, qoff, delta, doff, bsize, nb, lo, hi, mode,
                                 lam, dead, qhq, pair, prev)
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
                z = (base[k, tb, c] - Lc) / htt
                clo, chi = pair_limits(doff + i, prev[k, c], lo, hi, pair)
                code = quant_code(z, d, clo, chi, mode, lam)
                prev[k, c] = code
                q = code * d if code != 0 else 0.0
                codes[k, tq, c] = code
                Q[k, tq, c] = q
                qhq[k, c] += q * (2.0 * Lc + htt * q)


@njit(cache=True)
def _greedy_block_one_column(base, boff, L, loff, H, hoff, Q, codes, qoff, delta, doff, bsize, nb, lo, hi, mode,
                             lam, dead, qhq, pair, prev):
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
            z = (base[k, boff + i, 0] - acc) / htt
            clo, chi = pair_limits(doff + i, prev[k, 0], lo, hi, pair)
            code = quant_code(z, d, clo, chi, mode, lam)
            prev[k, 0] = code
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


def dead_threshold(H, tol):
    """(g,) tol * max_t H[k, t, t]: H[t,t] at or below it counts as a zero column of Xt."""
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



# ----------------------------------------------------------------------------------------------
# Residual form, fused (few calibration rows)
# ----------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _level(z, d, flo, fhi):
    """quant_code for MODE_PLAIN as a float (branch-free, so loops over columns vectorise):
    rint(z / d) clipped to [lo, hi], 0.0 where d <= 0. Needs error_model="numpy" (z / 0)."""
    x = np.rint(z / d)
    x = min(max(x, flo), fhi)
    return x if d > 0.0 else 0.0


@njit(cache=True, error_model="numpy", parallel=True)
def residual_lanes(W, XT, XtT, hd, dead, DG, DR, bsize, lo, hi, mode, lam, pair, tile, store, codes, err_g, err_r,
                   xw2):
    """The residual form row by row, for several step choices ("lanes") at once.

    For every group k and column c, walking the fan-in t = 0..N0-1 with the running products
    V = X[:, :t+1] W[:t+1] (shared by all lanes) and, per lane, R = Xt[:, :t] Q[:t] (m values):

        GPFQ lane l: z = (Xt_t . V - Xt_t . R) / H[t,t],  code = quant(z, DG[l])   (0 if H[t,t] <= dead)
        RTN  lane l: code = quant(w_t, DR[l])
        R += Xt_t * code * delta

    which is GPFQ's u_t = V - R recursion; at the end err = ||V - R||^2 per lane and column and
    xw2 = ||V||^2 = ||X w||^2. Costs ~4 m flops per row, column and lane, no N0 x N0 and no
    matrix products: the cheap choice when m is small (the blocked form's per-block products
    are then rank-m updates dominated by overhead). Columns are independent and processed in
    tiles of `tile`; one sweep over a lane's R per row updates it and accumulates the next row's
    Xt_{t+1} . R, in the order k = 0..m-1. A column's arithmetic does not depend on the tile or on
    the other lanes (same bits whatever the batch); the (group, tile) pairs run on numba's threads.

    W (g, N0, N1) float64; XT, XtT (g, N0, m) = X, Xt transposed; hd (g, N0) = H[t,t];
    dead (g,); DG (nG, g, nb, N1), DR (nR, g, nb, N1) steps per block of bsize fan-in rows;
    pair: the pair bound on consecutive rows' codes (0: none; see pair_limits), for every lane;
    store: write lane 0's GPFQ codes into codes (g, N0, N1) int32; err_g (nG, g, N1),
    err_r (nR, g, N1), xw2 (g, N1) outputs.
    """
    g, n1 = W.shape[0], W.shape[2]
    T = max(1, min(tile, n1))
    tiles = -(-n1 // T)
    for task in prange(g * tiles):
        kg = task // tiles
        c0 = (task % tiles) * T
        _residual_tile(kg, c0, min(c0 + T, n1), W, XT, XtT, hd, dead, DG, DR, bsize, lo, hi, mode, lam, pair, store,
                       codes, err_g, err_r, xw2)


@njit(cache=True, error_model="numpy")
def _residual_tile(kg, c0, c1, W, XT, XtT, hd, dead, DG, DR, bsize, lo, hi, mode, lam, pair, store, codes, err_g, err_r,
                   xw2):
    """residual_lanes for group kg and the columns c0..c1-1 (its own scratch arrays)."""
    n0 = W.shape[1]
    m = XT.shape[2]
    nG = DG.shape[0]
    nR = DR.shape[0]
    nt = c1 - c0
    V = np.empty((m, nt))
    RG = np.empty((nG, m, nt))
    RR = np.empty((nR, m, nt))
    QR = np.empty((nR, 4, nt))  # the RTN lanes' q of up to four rows, not yet added to R
    LG = np.empty((nG, nt))  # Xt_t . R for the current row, per GPFQ lane
    a = np.empty(nt)
    xs = np.empty(nt)
    qv = np.empty(nt)
    zero_row = np.zeros(m)
    # the previous row's code per lane and column (read only under a pair bound)
    PG = np.zeros((nG, nt), np.int64)
    PR = np.zeros((nR, nt), np.int64)
    flo = float(lo)
    fhi = float(hi)
    dk = dead[kg]
    V[:] = 0.0
    RG[:] = 0.0
    RR[:] = 0.0
    LG[:] = 0.0
    for t in range(n0):
        htt = hd[kg, t]
        live = htt > dk
        td = t // bsize
        w = W[kg, t, c0:c1]
        xrow = XT[kg, t]
        xtrow = XtT[kg, t]
        ynext = XtT[kg, t + 1] if t + 1 < n0 else zero_row
        # shared: V += X_t w_t and a = Xt_t . V  (= (tril(G) W)_t), k in order
        for c in range(nt):
            a[c] = 0.0
        for k in range(m):
            xk = xrow[k]
            yk = xtrow[k]
            Vk = V[k]
            for c in range(nt):
                v = Vk[c] + xk * w[c]
                Vk[c] = v
                a[c] += yk * v
        for l in range(nG):
            d_ = DG[l, kg, td, c0:c1]
            R = RG[l]
            L = LG[l]
            P = PG[l]
            if live:
                if mode == MODE_PLAIN and pair <= 0:
                    for c in range(nt):
                        d = d_[c]
                        x = _level((a[c] - L[c]) / htt, d, flo, fhi)
                        xs[c] = x
                        qv[c] = x * d if x != 0.0 else 0.0
                else:
                    for c in range(nt):
                        d = d_[c]
                        clo, chi = pair_limits(t, P[c], lo, hi, pair)
                        code = quant_code((a[c] - L[c]) / htt, d, clo, chi, mode, lam)
                        P[c] = code
                        xs[c] = code
                        qv[c] = code * d if code != 0 else 0.0
                if store and l == 0:
                    for c in range(nt):
                        codes[kg, t, c0 + c] = np.int32(xs[c])
            else:  # a zero column of Xt: q_t = 0, R unchanged
                for c in range(nt):
                    P[c] = 0
                if store and l == 0:
                    for c in range(nt):
                        codes[kg, t, c0 + c] = 0
            # one sweep: R += Xt_t q_t and L = Xt_{t+1} . R (next row)
            for c in range(nt):
                L[c] = 0.0
            for k in range(m):
                xk = xtrow[k]
                yk = ynext[k]
                Rk = R[k]
                if live:
                    for c in range(nt):
                        r = Rk[c] + xk * qv[c]
                        Rk[c] = r
                        L[c] += yk * r
                else:
                    for c in range(nt):
                        L[c] += yk * Rk[c]
        # RTN lanes: q does not depend on R, so R += Xt_t q_t is applied four rows at a
        # time (same additions in the same order, one pass over R instead of four)
        j = t % 4
        flush = j == 3 or t == n0 - 1
        for l in range(nR):
            d_ = DR[l, kg, td, c0:c1]
            qj = QR[l, j]
            if mode == MODE_PLAIN and pair <= 0:
                for c in range(nt):
                    d = d_[c]
                    x = _level(w[c], d, flo, fhi)
                    qj[c] = x * d if x != 0.0 else 0.0
            else:
                P = PR[l]
                for c in range(nt):
                    d = d_[c]
                    clo, chi = pair_limits(t, P[c], lo, hi, pair)
                    code = quant_code(w[c], d, clo, chi, mode, lam)
                    P[c] = code
                    qj[c] = code * d if code != 0 else 0.0
            if not flush:
                continue
            R = RR[l]
            tb = t - j
            if j == 3:
                q0, q1, q2, q3 = QR[l, 0], QR[l, 1], QR[l, 2], QR[l, 3]
                for k in range(m):
                    x0, x1, x2, x3 = XtT[kg, tb, k], XtT[kg, tb + 1, k], XtT[kg, tb + 2, k], XtT[kg, tb + 3, k]
                    Rk = R[k]
                    for c in range(nt):
                        Rk[c] = (((Rk[c] + x0 * q0[c]) + x1 * q1[c]) + x2 * q2[c]) + x3 * q3[c]
            else:
                for k in range(m):
                    Rk = R[k]
                    for i in range(j + 1):
                        xi = XtT[kg, tb + i, k]
                        qi = QR[l, i]
                        for c in range(nt):
                            Rk[c] += xi * qi[c]
    for c in range(nt):
        xw2[kg, c0 + c] = 0.0
    for k in range(m):
        for c in range(nt):
            xw2[kg, c0 + c] += V[k, c] * V[k, c]
    for l in range(nG):
        _squared_distance(V, RG[l], err_g[l, kg], c0)
    for l in range(nR):
        _squared_distance(V, RR[l], err_r[l, kg], c0)


@njit(cache=True, error_model="numpy")
def _squared_distance(V, R, out, c0):
    """out[c0 + c] = sum_k (V[k, c] - R[k, c])^2 over the m rows, k in order."""
    nt = V.shape[1]
    for c in range(nt):
        out[c0 + c] = 0.0
    for k in range(V.shape[0]):
        for c in range(nt):
            u = V[k, c] - R[k, c]
            out[c0 + c] += u * u


# ----------------------------------------------------------------------------------------------
# Elementwise passes over the weight (one pass, no temporaries)
# ----------------------------------------------------------------------------------------------


@njit(cache=True)
def abs_max_blocks(W, bsize, out):
    """out[k, b, c] = max |W[k, t, c]| over the rows t of block b (bsize rows each); NaN
    propagates like numpy's max. out (g, ceil(N0 / bsize), N1) of W's dtype."""
    g, n0, n1 = W.shape
    nb = out.shape[1]
    for k in range(g):
        for b in range(nb):
            o = out[k, b]
            t0 = b * bsize
            t1 = min(t0 + bsize, n0)
            for c in range(n1):
                o[c] = abs(W[k, t0, c])
            for t in range(t0 + 1, t1):
                row = W[k, t]
                for c in range(n1):
                    x = abs(row[c])
                    if not x <= o[c] and o[c] == o[c]:  # larger, or the first NaN
                        o[c] = x


@njit(cache=True, error_model="numpy")
def quantize_array(z, d, bsize, lo, hi, mode, lam, pair, out):
    """out = quant_code(z, d) elementwise for z (g, N0, N1) float64 and steps d (gd, nd, nd1),
    gd in (1, g), nd1 in (1, N1) (broadcast), nd = 1 (one row for all) or ceil(N0 / bsize) (row t
    uses d[:, t // bsize]); NaN z -> INT32_MIN (as numpy's cast in quantize_codes). pair > 0:
    rows t along axis 1 obey the pair bound (see pair_limits), row t limited by row t - 1's code."""
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
                    y = zr[c] / dc
                    x = min(max(np.rint(y), flo), fhi)
                    if not dc > 0.0:
                        x = 0.0
                    o[c] = np.int32(x) if (y == y or not dc > 0.0) else np.int32(-2147483648)
            else:
                for c in range(n1):
                    dc = dr[c if nd1 > 1 else 0]
                    zc = zr[c]
                    if zc != zc and dc > 0.0:
                        o[c] = -2147483648
                    else:
                        clo, chi = pair_limits(t, out[k, t - 1, c] if t > 0 else 0, lo, hi, pair)
                        o[c] = quant_code(zc, dc, clo, chi, mode, lam)


# ----------------------------------------------------------------------------------------------
# Cold start: load the cached kernels without numba's full context refresh
# ----------------------------------------------------------------------------------------------


def _load_from_cache_without_refresh(namespace) -> None:
    """Make every cached kernel of this module load from numba's disk cache without the
    ``target_context.refresh()`` that numba's ``Cache.load_overload`` runs first.

    That refresh imports and installs all of numba's typing and lowering registries (NumPy,
    random, typed containers, jitclass, ..., and ``import scipy.linalg`` through
    ``numba.np.arraymath``'s BLAS probe): ~0.25 s, most of a fresh process's first quantize
    call, and all of it only needed to *compile*. Loading cached machine code needs the NRT
    (initialised here, exactly as the refresh would) and the C helper / math symbols installed
    when the CPU context is created; the kernels reference nothing else (checked: NRT_*,
    numba_* helpers, the Python C API and LLVM intrinsics). Whenever numba compiles anything
    (a cache miss, a new signature, anyone else's jitted code), its compiler runs the full
    refresh itself, as before. The loaded code is the cached code: same bits, same results.

    Only this module's dispatchers are changed (their own cache objects); if numba's internals
    are not what this expects (checked on numba 0.6x; other versions keep numba's own path), or
    ONNX_GPFQ_NUMBA_FULL_LOAD=1 is set, nothing is changed, and if the fast load fails for any
    reason the normal load (refresh included) runs instead.
    """
    import os

    import numba

    if os.environ.get("ONNX_GPFQ_NUMBA_FULL_LOAD") == "1" or not numba.__version__.startswith("0.6"):
        return
    try:
        from numba.core.caching import Cache
        from numba.core.dispatcher import Dispatcher
        from numba.core.runtime import rtsys
    except ImportError:  # pragma: no cover - another numba layout: keep numba's own path
        return
    if not all(hasattr(Cache, a) for a in ("load_overload", "_load_overload", "_guard_against_spurious_io_errors")):
        return  # pragma: no cover
    for obj in list(namespace.values()):
        cache = getattr(obj, "_cache", None) if isinstance(obj, Dispatcher) else None
        if not isinstance(cache, Cache):  # NullCache: caching off, nothing to load
            continue

        def load_overload(sig, target_context, _cache=cache, _full=cache.load_overload):
            try:
                rtsys.initialize(target_context)  # what the refresh would do first; idempotent
                with _cache._guard_against_spurious_io_errors():
                    return _cache._load_overload(sig, target_context)
            except Exception:
                return _full(sig, target_context)

        cache.load_overload = load_overload


_load_from_cache_without_refresh(globals())
