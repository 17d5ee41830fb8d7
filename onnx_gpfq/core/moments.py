"""Calibration statistics of one layer, accumulated over batches: what the forms read.

The Gram form needs G = Xt^T X, H = Xt^T Xt and F = X^T X (or, projected on the layer's W, only
H, tril(G) W, G W and ||X W||^2); the residual form keeps the rows X and Xt themselves.
"""

from __future__ import annotations

import numpy as np

GRAM_CHUNK_BYTES = 32 << 20  # Gram form: rows gathered before one product per matrix
PROJECTED_BLOCK = 256  # fan-in rows per block of the projected Gram accumulation


def superdiagonal(M: np.ndarray) -> np.ndarray:
    """(g, N0) float64: M[:, t, t+1] for t < N0 - 1, 0 at t = N0 - 1, of M (g, N0, N0). Of G = Xt^T X:
    the <Xt_2j, X_2j+1> a pair decided jointly reads (rounding.pair_joint)."""
    out = np.zeros(M.shape[:2])
    out[:, :-1] = np.diagonal(M, offset=1, axis1=1, axis2=2)
    return out


def rows_superdiagonal(Xt: np.ndarray, X: np.ndarray) -> np.ndarray:
    """superdiagonal(Xt^T X) from the rows Xt, X (g, m, N0), in O(m N0), float64."""
    out = np.zeros(X.shape[::2])
    out[:, :-1] = np.einsum("gmn,gmn->gn", Xt[:, :, :-1], X[:, :, 1:], dtype=np.float64)
    return out


