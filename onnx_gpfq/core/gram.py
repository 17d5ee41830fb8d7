"""The Gram form: GPFQ on G = Xt^T X and H = Xt^T Xt, whatever the number of calibration rows.

    z_t = ( sum_{s<=t} G[t,s] w_s  -  sum_{s<t} H[t,s] q_s ) / H[t,t],   q_t = Quant(z_t)

The first sum for all t is one product, A = tril(G) W. The second is a forward substitution with
rounding, blocked recursively (like a recursive TRSM, or GPTQ's lazy batch updates applied
hierarchically): most flops land in a few large GEMMs, the B x B triangles run in numba
(greedy.greedy_block). The exact error of codes q is w^T F w - 2 q^T G w + q^T H q.
"""

from __future__ import annotations

import numpy as np

from .greedy import dead_threshold, greedy_block, tril_matmul_small
from .moments import Moments, superdiagonal
from .rounding import Rule
from .search import PassForm
from .spec import Alphabet, Sparsity
from .steps import as3, delta3, ridge, rows_of

# Rows of the fan-in per block of the blocked forward substitution: one GEMM per block for all
# earlier rows, a B x B triangle in numba inside. 128 measured best at N0 = N1 = 2048.
GRAM_BLOCK = 128


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
        tril_matmul_small(G, W, A)
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


def even_block(block: int) -> int:
    """Rows per block of a blocked pass, rounded up to even: blocks start on even rows, so that a pair
    decided jointly under a pair bound never straddles two blocks (greedy.greedy_block)."""
    return int(block) + int(block) % 2


def gram_pass(A, H, delta, bsize, rule: Rule, dead, W, gsup, block=GRAM_BLOCK, H_off=None):
    """Greedy pass in the Gram form. A = tril(G) W (g, N0, N1), H (g, N0, N0) C-contiguous,
    delta (g, nb, N1); W (g, N0, N1) float64 and gsup = superdiagonal(G) (g, N0), read for pairs
    decided jointly under a pair bound; H_off: H in the dtype of the off-diagonal GEMMs (default H).
    Returns codes (g, N0, N1) int32, Q (g, N0, N1) dequantized float64 and
    q^T H q per column (g, N1) (for the exact error without another product).

    The H-term sum_{s<t} H[t,s] Q[s] is a forward substitution with rounding, accumulated in L.
    Recursive blocking (like a recursive TRSM, or GPTQ's lazy batch updates applied
    hierarchically): quantize the first half of the rows, add H[mid:, :mid] Q[:mid] to the
    second half's L with one GEMM, then the second half; below `block` rows the triangle runs
    in numba. Most flops land in a few large GEMMs.
    """
    g, n0, n1 = A.shape
    Q = np.empty((g, n0, n1))
    codes = np.empty((g, n0, n1), np.int32)
    qhq = np.zeros((g, n1))
    L = np.zeros((g, n0, n1))
    prev = np.zeros((g, n1), np.int32)  # the previous row's codes, for the pair bound

    _gram_pass_rec(0, n0, A, L, H, H if H_off is None else H_off, Q, codes, delta, bsize, rule, dead, qhq,
                   even_block(block), prev, W, gsup)
    return codes, Q, qhq


def _gram_pass_rec(lo, hi, A, L, H, H_off, Q, codes, delta, bsize, rule, dead, qhq, block, prev, W, gsup):
    args = (A, L, H, H_off, Q, codes, delta, bsize, rule, dead, qhq, block, prev, W, gsup)
    if hi - lo <= block:
        greedy_block(A, lo, L, lo, H, lo, Q, codes, lo, delta, lo, bsize, hi - lo, *rule, dead, qhq, prev, W, gsup)
        return
    mid = _split(lo, hi, block)
    _gram_pass_rec(lo, mid, *args)
    L[:, mid:hi] += np.matmul(H_off[:, mid:hi, lo:mid], Q[:, lo:mid].astype(H_off.dtype, copy=False))
    _gram_pass_rec(mid, hi, *args)


def gpfq_gram(W: np.ndarray, G: np.ndarray, H: np.ndarray, delta, alphabet: Alphabet,
              sparsity: Sparsity | None = None, group_size: int = 0, block: int = GRAM_BLOCK,
              pair_bound: int | None = None) -> np.ndarray:
    """One GPFQ pass in the Gram form with given steps; returns the integer codes.

    W (N0, N1) or (g, N0, N1); G = Xt^T X, H = Xt^T Xt (N0, N0) or (g, N0, N0) float64;
    delta: scalar, (N1,), (nb, N1) or (g, nb, N1) steps (weight units), nb = 1 or
    ceil(N0 / group_size). Codes int32 with W's shape.
    """
    W3, squeeze = as3(W, "W")
    G3, _ = as3(G, "G")
    H3, _ = as3(H, "H")
    g, n0, n1 = W3.shape
    if G3.shape != (g, n0, n0) or H3.shape != (g, n0, n0):
        raise ValueError(f"G, H must be (g, N0, N0) = {(g, n0, n0)} (got {G3.shape}, {H3.shape})")
    d, bsize = delta3(delta, g, n0, n1, group_size)
    A = tril_matmul(G3, W3, block)
    W3 = np.ascontiguousarray(W3, dtype=np.float64)
    codes, _, _ = gram_pass(A, H3, d, bsize, Rule.of(alphabet, sparsity, pair_bound), dead_threshold(H3), W3,
                            superdiagonal(G3), block)
    return codes[0] if squeeze else codes


