"""Tests of the GPFQ math core (onnx_gpfq.core) against the plain residual-form reference (core.reference).

Ties: the production forms and the reference compute z_t in different floating-point orders, so
they could disagree when z_t / delta lands (within ~1e-12) on a rounding boundary k + 1/2, a
saturation point or the threshold lam. With random continuous float64 data the probability of
that is ~1e-10 per decision, so the tests demand identical codes.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import replace

import numpy as np
import pytest

from onnx_gpfq import core as P
from onnx_gpfq.core import Alphabet, Moments, QuantSpec, Sparsity
from onnx_gpfq.core import reference as ref
from onnx_gpfq.core.fused import RESIDUAL_TILE, Fused
from onnx_gpfq.core.rounding import MODE_HARD, MODE_SOFT, Rule
from onnx_gpfq.core.steps import rows_of

P_ = P


def correlated(rng, g, m, n0, noise=0.1, dead=()):
    """X (g, m, N0) with neighbouring fan-in entries correlated; Xt = X + noise; the fan-in
    indices in `dead` are zero columns of Xt."""
    Z = rng.standard_normal((g, m, n0))
    X = Z + 0.7 * np.roll(Z, 1, axis=2) + 0.4 * np.roll(Z, 2, axis=2)
    Xt = X + noise * rng.standard_normal(X.shape)
    for t in dead:
        Xt[:, :, t] = 0.0
    return X, Xt


def moments_of(X, Xt, form, batches=3):
    g, m, n0 = X.shape
    mom = Moments(g, n0, form)
    for idx in np.array_split(np.arange(m), batches):
        mom.update(X[:, idx], Xt[:, idx])
    return mom


def gram(X, Xt):
    T = Xt.transpose(0, 2, 1)
    return T @ X, T @ Xt, X.transpose(0, 2, 1) @ X


SPARSE = {None: None, "soft": Sparsity("soft", 0.05), "hard": Sparsity("hard", 0.05)}


def ref_sparsity(sp):
    return None if sp is None else (sp.kind, sp.lam)


# (g, m, N0, N1g, granularity, group_size, sparsity, bits, dead Xt columns)
CASES = [
    pytest.param(1, 60, 37, 6, "channel", 0, None, 4, (3, 20), id="linear-channel"),
    pytest.param(1, 20, 45, 5, "channel", 0, None, 3, (0,), id="linear-wide-m<N0"),
    pytest.param(3, 40, 18, 4, "channel", 0, None, 4, (5,), id="conv-groups"),
    pytest.param(8, 30, 9, 1, "channel", 0, None, "ternary", (4,), id="depthwise"),
    pytest.param(2, 50, 26, 5, "tensor", 0, None, 3, (7,), id="tensor"),
    pytest.param(1, 60, 37, 6, "block", 8, None, 4, (9,), id="block-8"),
    pytest.param(2, 40, 21, 3, "block", 5, "soft", 3, (2,), id="block-soft"),
    pytest.param(1, 60, 37, 6, "channel", 0, "soft", 4, (11,), id="soft"),
    pytest.param(3, 40, 18, 4, "channel", 0, "hard", "ternary", (1,), id="hard-ternary"),
    pytest.param(1, 60, 37, 6, "channel", 0, "hard", 4, (30,), id="hard"),
]


@pytest.mark.parametrize("g,m,n0,n1,gran,gs,sp,bits,dead", CASES)
def test_forms_match_reference(g, m, n0, n1, gran, gs, sp, bits, dead):
    rng = np.random.default_rng(zlib.crc32(repr((g, m, n0, n1, gran, gs, sp, bits)).encode()))
    X, Xt = correlated(rng, g, m, n0, dead=dead)
    W = rng.standard_normal((g, n0, n1)) * 0.3
    W[0, :, -1] = 0.0  # an all-zero column: r = 0, codes 0
    alphabet = Alphabet.from_bits(bits)
    sparsity = SPARSE[sp]
    r, bsize = P.step_ranges(W, gran, gs)
    delta = P.steps_from_ranges(r, 0.8, alphabet.K)  # C < 1: some values saturate
    delta_rows = rows_of(delta, bsize, n0)
    delta_rows = np.broadcast_to(delta_rows, W.shape)
    codes_ref, err_ref = ref.gpfq_layer(X, Xt, W, delta_rows, alphabet.lo, alphabet.hi, ref_sparsity(sparsity))
    assert (codes_ref[0, :, -1] == 0).all()
    assert (codes_ref[:, list(dead), :] == 0).all()

    G, H, _ = gram(X, Xt)
    for block in (4, 16, P.GRAM_BLOCK):  # several blocks incl. a short last one, and one block
        c = P.gpfq_gram(W, G, H, delta, alphabet, sparsity, group_size=gs, block=block)
        np.testing.assert_array_equal(c, codes_ref, err_msg=f"gram block={block}")
        c = P.gpfq_residual(W, X, Xt, delta, alphabet, sparsity, group_size=gs, block=block)
        np.testing.assert_array_equal(c, codes_ref, err_msg=f"residual block={block}")

    # the same through quantize_layer (fixed C), from accumulated moments, both forms
    spec = QuantSpec(alphabet, granularity=gran, group_size=gs, scale_rule="fixed", c=0.8, sparsity=sparsity)
    denom = float(np.einsum("gmn,gmn->", X @ W, X @ W))
    for form in ("gram", "residual"):
        res = P.quantize_layer(W, moments_of(X, Xt, form), spec)
        np.testing.assert_array_equal(res.codes, codes_ref, err_msg=form)
        assert res.codes.dtype == np.int32 and res.form == form
        assert res.rel_error == pytest.approx(err_ref.sum() / denom, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(res.weights(), res.codes * delta_rows + 0.0, rtol=1e-15)
        assert res.sparsity == pytest.approx(np.mean(codes_ref == 0))


def test_search_matches_reference_per_column():
    """scale_rule='search': per column, the C with the smallest reference error wins."""
    rng = np.random.default_rng(7)
    g, m, n0, n1 = 2, 50, 24, 5
    X, Xt = correlated(rng, g, m, n0, dead=(6,))
    W = rng.standard_t(4, (g, n0, n1)) * 0.1
    alphabet = Alphabet.from_bits(3)
    grid = (0.3, 0.5, 0.8, 1.0, 1.25)
    r, bsize = P.step_ranges(W, "channel")
    codes, errs = [], []
    for C in grid:
        d = np.broadcast_to(P.steps_from_ranges(r, C, alphabet.K), W.shape)
        c, e = ref.gpfq_layer(X, Xt, W, d, alphabet.lo, alphabet.hi)
        codes.append(c)
        errs.append(e)
    best = np.argmin(np.array(errs), axis=0)  # (g, N1)
    want = np.take_along_axis(np.array(codes), best[None, :, None, :], axis=0)[0]
    for form in ("gram", "residual"):
        res = P.quantize_layer(W, moments_of(X, Xt, form), QuantSpec(alphabet, c_grid=grid))
        np.testing.assert_array_equal(res.codes, want)
        np.testing.assert_array_equal(res.C, np.array(grid)[best])
        np.testing.assert_allclose(res.scale, np.array(grid)[best][:, None, :] * r / alphabet.K, rtol=1e-15)
    # per layer: one C for everything, the best total
    res = P.quantize_layer(W, moments_of(X, Xt, "gram"), QuantSpec(alphabet, c_grid=grid, search_per_channel=False))
    k = int(np.argmin(np.array(errs).sum(axis=(1, 2))))
    np.testing.assert_array_equal(res.codes, codes[k])
    assert (res.C == grid[k]).all()


def _coarse_to_fine(errs: np.ndarray) -> np.ndarray:
    """The grid index the default search picks per column from all reference errors (nC, g, N1):
    the best of every third index from 1, then of that one's two neighbours (earliest on ties)."""
    n = errs.shape[0]
    coarse = list(range(1, n, 3))
    cols = np.indices(errs.shape[1:])
    pick = np.array(coarse)[np.argmin(errs[coarse], axis=0)]
    for lane in (np.maximum(pick - 1, 0), np.minimum(pick + 1, n - 1)):
        better = errs[lane, cols[0], cols[1]] < errs[pick, cols[0], cols[1]]
        pick = np.where(better, lane, pick)
    return pick


