"""The residual form fused into one numba kernel, for layers seen by few calibration rows.

With m <= RESIDUAL_FUSED_MAX_M rows the blocked form's products are rank-m updates dominated by
call overhead; here the whole pass runs row by row in numba, and every step choice of a search
stage ("lane": one delta per column), GPFQ's and the RTN baseline's, shares one sweep over W.
Only the errors are kept per lane; the search then reruns the chosen steps for the codes (a
column's arithmetic does not depend on the other lanes or columns: same bits).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .greedy import DEAD_TOL, greedy_step, joint_step
from .moments import rows_superdiagonal
from .steps import ridge
from .rounding import MODE_PLAIN, Rule, level, pair_breaks, pair_limits

# Residual form with at most this many calibration rows runs fused, all C of the grid in one sweep;
# more rows: blocked with BLAS (residual.py).
RESIDUAL_FUSED_MAX_M = 64
# Columns per tile. Measured (single thread, N0 = 4608, N1 = 512, 12 + 12 lanes): 512 fastest for
# m = 1..64 (128: +5-15%, 2048: +0-10%), although V and the lanes' R then outgrow L2 at m = 64
# (6.8 MB): long vector loops matter more than cache residency.
RESIDUAL_TILE = 512
MIN_TILE = 32  # columns: the smallest share of a layer's columns given to one of numba's threads


def column_tile(n1: int, largest: int, groups: int = 1) -> int:
    """Columns per task for residual_lanes, which splits (group, column tile) pairs over numba's
    threads: ``largest`` when the groups alone give every thread a task, else the columns split
    evenly over the threads, within MIN_TILE..largest. A column's arithmetic never depends on it."""
    threads = numba.get_num_threads()
    if groups >= threads:
        return largest
    return max(1, min(largest, max(MIN_TILE, -(-n1 // threads))))


@njit(cache=True, error_model="numpy", parallel=True)
def residual_lanes(W, XT, XtT, hd, hsup, gsup, ridge_lam, dead, DG, DR, bsize, lo, hi, mode, lam, pair, tile, store,
                   codes, err_g, err_r, xw2):
    """The residual form row by row, for several step choices ("lanes") at once.

    For every group k and column c, walking the fan-in t = 0..N0-1 with the running products
    V = X[:, :t+1] W[:t+1] (shared by all lanes) and, per lane, R = Xt[:, :t] Q[:t] (m values):

        GPFQ lane l: code = greedy_step(Xt_t . V - Xt_t . R, H[t,t], DG[l])   (0 if H[t,t] <= dead)
        RTN  lane l: code = level(w_t, DR[l])
        R += Xt_t * code * delta

    which is GPFQ's u_t = V - R recursion; at the end err = ||V - R||^2 per lane and column and
    xw2 = ||V||^2 = ||X w||^2. Costs ~4 m flops per row, column and lane, no N0 x N0 and no
    matrix products: the cheap choice when m is small (the blocked form's per-block products
    are then rank-m updates dominated by overhead). Columns are independent and processed in
    tiles of `tile`; one sweep over a lane's R per row updates it and accumulates the next row's
    Xt_{t+1} . R, in the order k = 0..m-1. A column's arithmetic does not depend on the tile or on
    the other lanes (same bits whatever the batch); the (group, tile) pairs run on numba's threads.

    Under a pair bound (plain rounding) a GPFQ lane whose second row of a pair breaks the bound
    re-decides the pair (greedy.joint_step) and corrects R by the first row's change.

    W (g, N0, N1) float64; XT, XtT (g, N0, m) = X, Xt transposed; hd (g, N0) = H[t,t];
    hsup, gsup (g, N0) = H[t,t+1], G[t,t+1] (read by pairs decided jointly); ridge_lam (g,): the
    ridge of QuantSpec.damp (0: none), as rows sqrt(lam) I appended to X and Xt: hd then already
    includes it, a_t gains lam w_t and each lane's error lam ||w - q||^2; dead (g,);
    DG (nG, g, nb, N1), DR (nR, g, nb, N1) steps per block of bsize fan-in rows;
    lo..pair: the rounding.Rule (pair bound included), for every lane;
    store: write lane 0's GPFQ codes into codes (g, N0, N1) int32; err_g (nG, g, N1),
    err_r (nR, g, N1), xw2 (g, N1) outputs.
    """
    g, n1 = W.shape[0], W.shape[2]
    T = max(1, min(tile, n1))
    tiles = -(-n1 // T)
    for task in prange(g * tiles):
        kg = task // tiles
        c0 = (task % tiles) * T
        _residual_tile(kg, c0, min(c0 + T, n1), W, XT, XtT, hd, hsup, gsup, ridge_lam, dead, DG, DR, bsize, lo, hi, mode,
                       lam, pair, store, codes, err_g, err_r, xw2)


@njit(cache=True, error_model="numpy")
def _residual_tile(kg, c0, c1, W, XT, XtT, hd, hsup, gsup, ridge_lam, dead, DG, DR, bsize, lo, hi, mode, lam, pair, store,
                   codes, err_g, err_r, xw2):
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
    PG = np.zeros((nG, nt))
    PR = np.zeros((nR, nt))
    NA = np.zeros((nG, nt))  # under a pair bound: z times H[t,t] of the pair's first row, per lane
    DQ = np.zeros(nt)  # a re-decided pair's change of its first row's q
    lk = ridge_lam[kg]
    SG = np.zeros((nG, nt))  # with a ridge: sum over rows of (w - q)^2 per lane
    SR = np.zeros((nR, nt))
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
        if lk > 0.0:  # the appended row sqrt(lam) e_t: a_t gains lam w_t
            for c in range(nt):
                a[c] += lk * w[c]
        for l in range(nG):
            d_ = DG[l, kg, td, c0:c1]
            R = RG[l]
            L = LG[l]
            P = PG[l]
            if live:
                if mode == MODE_PLAIN and pair <= 0:  # the same step with constant arguments: vectorises
                    for c in range(nt):
                        x, q = greedy_step(a[c] - L[c], htt, d_[c], flo, fhi, MODE_PLAIN, 0.0)
                        xs[c] = x
                        qv[c] = q
                else:
                    joint = pair > 0 and mode == MODE_PLAIN and t % 2 == 1
                    revised = False
                    for c in range(nt):
                        num = a[c] - L[c]
                        pv = P[c]
                        if joint and pv != 0.0 and pair_breaks(pv, level(num / htt, d_[c], flo, fhi, MODE_PLAIN, 0.0),
                                                               pair):
                            da = DG[l, kg, (t - 1) // bsize, c0 + c]
                            qa_old = pv * da
                            xa, qa, x, q = joint_step(NA[l, c], num, qa_old, w[c], gsup[kg, t - 1], hd[kg, t - 1],
                                                      hsup[kg, t - 1], htt, da, d_[c], lo, hi, pair)
                            DQ[c] = qa - qa_old
                            revised = True
                            if lk > 0.0:  # row t - 1's share of the ridge, with its new q
                                wp = W[kg, t - 1, c0 + c]
                                SG[l, c] += (wp - qa) * (wp - qa) - (wp - qa_old) * (wp - qa_old)
                            if store and l == 0:
                                codes[kg, t - 1, c0 + c] = np.int32(xa)
                        else:
                            DQ[c] = 0.0
                            if pair > 0 and t % 2 == 0:
                                NA[l, c] = num
                            clo, chi = pair_limits(t, pv, lo, hi, pair)
                            x, q = greedy_step(num, htt, d_[c], clo, chi, mode, lam)
                        P[c] = x
                        xs[c] = x
                        qv[c] = q
                    if revised:  # R += Xt_{t-1} (q_a - q_a old) on the re-decided columns (0 elsewhere)
                        xprev = XtT[kg, t - 1]
                        for k in range(m):
                            xk = xprev[k]
                            Rk = R[k]
                            for c in range(nt):
                                Rk[c] += xk * DQ[c]
                if store and l == 0:
                    for c in range(nt):
                        codes[kg, t, c0 + c] = np.int32(xs[c])
                if lk > 0.0:
                    for c in range(nt):
                        SG[l, c] += (w[c] - qv[c]) * (w[c] - qv[c])
            else:  # a zero column of Xt: q_t = 0, R unchanged
                for c in range(nt):
                    P[c] = 0
                if lk > 0.0:  # q_t = 0: the ridge counts w_t^2
                    for c in range(nt):
                        SG[l, c] += w[c] * w[c]
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
                    x = level(w[c], d, flo, fhi, MODE_PLAIN, 0.0)
                    qj[c] = x * d if x != 0.0 else 0.0
            else:
                P = PR[l]
                for c in range(nt):
                    d = d_[c]
                    clo, chi = pair_limits(t, P[c], lo, hi, pair)
                    x = level(w[c], d, clo, chi, mode, lam)
                    P[c] = x
                    qj[c] = x * d if x != 0.0 else 0.0
            if lk > 0.0:
                for c in range(nt):
                    SR[l, c] += (w[c] - qj[c]) * (w[c] - qj[c])
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
    if lk > 0.0:
        for c in range(nt):
            for l in range(nG):
                err_g[l, kg, c0 + c] += lk * SG[l, c]
            for l in range(nR):
                err_r[l, kg, c0 + c] += lk * SR[l, c]


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


class Fused:
    """Rows of the residual form laid out for residual_lanes."""

    def __init__(self, X, Xt, damp: float = 0.0):
        self.XT = np.ascontiguousarray(X.transpose(0, 2, 1))
        self.XtT = self.XT if Xt is X else np.ascontiguousarray(Xt.transpose(0, 2, 1))
        self.hd = np.ascontiguousarray(np.einsum("gmn,gmn->gn", Xt, Xt))  # H[t,t] = ||Xt_t||^2
        self.lam = ridge(self.hd, damp)  # QuantSpec.damp: H[t,t] + lam
        if self.lam is not None:
            self.hd += self.lam[:, None]
        self.ridge_lam = np.zeros(X.shape[0]) if self.lam is None else np.ascontiguousarray(self.lam)
        self.hsup = rows_superdiagonal(Xt, Xt)  # H[t,t+1], G[t,t+1]: for pairs decided jointly
        self.gsup = rows_superdiagonal(Xt, X)
        self.dead = np.ascontiguousarray(DEAD_TOL * self.hd.max(axis=1)) if self.hd.size else np.zeros(X.shape[0])

    def sweep(self, W, DG, DR, bsize, rule: Rule, store):
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
        residual_lanes(W, self.XT, self.XtT, self.hd, self.hsup, self.gsup, self.ridge_lam, self.dead, DG, DR, bsize, *rule,
                       column_tile(n1, RESIDUAL_TILE, g), store, codes, err_g, err_r, xw2)
        return (codes if store else None), err_g, err_r, xw2