class GramForm(PassForm):
    """The Gram form of one layer (search.Form): per-layer quantities shared by every pass,
    A = tril(G) W, G W, w^T F w."""

    def __init__(self, W, mom: Moments, cols: slice | None = None, damp: float = 0.0):
        """W (g, N0, N1c): the layer's weights, or its columns ``cols`` (then W = W_layer[:, :, cols]
        and projected Moments give their A, G W, ||X W||^2 of those columns). damp: QuantSpec.damp,
        the ridge lam I added to G, H and F (rows sqrt(lam) I appended to X and Xt); wfw stays
        ||X w||^2, the passes' errors include lam ||w - q||^2."""
        self.H = np.ascontiguousarray(mom.H)
        # Rows that came as float32 (the pipeline's) carry float32 accuracy: the large off-diagonal
        # GEMMs of the passes and error products then run in float32 (twice the speed), the
        # triangles and all sums in float64. Float64 rows keep float64 throughout.
        self.H_off = self.H.astype(np.float32) if mom.rows_dtype == np.float32 else self.H
        self.W = W
        if mom.W is not None:  # projected: A, G W and ||XW||^2 were accumulated from the rows
            cols = slice(None) if cols is None else cols
            if mom.W[:, :, cols].shape != W.shape or not np.array_equal(mom.W[:, :, cols], W):
                raise ValueError("quantize_layer: these Moments were projected on other weights than W")
            self.A, self.GW, self.wfw = (np.ascontiguousarray(a[..., cols]) for a in (mom.A, mom.GW, mom.xw2))
            self.gsup = mom.G_sup
        else:
            G = np.ascontiguousarray(mom.G)
            self.A = tril_matmul(G, W)
            self.GW = np.matmul(G, W)
            self.wfw = np.einsum("gin,gin->gn", W, np.matmul(mom.F, W))
            self.gsup = superdiagonal(G)
        self.wfw_obj = self.wfw
        self.lam = ridge(np.diagonal(self.H, axis1=1, axis2=2), damp)
        if self.lam is not None:  # G, H, F + lam I (a new H: Moments may be shared by layers)
            lamI = self.lam[:, None, None] * np.eye(self.H.shape[1])
            self.H = self.H + lamI
            self.H_off = self.H.astype(np.float32) if mom.rows_dtype == np.float32 else self.H
            self.A = self.A + self.lam[:, None, None] * W
            self.GW = self.GW + self.lam[:, None, None] * W
            self.wfw_obj = self.wfw + self.lam[:, None] * np.einsum("gin,gin->gn", W, W)
        self.dead = dead_threshold(self.H)
        self.dH = np.ascontiguousarray(np.diagonal(self.H, axis1=1, axis2=2))

    def greedy(self, delta, bsize, rule):
        codes, Q, qhq = gram_pass(self.A, self.H, delta, bsize, rule, self.dead, self.W, self.gsup, H_off=self.H_off)
        return codes, self.wfw_obj - 2.0 * np.einsum("gin,gin->gn", Q, self.GW) + qhq

    def errors(self, codes: list, deltas: list, bsize: int) -> list:
        """Exact per-column errors of given codes, several lanes (codes, delta) side by side as
        one wide product; q^T H q from the lower triangle only:
        q^T H q = sum_t q_t (2 (tril(H) q)_t - H[t,t] q_t)."""
        g, n0, n1 = codes[0].shape
        Q = np.empty((g, n0, len(codes), n1))
        for i, (c, d) in enumerate(zip(codes, deltas)):
            np.multiply(c, rows_of(d, bsize, n0), out=Q[:, :, i])
        Q = Q.reshape(g, n0, len(codes) * n1)
        HQ = tril_matmul(self.H, Q, G_off=self.H_off)
        qhq = 2.0 * np.einsum("gin,gin->gn", Q, HQ)
        np.multiply(Q, Q, out=HQ)
        qhq -= np.matmul(self.dH[:, None, :], HQ)[:, 0]  # - sum_t H[t,t] q_t^2
        qgw = np.einsum("gilN,giN->glN", Q.reshape(g, n0, len(codes), n1), self.GW)
        err = self.wfw_obj[:, None, :] - 2.0 * qgw + qhq.reshape(g, len(codes), n1)
        return [err[:, i] for i in range(len(codes))]