@pytest.mark.parametrize("m", [40, 150])  # fused residual (m <= 64) and blocked residual / gram
@pytest.mark.parametrize("method", ["gpfq", "rtn"])
def test_coarse_to_fine_search_matches_reference(m, method):
    """Default grid: 6 passes (coarse to fine) pick what the rule picks from all 12 reference
    errors; "full" (and "auto" on a layer this small) picks the argmin over all 12."""
    rng = np.random.default_rng(11)
    g, n0, n1 = 2, 30, 40
    X, Xt = correlated(rng, g, m, n0)
    W = rng.standard_t(4, (g, n0, n1)) * 0.1
    alphabet = Alphabet.from_bits(3)
    grid = P.DEFAULT_C_GRID
    r, _ = P.step_ranges(W, "channel")
    codes, errs = [], []
    for C in grid:
        d = np.broadcast_to(P.steps_from_ranges(r, C, alphabet.K), W.shape)
        if method == "gpfq":
            c, e = ref.gpfq_layer(X, Xt, W, d, alphabet.lo, alphabet.hi)
        else:
            c = np.clip(np.round(W / d), alphabet.lo, alphabet.hi).astype(np.int32)
            e = np.einsum("gmn,gmn->gn", *(2 * [np.einsum("gmi,gin->gmn", X, W) - np.einsum("gmi,gin->gmn", Xt, c * d)]))
        codes.append(c)
        errs.append(e)
    errs, codes = np.array(errs), np.array(codes)
    full = np.argmin(errs, axis=0)
    for search, pick in (("coarse", _coarse_to_fine(errs)), ("full", full), ("auto", full)):  # auto: a small layer
        want = np.take_along_axis(codes, pick[None, :, None, :], axis=0)[0]
        for form in ("gram", "residual"):
            res = P.quantize_layer(W, moments_of(X, Xt, form), QuantSpec(alphabet, method=method, search=search))
            np.testing.assert_array_equal(res.codes, want, err_msg=f"{form} {search}")
            np.testing.assert_array_equal(res.C, np.array(grid)[pick])


# Few calibration rows (m <= RESIDUAL_FUSED_MAX_M): the residual form runs fused, row by row in
# numba, with every C of the grid in one sweep. (g, m, N0, N1g, granularity, group_size, sparsity, bits)
FEW_ROWS = [
    pytest.param(1, 1, 40, 6, "channel", 0, None, 4, id="m1"),
    pytest.param(1, 3, 45, 5, "channel", 0, None, 3, id="m3"),
    pytest.param(2, 1, 30, 4, "block", 8, "soft", 3, id="m1-groups-block-soft"),
    pytest.param(1, 3, 33, 3, "tensor", 0, "hard", "ternary", id="m3-tensor-hard"),
    pytest.param(1, 3, 12, RESIDUAL_TILE + 37, "channel", 0, None, 4, id="m3-two-column-tiles"),
    pytest.param(3, 2, 9, 1, "channel", 0, None, 4, id="m2-depthwise"),
]


@pytest.mark.parametrize("g,m,n0,n1,gran,gs,sp,bits", FEW_ROWS)
def test_residual_few_rows_matches_reference(g, m, n0, n1, gran, gs, sp, bits):
    rng = np.random.default_rng(zlib.crc32(repr(("few", g, m, n0, n1, gran, sp)).encode()))
    X, Xt = correlated(rng, g, m, n0, dead=(2,))
    W = rng.standard_normal((g, n0, n1)) * 0.3
    if n1 > 1:
        W[0, :, -1] = 0.0
    alphabet, sparsity = Alphabet.from_bits(bits), SPARSE[sp]
    r, bsize = P.step_ranges(W, gran, gs)
    grid = (0.5, 0.8, 1.1)
    codes, errs = [], []
    for C in grid:
        d = np.broadcast_to(rows_of(P.steps_from_ranges(r, C, alphabet.K), bsize, n0), W.shape)
        c, e = ref.gpfq_layer(X, Xt, W, d, alphabet.lo, alphabet.hi, ref_sparsity(sparsity))
        codes.append(c)
        errs.append(e)
    assert (codes[1][:, 2, :] == 0).all()
    delta = P.steps_from_ranges(r, 0.8, alphabet.K)
    fused = P.gpfq_residual(W, X, Xt, delta, alphabet, sparsity, group_size=gs)
    np.testing.assert_array_equal(fused, codes[1])
    blocked = P.gpfq_residual(W, X, Xt, delta, alphabet, sparsity, group_size=gs, block=4)
    np.testing.assert_array_equal(blocked, codes[1])

    denom = float(np.einsum("gmn,gmn->", X @ W, X @ W))
    mom = moments_of(X, Xt, "residual", batches=min(m, 2))
    res = P.quantize_layer(W, mom, QuantSpec(alphabet, granularity=gran, group_size=gs, scale_rule="fixed", c=0.8,
                                             sparsity=sparsity))
    np.testing.assert_array_equal(res.codes, codes[1])
    assert res.rel_error == pytest.approx(errs[1].sum() / denom, rel=1e-9)
    rtn = P.rtn_codes(W, delta, alphabet, sparsity, group_size=gs) * rows_of(delta, bsize, n0)
    assert res.rel_error_rtn == pytest.approx(((X @ W - Xt @ rtn) ** 2).sum() / denom, rel=1e-9)

    # the search: per column (or per layer for tensor), the C with the smallest reference error
    res = P.quantize_layer(W, mom, QuantSpec(alphabet, granularity=gran, group_size=gs, c_grid=grid,
                                             sparsity=sparsity))
    if gran == "tensor":
        best = np.full(W.shape[::2], int(np.argmin(np.array(errs).sum(axis=(1, 2)))))
    else:
        best = np.argmin(np.array(errs), axis=0)
    want = np.take_along_axis(np.array(codes), best[None, :, None, :], axis=0)[0]
    np.testing.assert_array_equal(res.codes, want)
    np.testing.assert_array_equal(res.C, np.array(grid)[best])
    err = np.take_along_axis(np.array(errs), best[None], axis=0)[0]
    assert res.rel_error == pytest.approx(err.sum() / denom, rel=1e-9)
    assert res.rel_error == pytest.approx(((X @ W - Xt @ res.weights()) ** 2).sum() / denom, rel=1e-9)


def test_fused_lanes_are_independent():
    """Several steps in one sweep give bit for bit what each gives alone (so the search can keep
    only errors and rerun the chosen steps for the codes)."""
    rng = np.random.default_rng(21)
    g, m, n0, n1 = 2, 5, 60, 700
    X, Xt = correlated(rng, g, m, n0, dead=(7,))
    W = rng.standard_t(4, (g, n0, n1)) * 0.1
    alphabet = Alphabet.from_bits(3)
    r, bsize = P.step_ranges(W, "block", 16)
    D = np.stack([P.steps_from_ranges(r, C, alphabet.K) for C in (0.4, 0.7, 1.0)])
    f = Fused(X, Xt)
    _, eg, er, xw2 = f.sweep(W, D, D[:2], bsize, Rule.of(alphabet), store=False)
    np.testing.assert_allclose(xw2, ((X @ W) ** 2).sum(axis=1), rtol=1e-12)
    for lane in range(3):
        c, e, _, x1 = f.sweep(W, D[lane:lane + 1], None, bsize, Rule.of(alphabet), store=True)
        assert e.tobytes() == eg[lane:lane + 1].tobytes() and x1.tobytes() == xw2.tobytes()
        np.testing.assert_array_equal(c, P.gpfq_residual(W, X, Xt, D[lane], alphabet, group_size=16, block=8))
        if lane < 2:
            _, _, e, _ = f.sweep(W, None, D[lane:lane + 1], bsize, Rule.of(alphabet), store=False)
            assert e.tobytes() == er[lane:lane + 1].tobytes()


def _quantize_codes_numpy(z, delta_rows, alphabet, sparsity=None):
    """The vectorised numpy rule quantize_codes implemented before its numba fast path."""
    z = np.asarray(z, dtype=np.float64)
    d = np.broadcast_to(np.asarray(delta_rows, dtype=np.float64), z.shape)
    rule = Rule.of(alphabet, sparsity)
    mode, lam = rule.mode, rule.lam
    if mode == MODE_SOFT:
        z = np.sign(z) * np.maximum(np.abs(z) - lam, 0.0)
    live = d > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(live, z / np.where(live, d, 1.0), 0.0)
    k = np.clip(np.rint(x), alphabet.lo, alphabet.hi)
    if mode == MODE_HARD:
        k = np.where(k == 0, np.where(z > 0, 1.0, -1.0), k)
        k = np.where(np.abs(z) <= lam, 0.0, k)
    k = np.where(live, k, 0.0)
    return k.astype(np.int32)


