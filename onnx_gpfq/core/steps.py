"""Steps of the alphabet: the range r of the step rule delta = C r / K, steps per block of the
fan-in, and the dequantized weights and exact output error of given codes.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .spec import GRANULARITIES


def as3(a: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    a = np.asarray(a)
    if a.ndim == 2:
        return np.ascontiguousarray(a[None], dtype=np.float64), True
    if a.ndim != 3:
        raise ValueError(f"{name} must be 2-D or 3-D (groups first) (got shape {a.shape})")
    return np.ascontiguousarray(a, dtype=np.float64), False


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
        abs_max_blocks(W, bs, r)
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


def delta3(delta, g: int, n0: int, n1: int, group_size: int) -> tuple[np.ndarray, int]:
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


def rows_of(delta: np.ndarray, bsize: int, n0: int) -> np.ndarray:
    """(g, nb, N1) per-block steps -> (g, N0, N1) per-row steps."""
    if delta.shape[1] == 1:
        return delta
    return np.repeat(delta, bsize, axis=1)[:, :n0]


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
    return codes * rows_of(scale, group_size, n0)


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


def ridge(hdiag: np.ndarray, damp: float) -> np.ndarray | None:
    """lam (g,) = damp x mean_t H[t,t] for H's diagonal hdiag (g, N0): the ridge weight of QuantSpec.damp
    (None for damp = 0: no ridge)."""
    return damp * hdiag.mean(axis=1) if damp > 0 else None


def ridge_error(lam: np.ndarray | None, W: np.ndarray, codes: np.ndarray, delta: np.ndarray, bsize: int) -> np.ndarray | float:
    """lam ||w - q||^2 per column (g, N1) of codes (g, N0, N1) with steps delta (g, nb, N1); 0.0 without a ridge."""
    if lam is None:
        return 0.0
    D = W - codes * rows_of(delta, bsize, W.shape[1])
    return lam[:, None] * np.einsum("gin,gin->gn", D, D)

