"""The residual form: GPFQ on the rows X and Xt themselves, never forming an N0 x N0 matrix.

With U_t = X[:, :t+1] w[:t+1] - Xt[:, :t] q[:t] (the paper's u_{t-1} + w_t X_t) the decision is
z_t = <Xt_t, U_t> / ||Xt_t||^2. The cheap choice for a wide layer seen by few rows (m << N0).
Blocked with BLAS for many rows (Residual); fused into one numba sweep for few (fused.py).
"""

from __future__ import annotations

import math

import numpy as np

from .fused import RESIDUAL_FUSED_MAX_M, Fused
from .greedy import DEAD_TOL, greedy_block
from .gram import even_block
from .moments import Moments, rows_superdiagonal
from .rounding import Rule, rtn
from .search import PassForm
from .spec import Alphabet, Sparsity
from .steps import as3, delta3, ridge, ridge_error, rows_of

RESIDUAL_CHUNK = 1024  # fan-in rows per GEMM when evaluating ||XW - Xt Q||^2 from the rows


def residual_block(m: int) -> int:
    """Rows per block of the residual form for m calibration rows: about m / 4, a power of two in
    32..128. Measured single-threaded on m = 32 / 256 / 1024, N0 = 4608..9216: B = 16-32 / 64 /
    64-128 were fastest (the triangle's B^2 N1 against the GEMMs' 4 m B N1); the floor 32 halves
    the number of small BLAS calls, which matters when threaded BLAS shares busy cores (m = 32,
    N0 = 9216, N1 = 4096 on 2 oversubscribed cores: 6.3 s per pass at B = 16, 4.9 s at 32, 2.4 s
    at 128, against 0.38 s single-threaded)."""
    return int(min(128, max(32, 2 ** round(math.log2(max(m, 1) / 4)))))