@pytest.mark.parametrize("sp", [None, "soft", "hard"])
def test_quantize_codes_and_step_ranges_fast_paths(sp):
    rng = np.random.default_rng(22)
    g, n0, n1 = 2, 13, 6
    z = rng.standard_normal((g, n0, n1)) * 0.2
    z[0, 0, :3] = [np.inf, -np.inf, 0.0]
    z[1, 4] = 0.05 * rng.integers(-3, 4, n1) + 0.025  # exact halves: round half to even
    a, sparsity = Alphabet.from_bits(3), SPARSE[sp]
    d = np.abs(rng.standard_normal((g, n0, n1))) * 0.05
    d[0, 1, 2] = 0.0
    d[1, 4] = 0.05
    for dd in (d, d[:, :1], d[:1], d[0, 0], d[:1, :, :1], 0.05, 0.0, d[:, :1, :1], d[0, :, :1]):
        for zz in (z, z[0]):
            if np.ndim(dd) == 3 and zz.ndim == 2:
                continue
            want = _quantize_codes_numpy(zz, dd, a, sparsity)
            got = P.quantize_codes(zz, dd, a, sparsity)
            assert got.dtype == np.int32 and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    for dtype in (np.float64, np.float32):
        W = z.astype(dtype)
        W[1, 3, 1] = np.nan
        A = np.abs(W)
        for gran, gs, want in (("channel", 0, A.max(axis=1, keepdims=True)),
                               ("tensor", 0, np.full((g, 1, n1), A.max())),
                               ("block", 4, np.maximum.reduceat(A, np.arange(0, n0, 4), axis=1))):
            r, bsize = P.step_ranges(W, gran, gs)
            assert r.dtype == want.dtype and bsize == (gs or n0)
            np.testing.assert_array_equal(r, want)


def test_output_error_formula():
    rng = np.random.default_rng(1)
    X, Xt = correlated(rng, 2, 30, 12)
    W = rng.standard_normal((2, 12, 4))
    Q = W + 0.1 * rng.standard_normal(W.shape)
    G, H, F = gram(X, Xt)
    direct = ((X @ W - Xt @ Q) ** 2).sum(axis=1)
    np.testing.assert_allclose(P.output_error(W, Q, G, H, F), direct, rtol=1e-10)
    np.testing.assert_allclose(P.output_error(W[0], Q[0], G[0], H[0], F[0]), direct[0], rtol=1e-10)


def test_moments_accumulate_exactly():
    rng = np.random.default_rng(2)
    X, Xt = correlated(rng, 2, 40, 7)
    mom = moments_of(X, Xt, "gram", batches=4)
    G, H, F = gram(X, Xt)
    np.testing.assert_allclose(mom.G, G, rtol=1e-12)
    np.testing.assert_allclose(mom.H, H, rtol=1e-12)
    np.testing.assert_allclose(mom.F, F, rtol=1e-12)
    np.testing.assert_allclose(mom.mu_x, X.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(mom.mu_xt, Xt.mean(axis=1), rtol=1e-12)
    assert mom.m == 40
    res = moments_of(X, Xt, "residual", batches=4)
    np.testing.assert_array_equal(res.X, X)
    np.testing.assert_array_equal(res.Xt, Xt)
    same = Moments(1, 7, "gram")
    same.update(X[:1], X[:1])  # Xt is X: one product
    np.testing.assert_allclose(same.G, F[:1], rtol=1e-12)
    np.testing.assert_allclose(same.H, F[:1], rtol=1e-12)
    with pytest.raises(ValueError):
        same.update(X[:1, :, :5], X[:1, :, :5])
    with pytest.raises(ValueError):
        same.update(X[:1], Xt[:1, :10])


def test_moments_float32_residual_storage():
    rng = np.random.default_rng(3)
    X, Xt = correlated(rng, 1, 20, 5)
    mom = Moments(1, 5, "residual")
    mom.update(X.astype(np.float32), Xt.astype(np.float32))
    assert mom.X.dtype == np.float32 and mom.X.shape == (1, 20, 5)


def layer_problem(seed=4, g=1, m=400, n0=64, n1=16):
    rng = np.random.default_rng(seed)
    X, Xt = correlated(rng, g, m, n0, noise=0.05)
    W = rng.standard_normal((g, n0, n1)) / math.sqrt(n0)
    return W, X, Xt


@pytest.mark.parametrize("bits", [4, 3, "ternary"])
def test_gpfq_beats_rtn_on_correlated_data(bits):
    W, X, Xt = layer_problem()
    res = P.quantize_layer(W, moments_of(X, Xt, "gram"), QuantSpec(Alphabet.from_bits(bits)))
    assert res.rel_error < 0.8 * res.rel_error_rtn  # measured 0.64 (4b), 0.63 (3b), 0.70 (ternary)
    rtn = P.quantize_layer(W, moments_of(X, Xt, "gram"), QuantSpec(Alphabet.from_bits(bits), method="rtn"))
    assert rtn.rel_error == rtn.rel_error_rtn == pytest.approx(res.rel_error_rtn)


@pytest.mark.parametrize("form", ["gram", "residual"])
@pytest.mark.parametrize("gran,per_channel", [("channel", True), ("channel", False), ("tensor", True), ("block", True)])
@pytest.mark.parametrize("method", ["gpfq", "rtn"])
def test_search_never_worse_than_c1(form, gran, per_channel, method):
    assert 1.0 in P.DEFAULT_C_GRID
    W, X, Xt = layer_problem(seed=5, g=2, m=120, n0=40, n1=6)
    mom = moments_of(X, Xt, form)
    common = dict(method=method, granularity=gran, group_size=16 if gran == "block" else 0,
                  search_per_channel=per_channel)
    a = Alphabet.from_bits(3)
    s = P.quantize_layer(W, mom, QuantSpec(a, **common))
    f = P.quantize_layer(W, mom, QuantSpec(a, scale_rule="fixed", c=1.0, **common))
    assert s.rel_error <= f.rel_error * (1 + 1e-12)
    assert s.rel_error_rtn <= f.rel_error_rtn * (1 + 1e-12)
    assert (f.C == 1.0).all()
    if gran == "tensor" or not per_channel:
        assert np.unique(s.C).size == 1
    if gran == "tensor":
        assert np.unique(s.scale).size == 1


def test_errors_are_exact():
    """rel_error and rel_error_rtn equal the directly computed ||XW - Xt Q||^2 / ||XW||^2."""
    W, X, Xt = layer_problem(seed=6, g=2, m=100, n0=30, n1=5)
    denom = ((X @ W) ** 2).sum()
    for form in ("gram", "residual"):
        for method in ("gpfq", "rtn"):
            res = P.quantize_layer(W, moments_of(X, Xt, form), QuantSpec(Alphabet.from_bits(4), method=method))
            Q = res.weights()
            assert res.rel_error == pytest.approx(((X @ W - Xt @ Q) ** 2).sum() / denom, rel=1e-9)


def test_gram_and_residual_layers_agree():
    W, X, Xt = layer_problem(seed=8, g=2, m=50, n0=70, n1=7)
    for spec in (QuantSpec(Alphabet.from_bits(4)), QuantSpec(Alphabet.from_bits(3), granularity="block", group_size=32,
                                                             sparsity=Sparsity("hard", 0.02))):
        a = P.quantize_layer(W, moments_of(X, Xt, "gram"), spec)
        b = P.quantize_layer(W, moments_of(X, Xt, "residual"), spec)
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.C, b.C)
        assert a.rel_error == pytest.approx(b.rel_error, rel=1e-9)
        assert a.rel_error_rtn == pytest.approx(b.rel_error_rtn, rel=1e-9)


def test_bias_correction_zeroes_mean_shift():
    W, X, Xt = layer_problem(seed=9, g=2, m=80, n0=20, n1=4)
    Xt = Xt + 0.3  # a mean shift in the quantized network's input
    for form in ("gram", "residual"):
        res = P.quantize_layer(W, moments_of(X, Xt, form), QuantSpec(Alphabet.from_bits(3), bias_correction=True))
        shift = (X @ W).mean(axis=1) - ((Xt @ res.weights()).mean(axis=1) + res.bias_delta)
        np.testing.assert_allclose(shift, 0.0, atol=1e-12)
        assert res.bias_delta.shape == (2, 4)
    assert P.quantize_layer(W, moments_of(X, Xt, "gram"), QuantSpec(Alphabet.from_bits(3))).bias_delta is None


