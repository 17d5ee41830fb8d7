"""The executable specification: GPFQ's plain residual loop (Zhang, Zhou, Saab 2023), one neuron at a time.

For a neuron w (a column of W), walking the fan-in t = 0..N0-1 with a residual u in R^m, u = 0:

    z_t = <Xt_t, u + w_t X_t> / ||Xt_t||^2          (q_t = 0 when ||Xt_t|| is ~0: a dead column)
    q_t = Quant(z_t)                                  (nearest level, within the pair bound)
    u   = u + w_t X_t - q_t Xt_t

so that at the end u = X w - Xt q, the error on the layer's output. A direct transcription for
clarity, not speed (pure Python per decision); the fast forms (gram.py, residual.py, fused.py)
are tested against it and must take the same decisions. The rounding rule and the pair bound are
those of rounding.py, rewritten here without numba: a saturating int8 kernel (onnxruntime's u8s8
path without VNNI) adds products two at a time in int16, so consecutive rows (2j, 2j+1) may be
bounded: codes of the same sign by |q_2j| + |q_2j+1| <= P (opposite signs cancel and never
saturate). The second row of a pair then takes its level from [-(P - q_2j-), P - q_2j+]; where
its unbounded greedy level would break the bound (plain rounding), the pair is re-decided jointly:
the feasible (q_2j, q_2j+1) leaving the smallest residual after both rows (``joint_pair``).
"""

from __future__ import annotations

import math

import numpy as np

DEAD_TOL = 1e-12  # the forms' rule (greedy.DEAD_TOL): ||Xt_t||^2 <= DEAD_TOL * max_s ||Xt_s||^2 -> q_t = 0


def quant_level(z: float, delta: float, lo: int, hi: int, sparsity=None) -> int:
    """Integer level for z on {k delta : lo <= k <= hi}; round half to even, saturate.

    sparsity: None, ("soft", lam) or ("hard", lam). soft: shrink |z| by lam first. hard: 0 when
    |z| <= lam, else the nearest nonzero level. delta <= 0: the alphabet is {0}.
    """
    if delta <= 0:
        return 0
    if sparsity is not None:
        kind, lam = sparsity
        if kind == "soft":
            z = math.copysign(max(abs(z) - lam, 0.0), z)
        elif abs(z) <= lam:
            return 0
    k = int(min(max(round(z / delta), lo), hi))  # Python round: half to even
    if sparsity is not None and sparsity[0] == "hard" and k == 0:
        k = 1 if z > 0 else -1
        if not lo <= k <= hi:  # a pair bound left only {0}
            k = 0
    return k


def pair_range(t: int, codes, lo: int, hi: int, pair) -> tuple[int, int]:
    """Levels allowed at fan-in row t under the pair bound max(q_2j+ + q_2j+1+, q_2j- + q_2j+1-) <= pair
    (x+ = max(x, 0), x- = max(-x, 0); None: [lo, hi]): [-pair, pair] for the first row of a pair; for
    the second, a code of q_2j's sign may only add up to pair with it, one of the other sign is free."""
    if pair is None:
        return lo, hi
    if t % 2 == 0:
        return max(lo, -pair), min(hi, pair)
    prev = int(codes[t - 1])
    return max(lo, -(pair - max(-prev, 0))), min(hi, pair - max(prev, 0))


def breaks(a: int, b: int, pair) -> bool:
    """Codes a, b (rows 2j, 2j+1) of one sign whose magnitudes add up beyond pair."""
    return pair is not None and a * b > 0 and abs(a) + abs(b) > pair


def joint_pair(r, xa, xb, da, db, lo, hi, pair) -> tuple[int, int]:
    """The levels (a, b) of a pair minimising ||r - a da xa - b db xb||^2 under the pair bound, with
    r = u_{2j-1} + w_2j X_2j + w_2j+1 X_2j+1 (the residual before the pair plus both rows' weights),
    xa, xb the pair's columns of Xt: a over every level of [max(lo, -pair), min(hi, pair)] in
    ascending order, b the nearest level of its greedy value <xb, r - a da xa> / ||xb||^2 within
    pair_range given a; the first minimum wins."""
    best, choice = math.inf, (0, 0)
    for a in range(max(lo, -pair), min(hi, pair) + 1):
        v = r - a * da * xa
        b = quant_level(xb @ v / (xb @ xb), db, *pair_range(1, [a], lo, hi, pair))
        e = v - b * db * xb
        if e @ e < best:
            best, choice = e @ e, (a, b)
    return choice


def gpfq_neuron(X: np.ndarray, Xt: np.ndarray, w: np.ndarray, delta_rows: np.ndarray, lo: int, hi: int,
                sparsity=None, pair=None) -> tuple[np.ndarray, np.ndarray]:
    """X, Xt (m, N0); w (N0,); delta_rows (N0,) the step used at each fan-in index.

    Returns (codes (N0,) int, u (m,) = X w - Xt q).
    """
    m, n0 = X.shape
    norms = np.array([Xt[:, t] @ Xt[:, t] for t in range(n0)])
    dead = DEAD_TOL * norms.max()
    u = np.zeros(m)
    codes = np.zeros(n0, dtype=np.int64)
    for t in range(n0):
        xt, x = Xt[:, t], X[:, t]
        if t % 2 == 0:
            u_pair = u  # the residual before the pair (2j, 2j+1)
        if norms[t] > dead:
            z = xt @ (u + w[t] * x) / norms[t]
            if t % 2 == 1 and sparsity is None and breaks(codes[t - 1], quant_level(z, delta_rows[t], lo, hi), pair):
                r = u_pair + w[t - 1] * X[:, t - 1] + w[t] * x
                codes[t - 1], codes[t] = joint_pair(r, Xt[:, t - 1], xt, delta_rows[t - 1], delta_rows[t], lo, hi, pair)
                u = u_pair + w[t - 1] * X[:, t - 1] - codes[t - 1] * delta_rows[t - 1] * Xt[:, t - 1]
            else:
                codes[t] = quant_level(z, delta_rows[t], *pair_range(t, codes, lo, hi, pair), sparsity)
        u = u + w[t] * x - codes[t] * delta_rows[t] * xt
    return codes, u


def gpfq_layer(X, Xt, W, delta_rows, lo, hi, sparsity=None, pair=None):
    """All neurons of a (possibly grouped) layer, one at a time.

    X, Xt (g, m, N0); W (g, N0, N1); delta_rows (g, N0, N1). Returns codes (g, N0, N1) and the
    per-column squared errors (g, N1).
    """
    g, n0, n1 = W.shape
    codes = np.zeros((g, n0, n1), dtype=np.int64)
    err = np.zeros((g, n1))
    for k in range(g):
        for j in range(n1):
            c, u = gpfq_neuron(X[k], Xt[k], W[k, :, j], delta_rows[k, :, j], lo, hi, sparsity, pair)
            codes[k, :, j] = c
            err[k, j] = u @ u
    return codes, err


def rtn_layer(W, delta_rows, lo, hi, sparsity=None, pair=None):
    """Round to nearest, row by row along the fan-in (the pair bound clips the second row of each
    pair). W, delta_rows (g, N0, N1); returns codes (g, N0, N1)."""
    g, n0, n1 = W.shape
    codes = np.zeros((g, n0, n1), dtype=np.int64)
    for k in range(g):
        for j in range(n1):
            for t in range(n0):
                codes[k, t, j] = quant_level(W[k, t, j], delta_rows[k, t, j],
                                             *pair_range(t, codes[k, :, j], lo, hi, pair), sparsity)
    return codes