class Residual:
    """The residual form for one layer, blocked.

    With U_t = X[:, :t+1] W[:t+1] - Xt[:, :t] Q[:t] (the paper's u_{t-1} + w_t X_t), the
    decision is z_t = Xt_t^T U_t / ||Xt_t||^2. Its C-independent part
    A_t = Xt_t^T X[:, :t+1] W[:t+1] = (tril(G) W)_t is computed once per layer, streamed block by
    block without forming G; the pass then keeps the state R = Xt[:, :b0] Q[:b0] (m, N1) and per
    block of B rows: L = Xt_b^T R (one GEMM), the B x B triangle with H_bb = Xt_b^T Xt_b in numba,
    R += Xt_b Q_b (one GEMM). At the end U = X W - R, and the exact error is ||U||^2 per column.

    The GEMMs run in the rows' dtype: float32 rows (the pipeline's) give float32 products (twice
    the speed) summed into float64 states, as the Gram form does; float64 rows stay float64.
    """

    def __init__(self, W, X, Xt, block=None, damp: float = 0.0):
        """damp: QuantSpec.damp, as rows sqrt(lam) I appended to X and Xt: lam I added to A's G and
        to H's blocks (lam: None without a ridge); XW and the residual stay the data's."""
        g, n0, n1 = W.shape
        block = residual_block(X.shape[1]) if block is None else even_block(block)
        self.block, self.X, self.Xt = block, X, Xt
        self.W = np.ascontiguousarray(W, dtype=np.float64)  # read by pairs decided jointly
        self.gsup = rows_superdiagonal(Xt, X)
        self.work = np.float32 if X.dtype == Xt.dtype == np.float32 else np.float64
        Ww = W.astype(self.work)
        self.A = np.empty((g, n0, n1))
        self.Hb = []
        V = np.zeros((g, X.shape[1], n1))  # running X[:, :b0] W[:b0]
        diag = np.empty((g, n0))
        for b0 in range(0, n0, block):
            b1 = min(b0 + block, n0)
            Xb, Xtb = X[:, :, b0:b1], Xt[:, :, b0:b1]
            XtbT = Xtb.transpose(0, 2, 1)
            Hbb = np.ascontiguousarray(np.matmul(XtbT, Xtb), dtype=np.float64)
            self.Hb.append(Hbb)
            diag[:, b0:b1] = np.diagonal(Hbb, axis1=1, axis2=2)
            Gbb = np.matmul(XtbT, Xb)
            self.A[:, b0:b1] = np.matmul(np.tril(Gbb), Ww[:, b0:b1]) + np.matmul(XtbT, V.astype(self.work, copy=False))
            V += np.matmul(Xb, Ww[:, b0:b1])
        self.XW = V
        self.lam = ridge(diag, damp)
        if self.lam is not None:
            self.A += self.lam[:, None, None] * self.W
            for Hbb in self.Hb:
                Hbb += self.lam[:, None, None] * np.eye(Hbb.shape[1])
            diag = diag + self.lam[:, None]
        self.dead = np.ascontiguousarray(DEAD_TOL * diag.max(axis=1))

    def greedy(self, delta, bsize, rule: Rule):
        """One pass; returns codes (g, N0, N1) int32 and the final residual U = XW - Xt Q (g, m, N1)."""
        g, n0, n1 = self.A.shape
        codes = np.empty((g, n0, n1), np.int32)
        R = np.zeros((g, self.X.shape[1], n1))  # running Xt[:, :b0] Q[:b0]
        qhq = np.zeros((g, n1))  # unused here: the error is ||U||^2
        prev = np.zeros((g, n1), np.int32)  # the previous row's codes, for the pair bound
        for i, b0 in enumerate(range(0, n0, self.block)):
            b1 = min(b0 + self.block, n0)
            Xtb = self.Xt[:, :, b0:b1]
            L = np.ascontiguousarray(np.matmul(Xtb.transpose(0, 2, 1), R.astype(self.work, copy=False)), dtype=np.float64)
            Qb = np.empty((g, b1 - b0, n1))
            cb = np.empty((g, b1 - b0, n1), np.int32)
            greedy_block(self.A, b0, L, 0, self.Hb[i], 0, Qb, cb, 0, delta, b0, bsize, b1 - b0, *rule, self.dead, qhq,
                         prev, self.W, self.gsup)
            codes[:, b0:b1] = cb
            R += np.matmul(Xtb, Qb.astype(self.work, copy=False))
        return codes, self.XW - R


def gpfq_residual(W: np.ndarray, X: np.ndarray, Xt: np.ndarray, delta, alphabet: Alphabet,
                  sparsity: Sparsity | None = None, group_size: int = 0,
                  block: int | None = None, pair_bound: int | None = None) -> np.ndarray:
    """One GPFQ pass in the residual form (state of shape (m, N1), see Residual; the fused
    kernel when m <= RESIDUAL_FUSED_MAX_M and block is None); returns codes.

    W (N0, N1) or (g, N0, N1); X, Xt (m, N0) or (g, m, N0); delta as in gpfq_gram; block: rows
    per block (None: residual_block(m); an odd number is rounded up to even). Never forms an N0 x N0 matrix.
    """
    W3, squeeze = as3(W, "W")
    X3, _ = as3(X, "X")
    Xt3, _ = as3(Xt, "Xt")
    g, n0, n1 = W3.shape
    if X3.shape[0] != g or X3.shape[2] != n0 or Xt3.shape != X3.shape:
        raise ValueError(f"X, Xt must be (g, m, N0) with g={g}, N0={n0} (got {X3.shape}, {Xt3.shape})")
    d, bsize = delta3(delta, g, n0, n1, group_size)
    rule = Rule.of(alphabet, sparsity, pair_bound)
    if block is None and X3.shape[1] <= RESIDUAL_FUSED_MAX_M:
        codes = Fused(X3, Xt3).sweep(W3, d[None], None, bsize, rule, store=True)[0]
    else:
        codes, _ = Residual(W3, X3, Xt3, block).greedy(d, bsize, rule)
    return codes[0] if squeeze else codes