@pytest.mark.parametrize("gran,gs", [("channel", 0), ("tensor", 0), ("block", 7)])
def test_rtn_codes_are_rounded_weights(gran, gs):
    W, X, Xt = layer_problem(seed=10, g=2, m=60, n0=20, n1=4)
    a = Alphabet.from_bits(4, full_range=True)
    res = P.quantize_layer(W, moments_of(X, Xt, "gram"),
                           QuantSpec(a, method="rtn", granularity=gran, group_size=gs, scale_rule="fixed", c=0.7))
    r, bsize = P.step_ranges(W, gran, gs)
    delta = rows_of(0.7 * r / a.K, bsize, W.shape[1])
    np.testing.assert_array_equal(res.codes, np.clip(np.rint(W / delta), a.lo, a.hi))
    assert res.codes.min() >= -8 and res.codes.max() <= 7
    # with the search, each column's codes are the rounding at its chosen C
    res = P.quantize_layer(W, moments_of(X, Xt, "gram"), QuantSpec(a, method="rtn", granularity=gran, group_size=gs))
    rows = rows_of(res.scale, bsize, W.shape[1])
    np.testing.assert_array_equal(res.codes, np.clip(np.rint(W / rows), a.lo, a.hi))
    np.testing.assert_allclose(res.scale, res.C[:, None, :] * r / a.K, rtol=1e-15)


def test_sparsity_variants():
    W, X, Xt = layer_problem(seed=11)
    a = Alphabet.from_bits(4)
    mom = moments_of(X, Xt, "gram")
    plain = P.quantize_layer(W, mom, QuantSpec(a, scale_rule="fixed"))
    lam = 0.5 * float(np.median(np.abs(W)))
    soft = P.quantize_layer(W, mom, QuantSpec(a, scale_rule="fixed", sparsity=Sparsity("soft", lam)))
    hard = P.quantize_layer(W, mom, QuantSpec(a, scale_rule="fixed", sparsity=Sparsity("hard", lam)))
    assert soft.sparsity > plain.sparsity and hard.sparsity > plain.sparsity
    assert soft.sparsity == pytest.approx(np.mean(soft.codes == 0))
    # the integer-representable hard variant only uses the plain levels
    assert hard.codes.min() >= a.lo and hard.codes.max() <= a.hi
    # hard: every nonzero level needs |z| > lam; for RTN z = w, so rounding-to-zero is overridden
    rtn = P.rtn_codes(W[0], 0.01, a, Sparsity("hard", 0.004))
    w = W[0]
    assert ((rtn == 0) == (np.abs(w) <= 0.004)).all()
    big = np.abs(w) > 0.015  # rounds to a nonzero level anyway
    np.testing.assert_array_equal(rtn[big], np.clip(np.rint(w / 0.01), a.lo, a.hi)[big])
    soft_rtn = P.rtn_codes(W[0], 0.01, a, Sparsity("soft", 0.004))
    shrunk = np.sign(w) * np.maximum(np.abs(w) - 0.004, 0)
    np.testing.assert_array_equal(soft_rtn, np.clip(np.rint(shrunk / 0.01), -7, 7))


def test_zero_input_columns_and_zero_weights():
    W, X, Xt = layer_problem(seed=12, m=50, n0=20, n1=3)
    Xt[:, :, [0, 5]] = 0.0
    W[:, :, 1] = 0.0
    for form in ("gram", "residual"):
        res = P.quantize_layer(W, moments_of(X, Xt, form), QuantSpec(Alphabet.from_bits(4)))
        assert (res.codes[:, [0, 5], :] == 0).all()
        assert (res.codes[:, :, 1] == 0).all() and (res.scale[:, :, 1] == 1.0).all()
        assert np.isfinite(res.rel_error)
    # a whole layer of zeros
    res = P.quantize_layer(np.zeros_like(W), moments_of(X, Xt, "gram"), QuantSpec(Alphabet.from_bits(4)))
    assert (res.codes == 0).all() and res.rel_error == 0.0 and (res.scale == 1.0).all()


def test_deterministic():
    W, X, Xt = layer_problem(seed=13, g=2, m=90, n0=150, n1=9)
    for form in ("gram", "residual"):
        a = P.quantize_layer(W, moments_of(X, Xt, form), QuantSpec(Alphabet.from_bits(4), bias_correction=True))
        b = P.quantize_layer(W.copy(), moments_of(X.copy(), Xt.copy(), form),
                             QuantSpec(Alphabet.from_bits(4), bias_correction=True))
        for f in ("codes", "scale", "C", "bias_delta"):
            assert getattr(a, f).tobytes() == getattr(b, f).tobytes()
        assert a.rel_error == b.rel_error and a.rel_error_rtn == b.rel_error_rtn


@pytest.mark.parametrize("form,m,n1,g", [("gram", 300, 150, 1), ("gram", 200, 70, 3), ("residual", 300, 150, 1),
                                          ("residual", 40, 150, 1), ("residual", 40, 70, 3), ("residual", 40, 1, 5)])
def test_numba_threads_give_the_same_bits(form, m, n1, g):
    """The kernels split columns (and groups) over numba's threads; every thread count gives the
    bits of one thread (the forms' passes, the fused residual kernel, the step search)."""
    import numba

    W, X, Xt = layer_problem(seed=23, g=g, m=m, n0=130, n1=n1)
    spec = QuantSpec(Alphabet.from_bits(3), bias_correction=True)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, before, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            results.append(P.quantize_layer(W, moments_of(X, Xt, form), spec))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for f in ("codes", "scale", "C", "bias_delta"):
            assert getattr(other, f).tobytes() == getattr(results[0], f).tobytes()
        assert other.rel_error == results[0].rel_error and other.rel_error_rtn == results[0].rel_error_rtn


def test_block_scale_shape_and_dequantize():
    W, X, Xt = layer_problem(seed=14, g=2, m=60, n0=20, n1=3)
    res = P.quantize_layer(W, moments_of(X, Xt, "gram"),
                           QuantSpec(Alphabet.from_bits(4), granularity="block", group_size=8))
    assert res.scale.shape == (2, 3, 3) and res.group_size == 8
    deq = P.dequantize(res.codes, res.scale, 8)
    np.testing.assert_array_equal(deq[:, 16:], res.codes[:, 16:] * res.scale[:, 2:3])
    with pytest.raises(ValueError):
        P.dequantize(res.codes, res.scale)
    ch = P.quantize_layer(W, moments_of(X, Xt, "gram"), QuantSpec(Alphabet.from_bits(4)))
    assert ch.scale.shape == (2, 1, 3) and ch.C.shape == (2, 3)
    np.testing.assert_array_equal(P.dequantize(ch.codes, ch.scale), ch.codes * ch.scale)


def test_alphabet():
    assert Alphabet.from_bits("ternary") == Alphabet(-1, 1)
    assert Alphabet.from_bits(4) == Alphabet(-7, 7) and Alphabet.from_bits(4).K == 7
    assert Alphabet.from_bits("8") == Alphabet(-127, 127)
    assert Alphabet.from_bits(4, full_range=True) == Alphabet(-8, 7) and Alphabet(-8, 7).K == 8
    assert Alphabet.from_bits(2) == Alphabet(-1, 1)
    for bad in (1, 9, "two", 4.0, True):
        with pytest.raises(ValueError):
            Alphabet.from_bits(bad)
    for lo, hi in ((0, 3), (-3, 0), (1, 2), (-1.0, 1)):
        with pytest.raises(ValueError):
            Alphabet(lo, hi)


@pytest.mark.parametrize("kwargs", [
    dict(method="gptq"),
    dict(granularity="row"),
    dict(granularity="block"),
    dict(granularity="block", group_size=-4),
    dict(granularity="channel", group_size=32),
    dict(scale_rule="minmax"),
    dict(c=0.0),
    dict(c=float("nan")),
    dict(c_grid=()),
    dict(c_grid=(1.0, -0.5)),
    dict(c_grid=(1.0, float("inf"))),
    dict(c_grid="abc"),
    dict(sparsity=("soft", 0.1)),
    dict(bias_correction="yes"),
    dict(search_per_channel=None),
])
def test_spec_validation(kwargs):
    with pytest.raises(ValueError):
        QuantSpec(Alphabet.from_bits(4), **kwargs)


def test_other_validation():
    with pytest.raises(ValueError):
        QuantSpec("4bit")
    for kind, lam in (("medium", 0.1), ("soft", -1.0), ("hard", float("nan"))):
        with pytest.raises(ValueError):
            Sparsity(kind, lam)
    with pytest.raises(ValueError):
        Moments(1, 4, "dense")
    with pytest.raises(ValueError):
        Moments(0, 4, "gram")
    mom = Moments(1, 4, "gram")
    with pytest.raises(ValueError, match="no calibration rows"):
        P.quantize_layer(np.ones((1, 4, 2)), mom, QuantSpec(Alphabet.from_bits(4)))
    mom.update(np.ones((1, 3, 4)), np.ones((1, 3, 4)))
    with pytest.raises(ValueError):
        P.quantize_layer(np.ones((1, 5, 2)), mom, QuantSpec(Alphabet.from_bits(4)))
    assert QuantSpec(Alphabet.from_bits(4), c_grid=[0.5, 1]).c_grid == (0.5, 1.0)