class _Rows:
    """Rows of X and X~ (g, rows, N0) appended batch by batch into one buffer per stream, so that
    the rows are copied once, where a list of batches joined by np.concatenate holds them twice at
    the join. ``reserve(rows)`` before the first batch sizes the buffer (the caller knows how many
    rows come); without it, or beyond it, the buffer grows by half. What ``take`` returns equals
    np.concatenate of the batches (float32 and float64 batches mixed: float64, as concatenate
    promotes)."""

    def __init__(self, groups: int, n0: int):
        self.groups, self.n0 = groups, n0
        self.n = 0
        self._x: np.ndarray | None = None
        self._xt: np.ndarray | None = None  # None while every batch had X~ = X
        self._reserved = 0

    def reserve(self, rows: int) -> None:
        """Allocate room for ``rows`` rows at the next append (only while empty)."""
        if self.n == 0:
            self._reserved = max(int(rows), 0)

    def append(self, X: np.ndarray, Xt: np.ndarray | None) -> None:
        """X (g, rows, N0); Xt the same shape, or None where X~ = X for this batch."""
        rows = X.shape[1]
        dtype = np.result_type(X.dtype, X.dtype if Xt is None else Xt.dtype,
                               X.dtype if self._x is None else self._x.dtype)
        cap = 0 if self._x is None else self._x.shape[1]
        if self.n + rows > cap or dtype != self._x.dtype:
            if self.n + rows > cap:
                cap = max(self.n + rows, self._reserved if self._x is None else cap + cap // 2)
            self._x = self._grown(self._x, cap, dtype)
            self._xt = None if self._xt is None else self._grown(self._xt, cap, dtype)
        if Xt is not None and self._xt is None:  # the first batch with X~ != X: X~ so far equals X
            self._xt = self._grown(self._x, cap, dtype, copy=True)
        self._x[:, self.n:self.n + rows] = X
        if self._xt is not None:
            self._xt[:, self.n:self.n + rows] = X if Xt is None else Xt
        self.n += rows

    def _grown(self, a: np.ndarray | None, cap: int, dtype, copy: bool = False) -> np.ndarray:
        if a is not None and a.shape[1] == cap and a.dtype == dtype and not copy:
            return a
        out = np.empty((self.groups, cap, self.n0), dtype)
        if a is not None:
            out[:, :self.n] = a[:, :self.n]
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the rows held (both streams)."""
        if self._x is None:
            return 0
        return self._x.itemsize * self.groups * self.n0 * self.n * (1 if self._xt is None else 2)

    def take(self, contiguous: bool = True) -> tuple[np.ndarray, np.ndarray, bool]:
        """(X, Xt, same): X, Xt (g, n, N0); same: X~ = X for every row (then Xt is X). Where room
        was left over they are leading slices of the buffers (each (n, N0) matrix still has unit
        column stride, as BLAS takes it), copied to C order only if ``contiguous``. The buffers are
        handed over and this object starts empty."""
        if self._x is None:
            e = np.zeros((self.groups, 0, self.n0), np.float32)
            return e, e, True
        X, Xt, n = self._x, self._xt, self.n
        if X.shape[1] != n:
            X = np.ascontiguousarray(X[:, :n]) if contiguous else X[:, :n]
            Xt = None if Xt is None else np.ascontiguousarray(Xt[:, :n]) if contiguous else Xt[:, :n]
        self._x, self._xt, self.n, self._reserved = None, None, 0, 0
        return X, (X if Xt is None else Xt), Xt is None


class Moments:
    """Accumulates, over calibration batches, what one layer needs.

    A grouped/depthwise conv is ``groups`` independent problems: all arrays carry a leading group
    axis g. N0 = fan-in per group.

    form "gram": float64 G = Xt^T X, H = Xt^T Xt, F = X^T X, each (g, N0, N0).
    form "gram" with the layer's weights W (g, N0, N1g) given ("projected"): H, and instead of G
    and F only what GPFQ reads of them: A = tril(G) W, G W (g, N0, N1g) and ||X W||^2 per column
    (g, N1g), and G's superdiagonal G_sup (g, N0). A is accumulated block by block of the fan-in, as
    in the residual form: A[b] += tril(Xt_b^T X_b) W_b + Xt_b^T (X[:, :b] W[:b]). Per row that is N0^2 / 2 + 3 N0 N1
    multiply-adds instead of 2 N0^2: cheaper when N1 is well under N0 (3x3 convs, bottlenecks).
    form "residual": the rows themselves, X and Xt (g, m, N0) (float32 storage, float64 kept
    when given float64).
    Both: column sums of X and Xt -> mu_x, mu_xt (g, N0), and the row count m.
    Layers reading the same input tensor can share one Moments object (quantize_layer does not
    modify it) unless it is projected on one layer's W.
    rows: how many rows the batches will bring in all, where the caller knows (0: unknown). It only
    sizes the row buffers (rows are copied once, into place); the statistics do not depend on it.
    """

    def __init__(self, groups: int, n0: int, form: str, W: np.ndarray | None = None, rows: int = 0):
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
            raise ValueError(f"Moments: groups must be an int >= 1 (got {groups!r})")
        if isinstance(n0, bool) or not isinstance(n0, (int, np.integer)) or n0 < 1:
            raise ValueError(f"Moments: n0 must be an int >= 1 (got {n0!r})")
        if form not in ("gram", "residual"):
            raise ValueError(f"Moments: form must be 'gram' or 'residual' (got {form!r})")
        self.groups, self.n0, self.form = int(groups), int(n0), form
        self._expected = max(int(rows), 0)  # the caller's estimate of the rows to come (buffer sizes)
        self.m = 0
        self.rows_dtype = None  # float32 when every batch came as float32, else float64
        self._sx = np.zeros((self.groups, self.n0))
        self._sxt = np.zeros((self.groups, self.n0))
        self.W = None
        if W is not None:
            W = np.asarray(W)
            if form != "gram" or W.ndim != 3 or W.shape[:2] != (self.groups, self.n0) or W.shape[2] < 1:
                raise ValueError(f"Moments: W is for form='gram' and must be (groups={self.groups}, n0={self.n0}, N1g) "
                                 f"(got form={form!r}, W {W.shape})")
            self.W = np.array(W, dtype=np.float64)
            self._W32 = self.W.astype(np.float32)
            n1 = W.shape[2]
            self._A = np.zeros((self.groups, self.n0, n1))
            self._GW = np.zeros((self.groups, self.n0, n1))
            self._xw2 = np.zeros((self.groups, n1))
            self._gsup = np.zeros((self.groups, self.n0))
        if form == "gram":
            if self.W is None:
                self._G = np.zeros((self.groups, self.n0, self.n0))
                self._F = np.zeros((self.groups, self.n0, self.n0))
            self._H = np.zeros((self.groups, self.n0, self.n0))
            self._pending = _Rows(self.groups, self.n0)  # rows not yet in G, H, F
        else:
            self._rows_kept = _Rows(self.groups, self.n0)
            self._rows_kept.reserve(self._expected)
            self._cat: tuple[np.ndarray, np.ndarray] | None = None

    def _as3d(self, a, name) -> np.ndarray:
        a = np.asarray(a)
        if a.ndim == 2 and self.groups == 1:
            a = a[None]
        if a.ndim != 3 or a.shape[0] != self.groups or a.shape[2] != self.n0:
            raise ValueError(f"Moments.update: {name} must have shape (groups={self.groups}, rows, n0={self.n0}) "
                             f"(got {a.shape})")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"Moments.update: {name} must be a float array (got {a.dtype})")
        return a

    def update(self, X: np.ndarray, Xt: np.ndarray) -> None:
        """Add one batch. X, Xt: (g, rows, N0) float32/float64, the same rows in the same order
        (X from the float network, Xt from the partially quantized one; pass the same object
        twice for a layer whose input is not yet affected by quantization)."""
        same = Xt is X
        X = self._as3d(X, "X")
        Xt = X if same else self._as3d(Xt, "Xt")
        if Xt.shape != X.shape:
            raise ValueError(f"Moments.update: X and Xt shapes differ ({X.shape} vs {Xt.shape})")
        rows = X.shape[1]
        if rows == 0:
            return
        f32 = X.dtype == Xt.dtype == np.float32
        self.rows_dtype = np.float32 if f32 and self.rows_dtype in (None, np.float32) else np.float64
        # float32 rows in the Gram form: products in float32 (twice the GEMM speed) over chunks of
        # rows, summed over chunks in float64 (within a chunk float32 keeps ~1e-6 relative
        # accuracy). Anything else is computed in float64.
        work = np.float32 if self.form == "gram" and X.dtype == Xt.dtype == np.float32 else np.float64
        X64 = X.astype(work, copy=False)
        Xt64 = X64 if same else Xt.astype(work, copy=False)
        ones = np.ones(rows, X64.dtype)  # column sums in the products' dtype, added in float64
        sx = np.matmul(ones, X64)  # column sums (g, N0); faster than sum(axis=1) for small N0
        sxt = sx if same else np.matmul(ones, Xt64)
        if not (np.isfinite(sx).all() and np.isfinite(sxt).all()):  # a NaN / inf anywhere shows here
            raise ValueError("Moments.update: X / Xt contain NaN or inf")
        if self.form == "gram" and self._pending.n == 0 and self._expected:
            # room for the chunk this batch starts: the rows still to come, at most up to the batch
            # that will cross GRAM_CHUNK_BYTES (as many rows as this one in each batch)
            per_row = X64.itemsize * self.groups * self.n0 * (1 if same else 2)
            to_cross = -(-GRAM_CHUNK_BYTES // per_row)
            self._pending.reserve(min(self._expected - self.m, -(-to_cross // rows) * rows))
        self._sx += sx
        self._sxt += sxt
        self.m += rows
        if self.form == "gram":
            # Small batches (e.g. models with a fixed batch of 1) are gathered into chunks of
            # GRAM_CHUNK_BYTES first: the products' cost is in the rows, but every product also
            # adds N0^2 entries into G, H, F.
            self._pending.append(X64, None if same else Xt64)
            if self._pending.nbytes >= GRAM_CHUNK_BYTES:
                self._flush()
        else:
            keep = np.float64 if X.dtype == np.float64 and Xt.dtype == np.float64 else np.float32
            if self._cat is not None:  # rows already handed out: carry them on
                X0, Xt0 = self._cat
                self._rows_kept.append(X0, None if Xt0 is X0 else Xt0)
                self._cat = None
            self._rows_kept.append(X.astype(keep, copy=False), None if same else Xt.astype(keep, copy=False))

    def _flush(self) -> None:
        """Add the pending rows to G, H, F (one product per matrix for the whole chunk)."""
        if self._pending.n == 0:
            return
        X64, Xt64, same = self._pending.take(contiguous=False)  # mixed dtypes promoted to float64
        if self.W is not None:
            self._flush_projected(X64, Xt64)
            return
        if self.groups == 1:  # 2-D products: numpy uses syrk for A^T A
            F = X64[0].T @ X64[0]
            self._F[0] += F
            self._G[0] += F if same else Xt64[0].T @ X64[0]
            self._H[0] += F if same else Xt64[0].T @ Xt64[0]
        else:  # one batched product per matrix over all groups
            XT, XtT = X64.transpose(0, 2, 1), Xt64.transpose(0, 2, 1)
            F = np.matmul(XT, X64)
            self._F += F
            self._G += F if same else np.matmul(XtT, X64)
            self._H += F if same else np.matmul(XtT, Xt64)

    def _flush_projected(self, X: np.ndarray, Xt: np.ndarray) -> None:
        """H += Xt^T Xt; A, G W, ||X W||^2 from the rows (see the class docstring)."""
        W = self.W if X.dtype == np.float64 else self._W32
        XtT = Xt.transpose(0, 2, 1)
        self._H += (Xt[0].T @ Xt[0])[None] if self.groups == 1 else np.matmul(XtT, Xt)
        V = np.zeros((self.groups, X.shape[1], W.shape[2]), X.dtype)  # running X[:, :b0] W[:b0]
        for b0 in range(0, self.n0, PROJECTED_BLOCK):
            b1 = min(b0 + PROJECTED_BLOCK, self.n0)
            Xb, XtbT = X[:, :, b0:b1], XtT[:, b0:b1]
            self._A[:, b0:b1] += np.matmul(np.tril(np.matmul(XtbT, Xb)), W[:, b0:b1]) + np.matmul(XtbT, V)
            V += np.matmul(Xb, W[:, b0:b1])
        self._GW += np.matmul(XtT, V)
        self._xw2 += np.einsum("gmn,gmn->gn", V, V, dtype=np.float64)
        self._gsup += rows_superdiagonal(Xt, X)

    def _gram(self, name: str) -> np.ndarray:
        if self.form != "gram":
            raise AttributeError("G / H / F are only kept by form='gram' Moments")
        if not hasattr(self, name):
            raise AttributeError(f"{name[1:]} is not kept by Moments projected on W (it keeps A = tril(G) W, "
                                 "G W and ||X W||^2 instead)")
        self._flush()
        return getattr(self, name)

    @property
    def A(self) -> np.ndarray:
        """(g, N0, N1g) tril(G) W (projected Moments only)."""
        return self._gram("_A")

    @property
    def GW(self) -> np.ndarray:
        """(g, N0, N1g) G W (projected Moments only)."""
        return self._gram("_GW")

    @property
    def xw2(self) -> np.ndarray:
        """(g, N1g) ||X W||^2 per column (projected Moments only)."""
        return self._gram("_xw2")

    @property
    def G_sup(self) -> np.ndarray:
        """(g, N0) G[t, t+1] (0 for the last row): superdiagonal(G), also kept by projected Moments (the
        residual forms take it from the rows: rows_superdiagonal)."""
        if self.W is not None:
            return self._gram("_gsup")
        return superdiagonal(self._gram("_G"))

    @property
    def G(self) -> np.ndarray:
        """(g, N0, N0) float64 Xt^T X."""
        return self._gram("_G")

    @property
    def H(self) -> np.ndarray:
        """(g, N0, N0) float64 Xt^T Xt."""
        return self._gram("_H")

    def blend(self, beta: float) -> "Moments":
        """The Moments of the rows (X_b, Xt), X_b = Xt + beta (X - Xt), from these statistics (no pass
        over data; the residual form blends its rows): G_b = beta G + (1 - beta) H,
        F_b = beta^2 F + beta (1 - beta) (G + G^T) + (1 - beta)^2 H, and projected on W
        A_b = beta A + (1 - beta) tril(H) W, (G W)_b = beta G W + (1 - beta) H W,
        ||X_b w||^2 = beta^2 ||X w||^2 + 2 beta (1 - beta) w^T G w + (1 - beta)^2 w^T H w.
        mu_x becomes X_b's mean (bias correction takes back the mean of the error the codes are fitted to);
        H, Xt and mu_xt stay. beta = 1 gives these Moments back (QuantSpec.upstream)."""
        beta = float(beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"Moments.blend: beta must be in [0, 1] (got {beta!r})")
        if beta == 1.0:
            return self
        a, b = beta, 1.0 - beta
        out = Moments(self.groups, self.n0, self.form, W=self.W, rows=self._expected)
        out.m, out.rows_dtype, out._sx, out._sxt = self.m, self.rows_dtype, a * self._sx + b * self._sxt, self._sxt.copy()
        if self.form == "residual":
            X, Xt = self._rows()
            Xb = Xt if beta == 0.0 else (X if Xt is X else (a * X + b * Xt).astype(X.dtype, copy=False))
            out._cat = (Xb, Xt)
            return out
        H = self.H  # flushes the pending rows
        out._H = H
        if self.W is None:
            G = self.G
            out._G = a * G + b * H
            out._F = a * a * self._F + a * b * (G + G.transpose(0, 2, 1)) + b * b * H
        else:
            W = self.W
            HW = np.matmul(H, W)
            out._A = a * self._A + b * np.matmul(np.tril(H), W)
            out._GW = a * self._GW + b * HW
            out._xw2 = (a * a * self._xw2 + 2.0 * a * b * np.einsum("gin,gin->gn", W, self._GW)
                        + b * b * np.einsum("gin,gin->gn", W, HW))
            out._gsup = a * self._gsup + b * superdiagonal(H)
        return out

    def errors(self, W: np.ndarray, Q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(||X w - Xt q||^2, ||X w||^2) per column, each (g, N1g), for W and dequantized Q (g, N0, N1g)
        (projected Moments: W must be the W they were projected on)."""
        W, Q = (np.asarray(a, dtype=np.float64) for a in (W, Q))
        if self.form == "residual":
            X, Xt = self._rows()
            XW = np.matmul(X, W.astype(X.dtype)).astype(np.float64)
            U = XW - np.matmul(Xt, Q.astype(Xt.dtype))
            return np.einsum("gmn,gmn->gn", U, U), np.einsum("gmn,gmn->gn", XW, XW)
        qhq = np.einsum("gin,gin->gn", Q, np.matmul(self.H, Q))
        if self.W is None:
            wfw = np.einsum("gin,gin->gn", W, np.matmul(self.F, W))
            return wfw - 2.0 * np.einsum("gin,gin->gn", Q, np.matmul(self.G, W)) + qhq, wfw
        if self.W.shape != W.shape or not np.array_equal(self.W, W):
            raise ValueError("Moments.errors: projected Moments give the errors of the W they were projected on only")
        return self.xw2 - 2.0 * np.einsum("gin,gin->gn", Q, self.GW) + qhq, self.xw2.copy()

    @property
    def F(self) -> np.ndarray:
        """(g, N0, N0) float64 X^T X."""
        return self._gram("_F")

    @property
    def mu_x(self) -> np.ndarray:
        """(g, N0) column means of X."""
        return self._sx / max(self.m, 1)

    @property
    def mu_xt(self) -> np.ndarray:
        """(g, N0) column means of Xt."""
        return self._sxt / max(self.m, 1)

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        if self.form != "residual":
            raise AttributeError("X / Xt rows are only kept by form='residual' Moments")
        if self._cat is None:
            X, Xt, _ = self._rows_kept.take()
            self._cat = (X, Xt)
        return self._cat

    @property
    def X(self) -> np.ndarray:
        """(g, m, N0) rows of X (residual form only)."""
        return self._rows()[0]

    @property
    def Xt(self) -> np.ndarray:
        """(g, m, N0) rows of Xt (residual form only)."""
        return self._rows()[1]