class ResidualForm(PassForm):
    """The blocked residual form of one layer (search.Form): Residual's A, X W, ||X W||^2."""

    def __init__(self, W, mom: Moments, damp: float = 0.0):
        self.W = W
        self.r = Residual(W, mom.X, mom.Xt, damp=damp)  # float32 rows stay float32 (see Residual)
        self.lam = self.r.lam
        self.rows = mom.m
        self.wfw = np.einsum("gmn,gmn->gn", self.r.XW, self.r.XW)

    def greedy(self, delta, bsize, rule):
        codes, U = self.r.greedy(delta, bsize, rule)
        return codes, np.einsum("gmn,gmn->gn", U, U) + ridge_error(self.lam, self.W, codes, delta, bsize)

    def errors(self, codes: list, deltas: list, bsize: int) -> list:
        """||XW - Xt Q||^2 per column for several lanes (codes, delta) side by side."""
        g, n0, n1 = codes[0].shape
        lanes, m = len(codes), self.r.XW.shape[1]
        rows = [rows_of(d, bsize, n0) for d in deltas]
        U = np.empty((g, m, lanes, n1))
        U[:] = self.r.XW[:, :, None, :]
        U = U.reshape(g, m, lanes * n1)
        for b0 in range(0, n0, RESIDUAL_CHUNK):  # U = XW - Xt Q without forming all of Q
            b1 = min(b0 + RESIDUAL_CHUNK, n0)
            Q = np.concatenate([c[:, b0:b1] * (r if r.shape[1] == 1 else r[:, b0:b1]) for c, r in zip(codes, rows)], axis=2)
            U -= np.matmul(self.r.Xt[:, :, b0:b1], Q.astype(self.r.work, copy=False))
        err = np.einsum("gmn,gmn->gn", U, U).reshape(g, lanes, n1)
        return [err[:, i] + ridge_error(self.lam, self.W, c, d, bsize) for i, (c, d) in enumerate(zip(codes, deltas))]



class FusedForm:
    """The fused residual form of one layer (search.Form), m <= RESIDUAL_FUSED_MAX_M: the rows
    transposed, H[t,t] and the dead threshold, O(m N0); a stage's lanes of both methods run in
    one sweep of fused.residual_lanes (errors only); the chosen GPFQ steps get one more sweep for
    their codes, the RTN ones a direct rounding."""

    def __init__(self, W, mom: Moments, damp: float = 0.0):
        self.W = W
        X = np.asarray(mom.X, dtype=np.float64)
        Xt = X if mom.Xt is mom.X else np.asarray(mom.Xt, dtype=np.float64)
        self.f = Fused(X, Xt, damp)
        self.lam = self.f.lam
        self.wfw = None  # ||X W||^2 per column, set by evaluate()

    def evaluate(self, deltas, bsize, rule):
        dg, dr = deltas.get("gpfq"), deltas.get("rtn")
        _, err_g, err_r, self.wfw = self.f.sweep(self.W, np.stack(dg) if dg else None, np.stack(dr) if dr else None,
                                                 bsize, rule, store=False)
        return {"gpfq": [(e, None) for e in err_g], "rtn": [(e, None) for e in err_r]}

    def codes(self, method, choice, bsize, rule):
        if method == "rtn":
            return choice._replace(codes=rtn(self.W, choice.delta, bsize, rule))
        codes, err, _, _ = self.f.sweep(self.W, choice.delta[None], None, bsize, rule, store=True)
        return choice._replace(codes=codes, err=err[0])


def residual_form(W, mom: Moments, damp: float = 0.0):
    """The residual form for these moments: fused for few rows, else blocked."""
    return FusedForm(W, mom, damp) if mom.m <= RESIDUAL_FUSED_MAX_M else ResidualForm(W, mom, damp)