def test_choose_form():
    # VGG fc6: N0 = 25088 seen by 32 rows must never allocate N0^2
    assert P.choose_form(32, 25088, 4096) == "residual"
    assert P.choose_form(512, 25088, 4096) == "residual"
    # convs with many patches
    assert P.choose_form(20000, 576, 64) == "gram"
    assert P.choose_form(50000, 4608, 512) == "gram"
    assert P.choose_form(100000, 9, 1, groups=512) == "gram"
    # a small layer with few rows
    assert P.choose_form(16, 1024, 10) == "residual"
    # few rows, fused residual kernel: convs with a wide fan-in; depthwise 3x3 only with ~1 row
    assert P.choose_form(64, 576, 64) == "residual"
    assert P.choose_form(64, 4608, 512) == "residual"
    assert P.choose_form(64, 9, 1, groups=512) == "gram"
    assert P.choose_form(1, 9, 1, groups=512) == "residual"
    assert P.choose_form(32, 25088, 4096, memory_limit_bytes=1 << 40) == "residual"
    # a depthwise 5x5 over 512 channels: residual rows of 4096 per group would be ~840 MB
    assert P.choose_form(4096, 25, 1, groups=512) == "gram"
    assert P.choose_form(4096, 25, 1, groups=512, memory_limit_bytes=1 << 40) == "residual"


def test_fast_kernel_cache_load_gives_the_same_model():
    """The core loads numba's cached kernels without numba's full context refresh (cold-start
    cost); with ONNX_GPFQ_NUMBA_FULL_LOAD=1 numba's own path runs. Fresh processes, same bytes."""
    import hashlib
    import os
    import subprocess
    import sys
    from pathlib import Path

    models = Path(__file__).resolve().parent.parent / "models"
    code = ("import hashlib, onnx_gpfq; m, _ = onnx_gpfq.quantize(r'%s', r'%s', weight_bits=3, quiet=True); "
            "print(hashlib.sha256(m.SerializeToString()).hexdigest())" % (models / "digits_cnn.onnx", models / "digits_calib.npz"))
    digests = []
    for full in ("0", "1", "0"):  # the first run may compile (cache miss); the last one loads
        env = dict(os.environ, ONNX_GPFQ_NUMBA_FULL_LOAD=full)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        digests.append(out.stdout.strip())
    assert len(set(digests)) == 1 and len(digests[0]) == len(hashlib.sha256().hexdigest())


def test_kernel_cache_is_dropped_when_a_source_it_inlines_changes(tmp_path, monkeypatch):
    """numba keys a cached kernel on its own file only; drop_stale empties the caches of a set of
    modules whenever the hash of their sources differs from the stamp beside the cache, and leaves
    them alone when it matches."""
    import importlib
    import os

    from onnx_gpfq.core import _numba_cache

    (tmp_path / "kern_mod.py").write_text("from numba import njit\n\n@njit(cache=True)\ndef f(x):\n    return x + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("kern_mod")
    assert mod.f(1) == 2  # compiled and cached
    index = mod.f._cache._cache_file
    assert index._load_index()
    stamp = os.path.join(mod.f._cache._cache_path, _numba_cache.STAMP)
    _numba_cache.drop_stale((mod,))  # no stamp yet: counts as changed
    assert index._load_index() == {}
    with open(stamp) as fh:
        first = fh.read()
    mod.f.recompile()  # cached again
    assert index._load_index()
    _numba_cache.drop_stale((mod,))  # same sources: kept
    assert index._load_index()
    with open(stamp, "w") as fh:
        fh.write("another source")
    _numba_cache.drop_stale((mod,))
    assert index._load_index() == {}
    with open(stamp) as fh:
        assert fh.read() == first


@pytest.mark.parametrize("g,n0,n1", [(1, 300, 20), (3, 40, 5)])  # two blocks of the fan-in; grouped
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_projected_moments_match_the_gram_form(g, n0, n1, dtype):
    """Moments projected on W keep H, A = tril(G) W, G W and ||XW||^2 instead of G and F: the same
    numbers as from G, H, F (to rounding), the same codes and errors from quantize_layer."""
    rng = np.random.default_rng(21)
    m = 900
    X, Xt = correlated(rng, g, m, n0, noise=0.05)
    W = rng.standard_normal((g, n0, n1)) / math.sqrt(n0)
    X, Xt = X.astype(dtype), Xt.astype(dtype)
    plain, proj = Moments(g, n0, "gram"), Moments(g, n0, "gram", W=W)
    for idx in np.array_split(np.arange(m), 7):
        plain.update(X[:, idx], Xt[:, idx])
        proj.update(X[:, idx], Xt[:, idx])
    tol = 1e-12 if dtype == np.float64 else 2e-5
    G, H, F = (np.asarray(a, np.float64) for a in gram(X.astype(np.float64), Xt.astype(np.float64)))
    scale = np.abs(G).max() * np.abs(W).sum(axis=1).max()
    np.testing.assert_allclose(proj.H, H, rtol=tol, atol=tol * np.abs(H).max())
    np.testing.assert_allclose(proj.A, P.tril_matmul(G, W), atol=tol * scale)
    np.testing.assert_allclose(proj.GW, G @ W, atol=tol * scale)
    np.testing.assert_allclose(proj.xw2, np.einsum("gin,gin->gn", W, F @ W), rtol=tol)
    with pytest.raises(AttributeError, match="projected"):
        proj.G
    spec = QuantSpec(Alphabet.from_bits(3))
    a, b = P.quantize_layer(W, plain, spec), P.quantize_layer(W, proj, spec)
    assert b.form == "projected" and a.form == "gram"
    if dtype == np.float64:  # float32 products may round a tie differently
        np.testing.assert_array_equal(a.codes, b.codes)
    else:
        assert np.mean(a.codes != b.codes) < 0.01
    assert b.rel_error == pytest.approx(a.rel_error, rel=1e-9 if dtype == np.float64 else 1e-3)
    assert b.rel_error_rtn == pytest.approx(a.rel_error_rtn, rel=1e-9 if dtype == np.float64 else 1e-3)
    with pytest.raises(ValueError, match="other weights"):
        P.quantize_layer(W + 1.0, proj, spec)


@pytest.mark.parametrize("form,m", [("gram", 200), ("residual", 200), ("residual", 30), ("projected", 200)])
@pytest.mark.parametrize("g", [1, 2])
def test_wide_layers_searched_in_column_chunks_match_the_whole_and_the_reference(monkeypatch, form, m, g):
    """A layer wider than LAYER_CHUNK_BYTES runs its step search a chunk of columns at a time (each
    column chooses its own C, so the chunks are independent): the codes, steps and errors of the
    whole layer at once, and GPFQ's codes those of the plain residual reference."""
    rng = np.random.default_rng(23)
    n0, n1 = 24, 29
    X, Xt = correlated(rng, g, m, n0, noise=0.05)
    W = rng.standard_normal((g, n0, n1)) / math.sqrt(n0)

    def moments():
        mom = Moments(g, n0, "gram" if form == "projected" else form, W=W if form == "projected" else None)
        for idx in np.array_split(np.arange(m), 3):
            mom.update(X[:, idx], Xt[:, idx])
        return mom

    spec = QuantSpec(Alphabet.from_bits(4), pair_bound=12)  # a bound that binds, on a 4-bit grid
    whole = P.quantize_layer(W, moments(), spec)
    monkeypatch.setattr(P.layer, "LAYER_CHUNK_BYTES", 8 * g * n0 * 6)  # chunks of 6 columns: 5 of them
    chunked = P.quantize_layer(W, moments(), spec)
    np.testing.assert_array_equal(chunked.codes, whole.codes)
    np.testing.assert_array_equal(chunked.scale, whole.scale)
    np.testing.assert_array_equal(chunked.C, whole.C)
    assert chunked.rel_error == pytest.approx(whole.rel_error, rel=1e-12)
    assert chunked.rel_error_rtn == pytest.approx(whole.rel_error_rtn, rel=1e-12)
    delta_rows = np.broadcast_to(chunked.scale, W.shape)  # one step per column
    codes, _ = ref.gpfq_layer(X, Xt, W, delta_rows, spec.alphabet.lo, spec.alphabet.hi, pair=12)
    np.testing.assert_array_equal(chunked.codes, codes)
    tensor = QuantSpec(Alphabet.from_bits(4), granularity="tensor")  # one C for all columns: never chunked
    np.testing.assert_array_equal(P.quantize_layer(W, moments(), tensor).codes,
                                  P.quantize_layer(W, moments(), tensor).codes)


def test_gram_rows_gathered_into_chunks_give_the_same_moments(monkeypatch):
    """Tiny batches (a fixed batch of 1) are gathered before the products: same G, H, F, means."""
    rng = np.random.default_rng(22)
    X, Xt = correlated(rng, 2, 300, 12)
    monkeypatch.setattr(P.moments, "GRAM_CHUNK_BYTES", 5_000)  # several chunks
    chunked = moments_of(X, Xt, "gram", batches=300)
    whole = moments_of(X, Xt, "gram", batches=1)
    for name in ("G", "H", "F", "mu_x", "mu_xt"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-12, atol=1e-12)
    assert chunked.m == whole.m == 300


def test_projection_pays_where_outputs_are_few():
    assert P.projection_pays(4096, 2304, 256)  # 3x3 conv, 256 -> 256
    assert P.projection_pays(4096, 1024, 256)  # bottleneck 1x1
    assert not P.projection_pays(4096, 64, 256)  # expanding 1x1
    assert not P.projection_pays(4096, 256, 256)


# ----------------------------------------------------------------------------------------------
# Pair bound: same-sign |q_2j| + |q_2j+1| <= P on consecutive fan-in rows
# ----------------------------------------------------------------------------------------------

# (g, m, N0, N1g, granularity, group_size, sparsity, bits, P): odd and even N0, m on both sides of
# the fused kernel's limit, groups, blocks, sparsity; P small enough to bind often
PAIR_CASES = [
    pytest.param(1, 60, 37, 6, "channel", 0, None, 4, 8, id="channel-odd-N0"),
    pytest.param(1, 150, 36, 5, "channel", 0, None, 4, 9, id="channel-blocked-residual"),
    pytest.param(3, 40, 18, 4, "channel", 0, None, 3, 4, id="groups"),
    pytest.param(8, 30, 9, 1, "channel", 0, None, "ternary", 1, id="depthwise-ternary"),
    pytest.param(2, 50, 26, 5, "tensor", 0, None, 4, 7, id="tensor"),
    pytest.param(1, 100, 37, 6, "block", 8, None, 4, 8, id="block-8"),
    pytest.param(2, 40, 21, 3, "block", 5, "soft", 4, 6, id="block-soft"),
    pytest.param(3, 40, 19, 4, "channel", 0, "hard", 4, 5, id="hard"),
    pytest.param(2, 80, 23, 4, "channel", 0, "hard", "ternary", 1, id="hard-ternary-P1"),
]


def _pairs_ok(codes, P):
    """codes (g, N0, N1): every code within [-P, P], and no two consecutive rows (2j, 2j+1) of one sign
    whose magnitudes add up beyond P (an odd last row alone)."""
    n0 = codes.shape[1]
    q = codes.astype(np.int64)
    pos, neg = np.maximum(q, 0), np.maximum(-q, 0)
    return bool((np.abs(q) <= P).all() and (pos[:, 0:n0 - 1:2] + pos[:, 1::2] <= P).all()
                and (neg[:, 0:n0 - 1:2] + neg[:, 1::2] <= P).all())


@pytest.mark.parametrize("g,m,n0,n1,gran,gs,sp,bits,P", PAIR_CASES)
def test_pair_bound_all_forms_match_reference(g, m, n0, n1, gran, gs, sp, bits, P):
    rng = np.random.default_rng(zlib.crc32(repr(("pair", g, m, n0, n1, gran, gs, sp, bits, P)).encode()))
    X, Xt = correlated(rng, g, m, n0, dead=(4,))
    W = rng.standard_normal((g, n0, n1)) * 0.3
    alphabet = Alphabet.from_bits(bits)
    sparsity = SPARSE[sp]
    r, bsize = P_.step_ranges(W, gran, gs)
    delta = P_.steps_from_ranges(r, 0.5, alphabet.K)  # small steps: large codes, the bound binds
    delta_rows = np.broadcast_to(rows_of(delta, bsize, n0), W.shape)
    codes_ref, err_ref = ref.gpfq_layer(X, Xt, W, delta_rows, alphabet.lo, alphabet.hi, ref_sparsity(sparsity), pair=P)
    free_ref, _ = ref.gpfq_layer(X, Xt, W, delta_rows, alphabet.lo, alphabet.hi, ref_sparsity(sparsity))
    assert _pairs_ok(codes_ref, P)
    assert not _pairs_ok(free_ref, P), "the case must make the bound bind"

    G, H, _ = gram(X, Xt)
    for block in (3, 4, 16, P_.GRAM_BLOCK):  # an odd block is rounded up to even: a pair never straddles two
        c = P_.gpfq_gram(W, G, H, delta, alphabet, sparsity, group_size=gs, block=block, pair_bound=P)
        np.testing.assert_array_equal(c, codes_ref, err_msg=f"gram block={block}")
        c = P_.gpfq_residual(W, X, Xt, delta, alphabet, sparsity, group_size=gs, block=block, pair_bound=P)
        np.testing.assert_array_equal(c, codes_ref, err_msg=f"residual block={block}")
    if m <= P_.RESIDUAL_FUSED_MAX_M:
        c = P_.gpfq_residual(W, X, Xt, delta, alphabet, sparsity, group_size=gs, pair_bound=P)  # fused kernel
        np.testing.assert_array_equal(c, codes_ref, err_msg="fused")

    rtn_ref = ref.rtn_layer(W, delta_rows, alphabet.lo, alphabet.hi, ref_sparsity(sparsity), pair=P)
    assert _pairs_ok(rtn_ref, P)
    np.testing.assert_array_equal(P_.rtn_codes(W, delta, alphabet, sparsity, group_size=gs, pair_bound=P), rtn_ref)

    denom = float(np.einsum("gmn,gmn->", X @ W, X @ W))
    for method, want, want_err in (("gpfq", codes_ref, err_ref.sum()), ("rtn", rtn_ref, None)):
        spec = QuantSpec(alphabet, method=method, granularity=gran, group_size=gs, scale_rule="fixed", c=0.5,
                         sparsity=sparsity, pair_bound=P)
        for form in ("gram", "residual"):
            res = P_.quantize_layer(W, moments_of(X, Xt, form), spec)
            np.testing.assert_array_equal(res.codes, want, err_msg=f"{method} {form}")
            U = X @ W - Xt @ (rtn_ref * delta_rows)
            assert res.rel_error_rtn == pytest.approx(float(np.einsum("gmn,gmn->", U, U)) / denom, rel=1e-9)
            if want_err is not None:
                assert res.rel_error == pytest.approx(want_err / denom, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("m", [40, 150])  # fused residual and blocked residual / gram
@pytest.mark.parametrize("method", ["gpfq", "rtn"])
def test_pair_bound_search_picks_the_best_constrained_codes(m, method):
    """The step search compares the errors of the constrained codes: per column, the C whose
    bounded codes (reference) have the smallest error wins."""
    rng = np.random.default_rng(11 + m)
    g, n0, n1, P = 2, 25, 5, 9
    X, Xt = correlated(rng, g, m, n0, dead=(6,))
    W = rng.standard_t(4, (g, n0, n1)) * 0.1
    alphabet = Alphabet.from_bits(4)
    grid = (0.3, 0.5, 0.8, 1.0)
    r, _ = P_.step_ranges(W, "channel")
    codes, errs = [], []
    for C in grid:
        d = np.broadcast_to(P_.steps_from_ranges(r, C, alphabet.K), W.shape)
        if method == "gpfq":
            c, e = ref.gpfq_layer(X, Xt, W, d, alphabet.lo, alphabet.hi, pair=P)
        else:
            c = ref.rtn_layer(W, d, alphabet.lo, alphabet.hi, pair=P)
            U = X @ W - Xt @ (c * d)
            e = np.einsum("gmn,gmn->gn", U, U)
        codes.append(c)
        errs.append(e)
    best = np.argmin(np.array(errs), axis=0)
    want = np.take_along_axis(np.array(codes), best[None, :, None, :], axis=0)[0]
    for form in ("gram", "residual"):
        res = P_.quantize_layer(W, moments_of(X, Xt, form),
                                QuantSpec(alphabet, method=method, c_grid=grid, search="full", pair_bound=P))
        np.testing.assert_array_equal(res.codes, want, err_msg=form)
        np.testing.assert_array_equal(res.C, np.array(grid)[best])
        assert _pairs_ok(res.codes, P)


def test_pair_bound_that_never_binds_changes_nothing():
    """P >= 2 K leaves every level allowed: the same codes and errors as no bound."""
    rng = np.random.default_rng(5)
    X, Xt = correlated(rng, 2, 50, 31, dead=(3,))
    W = rng.standard_normal((2, 31, 6))
    alphabet = Alphabet.from_bits(4)
    for form in ("gram", "residual"):
        for method in ("gpfq", "rtn"):
            a = P_.quantize_layer(W, moments_of(X, Xt, form), QuantSpec(alphabet, method=method))
            b = P_.quantize_layer(W, moments_of(X, Xt, form), QuantSpec(alphabet, method=method, pair_bound=14))
            np.testing.assert_array_equal(a.codes, b.codes)
            assert (a.rel_error, a.rel_error_rtn) == (b.rel_error, b.rel_error_rtn)


def test_pair_bound_int8_codes_fit_the_saturating_kernel():
    """8-bit codes with P = 128: no uint8 activations make a pair's int16 sum saturate (the kernel model of
    onnx_gpfq.cpu, checked against onnxruntime in test_cpu_kernels.py), while unbounded codes do."""
    from onnx_gpfq import cpu

    rng = np.random.default_rng(3)
    X, Xt = correlated(rng, 1, 80, 64)
    W = rng.standard_t(3, (1, 64, 16))
    res = P_.quantize_layer(W, moments_of(X, Xt, "gram"), QuantSpec(Alphabet.from_bits(8), pair_bound=128))
    q = res.codes[0].astype(np.int64)  # (K, N)
    assert (255 * cpu.pair_reach(q) <= 32767).all()
    a = np.vstack([np.full(64, 255), np.tile([255, 0], 32), np.tile([0, 255], 32),
                   rng.integers(0, 256, (20, 64))]).astype(np.uint8)
    assert np.array_equal(cpu.saturating_u8s8_matmul(a, q), a.astype(np.int64) @ q)
    assert (np.abs(q[0::2]) + np.abs(q[1::2]) > 128).any()  # opposite-sign pairs beyond 128 are allowed
    free = P_.quantize_layer(W, moments_of(X, Xt, "gram"), QuantSpec(Alphabet.from_bits(8))).codes[0].astype(np.int64)
    assert (cpu.pair_reach(free) > 128).any()  # without the bound some pair would saturate
    assert not np.array_equal(cpu.saturating_u8s8_matmul(a, free), a.astype(np.int64) @ free)


@pytest.mark.parametrize("lo,hi,P", [(-127, 127, 128), (-128, 127, 128), (-7, 7, 9), (-1, 1, 1)])
def test_pair_joint_is_the_best_feasible_pair(lo, hi, P):
    """rounding.pair_joint (the kernels') and reference.joint_pair (on the residual vectors) both find the
    feasible pair with the smallest residual: checked against every feasible (a, b) by brute force."""
    from onnx_gpfq.core.rounding import pair_joint

    rng = np.random.default_rng(hi + P)
    a_all = np.arange(max(lo, -P), min(hi, P) + 1)
    for _ in range(30):
        xa, xb = rng.standard_normal((2, 12))
        xb = 0.6 * xa + 0.8 * xb  # correlated rows, as consecutive fan-in rows are
        da, db = rng.uniform(0.5, 1.5, 2) / max(hi, 1)
        r = rng.standard_normal(12) * 0.3 + xa * (hi * da * rng.uniform(0.5, 1.0)) + xb * (hi * db * rng.uniform(0.5, 1.0))
        A, B = np.meshgrid(a_all, np.arange(lo, hi + 1), indexing="ij")
        ok = ~_breaks_all(A, B, P) & (np.abs(B) <= P)
        E = r[None, None] - (A * da)[..., None] * xa - (B * db)[..., None] * xb
        err = np.where(ok, np.einsum("abm,abm->ab", E, E), np.inf)
        best = err.min()
        a, b = pair_joint(xa @ r, xb @ r, xa @ xa, xa @ xb, xb @ xb, da, db, lo, hi, P)
        e = r - a * da * xa - b * db * xb
        assert not _breaks_all(np.array(a), np.array(b), P)
        assert e @ e == pytest.approx(best, rel=1e-12, abs=1e-12)
        a2, b2 = ref.joint_pair(r, xa, xb, da, db, lo, hi, P)
        assert (a2, b2) == (int(a), int(b))


def _breaks_all(a, b, P):
    return (a * b > 0) & (np.abs(a) + np.abs(b) > P)


def test_joint_pairs_leave_less_error_than_the_sequential_rule(monkeypatch):
    """Re-deciding a pair whose greedy codes break the bound lowers GPFQ's error against narrowing the
    second row alone (the rule without pair_joint), and changes only the layers where the bound binds."""
    rng = np.random.default_rng(8)
    n0 = 36
    X = rng.standard_normal((1, 80, n0)) @ (np.eye(n0) + 0.3 * rng.standard_normal((n0, n0)) / math.sqrt(n0))
    Xt = X + 0.05 * rng.standard_normal(X.shape)
    W = rng.standard_t(4, (1, n0, 24)) * 0.3
    d = np.broadcast_to(np.abs(W).max(axis=1, keepdims=True) / 127, W.shape)  # C = 1: the bound binds often
    joint, err_joint = ref.gpfq_layer(X, Xt, W, d, -127, 127, pair=128)
    monkeypatch.setattr(ref, "breaks", lambda a, b, pair: False)
    seq, err_seq = ref.gpfq_layer(X, Xt, W, d, -127, 127, pair=128)
    assert _pairs_ok(joint, 128) and _pairs_ok(seq, 128)
    assert (joint != seq).any()
    assert err_joint.sum() < 0.8 * err_seq.sum()  # measured: 0.6x


def test_pair_range_narrows_only_the_side_of_the_first_codes_sign():
    """The kernel adds a_2j q_2j + a_2j+1 q_2j+1 with a in 0..255: codes of opposite signs cancel, never
    saturate, and stay free; one of the first code's sign may add up to P with it."""
    assert ref.pair_range(0, [0], -127, 127, 128) == (-127, 127)
    assert ref.pair_range(1, [127], -127, 127, 128) == (-127, 1)
    assert ref.pair_range(1, [-100], -127, 127, 128) == (-28, 127)
    assert ref.pair_range(1, [0], -127, 127, 128) == (-127, 127)
    assert ref.pair_range(3, [0, 0, 5], -8, 7, 6) == (-6, 1)
    assert ref.pair_range(2, [0, 0, 5], -8, 7, 6) == (-6, 6)


# ----------------------------------------------------------------------------------------------
# Ridge (QuantSpec.damp): GPFQ on X and Xt with the rows sqrt(lam) I appended
# ----------------------------------------------------------------------------------------------

def _projected(X, Xt, W):
    g, m, n0 = X.shape
    mom = Moments(g, n0, "gram", W=W)
    for idx in np.array_split(np.arange(m), 3):
        mom.update(X[:, idx], Xt[:, idx])
    return mom


@pytest.mark.parametrize("m", [40, 150])  # the fused residual kernel (m <= 64) and the blocked residual form
@pytest.mark.parametrize("pair", [None, 9])  # with a binding pair bound, pairs are re-decided on the damped rows
def test_damped_gpfq_is_gpfq_on_rows_with_sqrt_lam_identity_appended(m, pair):
    """Every form with QuantSpec.damp takes the reference's decisions on [X; sqrt(lam) I], [Xt; sqrt(lam) I]
    (lam = damp x mean ||Xt_t||^2 per group), and reports the data's own error ||XW - Xt Q||^2 / ||XW||^2."""
    rng = np.random.default_rng(31 + m)
    g, n0, n1, damp = 2, 22, 5, 0.3
    X, Xt = correlated(rng, g, m, n0, dead=(5,))
    W = rng.standard_normal((g, n0, n1)) * 0.3
    alphabet = Alphabet.from_bits(4)
    spec = QuantSpec(alphabet, scale_rule="fixed", c=0.5, damp=damp, pair_bound=pair)
    lam = damp * np.einsum("gmn,gmn->gn", Xt, Xt).mean(axis=1)
    eye = np.sqrt(lam)[:, None, None] * np.eye(n0)[None]
    Xa, Xta = np.concatenate([X, eye], axis=1), np.concatenate([Xt, eye], axis=1)
    r, _ = P_.step_ranges(W, "channel")
    delta_rows = np.broadcast_to(P_.steps_from_ranges(r, 0.5, alphabet.K), W.shape)
    want, _ = ref.gpfq_layer(Xa, Xta, W, delta_rows, alphabet.lo, alphabet.hi, pair=pair)
    plain, _ = ref.gpfq_layer(X, Xt, W, delta_rows, alphabet.lo, alphabet.hi, pair=pair)
    assert (want != plain).any(), "the ridge must change some decision"
    for name, mom in (("gram", moments_of(X, Xt, "gram")), ("residual", moments_of(X, Xt, "residual")),
                      ("projected", _projected(X, Xt, W))):
        res = P_.quantize_layer(W, mom, spec)
        np.testing.assert_array_equal(res.codes, want, err_msg=name)
        U = X @ W - Xt @ (res.codes * delta_rows)
        data = float(np.einsum("gmn,gmn->", U, U)) / float(np.einsum("gmn,gmn->", X @ W, X @ W))
        assert res.rel_error == pytest.approx(data, rel=1e-9), name


def test_damp_zero_changes_nothing_and_a_ridge_is_validated():
    rng = np.random.default_rng(4)
    X, Xt = correlated(rng, 1, 60, 16)
    W = rng.standard_normal((1, 16, 4))
    a = P_.quantize_layer(W, moments_of(X, Xt, "gram"), QuantSpec(Alphabet.from_bits(4)))
    b = P_.quantize_layer(W, moments_of(X, Xt, "gram"), QuantSpec(Alphabet.from_bits(4), damp=0.0))
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.rel_error == b.rel_error
    for bad in (-1.0, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="damp"):
            QuantSpec(Alphabet.from_bits(4), damp=bad)


@pytest.mark.parametrize("m, chosen", [(30, 1.0), (3000, 0.0)])
def test_held_out_rows_choose_the_ridge(m, chosen):
    """quantize_layer_held_out: each candidate's held-out error is ||X_h W - Xt_h Q||^2 of the codes that
    quantize_layer gives with that damp, and the least one wins; with ``full`` the layer is then fitted
    on all rows with it. Fitted on fewer rows than the fan-in, GPFQ overfits them and the ridge wins on
    fresh rows; on plenty of rows it only costs."""
    rng = np.random.default_rng(12)
    g, n0, n1 = 1, 40, 6
    X, Xt = correlated(rng, g, m + 400, n0, noise=0.3)
    W = rng.standard_normal((g, n0, n1)) * 0.3
    spec = QuantSpec(Alphabet.from_bits(4))
    moments = moments_of(X[:, :m], Xt[:, :m], "gram")
    X_h, Xt_h = X[:, m:], Xt[:, m:]
    result, used, errors = P_.quantize_layer_held_out(W, moments, spec, X_h, Xt_h)
    damp = used.damp
    assert set(errors) == {(d, 1.0) for d in P_.DAMP_CANDIDATES}, errors
    assert (damp, used.upstream) == min(errors, key=errors.get) and damp == chosen, errors
    for (d, _), err in errors.items():
        alone = P_.quantize_layer(W, moments_of(X[:, :m], Xt[:, :m], "gram"), QuantSpec(Alphabet.from_bits(4), damp=d))
        assert err == pytest.approx(float(np.sum((X_h @ W - Xt_h @ alone.weights()) ** 2)), rel=1e-9)
        if d == damp:
            np.testing.assert_array_equal(result.codes, alone.codes)
            full = moments_of(X, Xt, "gram")
            refit, refit_spec, _ = P_.quantize_layer_held_out(W, moments, spec, X_h, Xt_h, full=full)
            with_all = P_.quantize_layer(W, moments_of(X, Xt, "gram"), QuantSpec(Alphabet.from_bits(4), damp=d))
            assert refit_spec.damp == d
            np.testing.assert_array_equal(refit.codes, with_all.codes)


@pytest.mark.parametrize("noise, chosen", [(0.3, 0.0), (3.0, 1.0)])
def test_held_out_rows_choose_the_upstream_share(noise, chosen):
    """quantize_layer_held_out over QuantSpec.upstream: each share's held-out error is that of
    quantize_layer's codes with it, the least wins. With 30 rows for a fan-in of 40, a small upstream
    error X - Xt (noise 0.3) is fitted on the rows at the cost of fresh ones: taking none of it back wins;
    a large one (noise 3) is mostly taken back on fresh rows too (Xt still carries X): the whole of it
    (GPFQ's path following) wins."""
    rng = np.random.default_rng(5)
    g, n0, n1, m = 1, 40, 6, 30
    X, _ = correlated(rng, g, m + 400, n0)
    Xt = X + noise * rng.standard_normal(X.shape)
    W = rng.standard_normal((g, n0, n1)) * 0.3
    spec = QuantSpec(Alphabet.from_bits(8))
    moments = moments_of(X[:, :m], Xt[:, :m], "gram")
    X_h, Xt_h = X[:, m:], Xt[:, m:]
    result, used, errors = P_.quantize_layer_held_out(W, moments, spec, X_h, Xt_h, damps=(0.0,),
                                                       upstreams=P_.UPSTREAM_CANDIDATES)
    assert set(errors) == {(0.0, u) for u in P_.UPSTREAM_CANDIDATES}
    assert used.upstream == min(errors, key=errors.get)[1] == chosen, errors
    for (_, u), err in errors.items():
        alone = P_.quantize_layer(W, moments, replace(spec, upstream=u))
        assert err == pytest.approx(float(np.sum((X_h @ W - Xt_h @ alone.weights()) ** 2)), rel=1e-9)
        if u == used.upstream:
            np.testing.assert_array_equal(result.codes, alone.codes)


@pytest.mark.parametrize("beta", [0.0, 0.4])
@pytest.mark.parametrize("m", [40, 150])  # the fused residual kernel (m <= 64) and the blocked residual form
def test_upstream_share_is_gpfq_towards_the_blended_input(m, beta):
    """QuantSpec.upstream = beta: every form takes the reference's decisions on X_b = Xt + beta (X - Xt)
    and Xt, reports the data's own error ||XW - Xt Q||^2 / ||XW||^2, and bias correction takes back the
    mean of the fitted error, mu_b^T W - mu_xt^T Q with X_b's mean. Moments.blend's statistics are those
    of the blended rows."""
    rng = np.random.default_rng(71 + m)
    g, n0, n1 = 2, 22, 5
    X, Xt = correlated(rng, g, m, n0, noise=0.4, dead=(5,))
    W = rng.standard_normal((g, n0, n1)) * 0.3
    Xb = Xt + beta * (X - Xt)
    alphabet = Alphabet.from_bits(4)
    spec = QuantSpec(alphabet, scale_rule="fixed", c=0.5, upstream=beta, bias_correction=True)
    r, _ = P_.step_ranges(W, "channel")
    delta_rows = np.broadcast_to(P_.steps_from_ranges(r, 0.5, alphabet.K), W.shape)
    want, _ = ref.gpfq_layer(Xb, Xt, W, delta_rows, alphabet.lo, alphabet.hi)
    plain, _ = ref.gpfq_layer(X, Xt, W, delta_rows, alphabet.lo, alphabet.hi)
    assert (want != plain).any(), "the blend must change some decision"
    G, H, F = gram(Xb, Xt)
    for name, mom in (("gram", moments_of(X, Xt, "gram")), ("residual", moments_of(X, Xt, "residual")),
                      ("projected", _projected(X, Xt, W))):
        blended = mom.blend(beta)
        np.testing.assert_allclose(blended.mu_x, Xb.mean(axis=1), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(blended.mu_xt, Xt.mean(axis=1), rtol=1e-12)
        if name == "gram":
            for got, exp in ((blended.G, G), (blended.H, H), (blended.F, F)):
                np.testing.assert_allclose(got, exp, rtol=1e-9, atol=1e-9)
        elif name == "projected":
            np.testing.assert_allclose(blended.GW, G @ W, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(blended.A, np.tril(G) @ W, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(blended.xw2, np.einsum("gmn,gmn->gn", Xb @ W, Xb @ W), rtol=1e-9)
            np.testing.assert_allclose(blended.G_sup, P_.moments.superdiagonal(G), rtol=1e-9, atol=1e-9)
        else:
            np.testing.assert_allclose(blended.X, Xb, rtol=1e-6, atol=1e-6)
        res = P_.quantize_layer(W, mom, spec)
        np.testing.assert_array_equal(res.codes, want, err_msg=name)
        Q = res.codes * delta_rows
        U = X @ W - Xt @ Q
        data = float(np.einsum("gmn,gmn->", U, U)) / float(np.einsum("gmn,gmn->", X @ W, X @ W))
        assert res.rel_error == pytest.approx(data, rel=1e-6), name
        bias = np.einsum("gi,gin->gn", Xb.mean(axis=1), W) - np.einsum("gi,gin->gn", Xt.mean(axis=1), Q)
        np.testing.assert_allclose(res.bias_delta, bias, rtol=1e-6, atol=1e-9)
    assert moments_of(X, Xt, "gram").blend(1.0).G is not None  # beta = 1: the Moments themselves
    mom = moments_of(X, Xt, "gram")
    assert mom.blend(1.0) is mom
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="upstream"):
            QuantSpec(alphabet, upstream=bad)
