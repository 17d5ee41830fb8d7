"""One layer, end to end: the step search over the chosen form, errors, bias correction."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .gram import GramForm
from .moments import Moments
from .residual import residual_form
from .rounding import Rule
from .search import Choice, full_search, search
from .spec import QuantSpec
from .steps import dequantize, ridge_error, rows_of, step_ranges


# Wide layers (e.g. a classifier over thousands of classes) are searched a chunk of columns at a
# time: bytes of one (g, N0, columns) float64 array; the passes hold about a dozen of them.
LAYER_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class LayerResult:
    """What quantize_layer chose for one layer.

    codes (g, N0, N1g) int32 in [lo, hi]; scale (g, nb, N1g) float64 step delta (nb = 1 for
    channel/tensor -- all entries equal for tensor -- and ceil(N0/group_size) for block);
    dequantized weight = codes * scale repeated along the fan-in (see dequantize / weights()).
    C (g, N1g) chosen C per column. rel_error = ||XW - Xt Q||_F^2 / ||XW||_F^2 summed over all
    groups, rel_error_rtn the same for RTN with the same step rule, granularity and search.
    sparsity: fraction of zero codes. bias_delta (g, N1g) = mu_b^T W - mu_xt^T Q (add to the
    bias) when requested: mu_b = mu_xt + beta (mu_x - mu_xt), beta = QuantSpec.upstream. form: which
    form computed it. group_size: fan-in rows per scale entry (N0 for channel/tensor).
    """

    codes: np.ndarray
    scale: np.ndarray
    C: np.ndarray
    rel_error: float
    rel_error_rtn: float
    sparsity: float
    bias_delta: np.ndarray | None
    form: str
    group_size: int = 0

    def weights(self) -> np.ndarray:
        """(g, N0, N1g) float64 dequantized weights."""
        return dequantize(self.codes, self.scale, self.group_size)


def quantize_layer(W: np.ndarray, moments: Moments, spec: QuantSpec) -> LayerResult:
    """Quantize one layer. W: (g, N0, N1g) float weights, columns = output neurons, matching
    moments (groups, n0). Runs GPFQ (or RTN) with the step rule of spec and returns codes,
    steps and exact errors. No second pass over data: errors come from G, H, F (Gram form) or
    from the residual (residual form)."""
    if not isinstance(spec, QuantSpec):
        raise ValueError("quantize_layer: spec must be a QuantSpec")
    if not isinstance(moments, Moments):
        raise ValueError("quantize_layer: moments must be a Moments")
    W = np.asarray(W)
    if W.ndim == 2 and moments.groups == 1:
        W = W[None]
    if W.ndim != 3 or W.shape[0] != moments.groups or W.shape[1] != moments.n0 or W.shape[2] < 1:
        raise ValueError(f"quantize_layer: W must be (groups={moments.groups}, N0={moments.n0}, N1g) (got {W.shape})")
    W = np.ascontiguousarray(W, dtype=np.float64)
    r, bsize = step_ranges(W, spec.granularity, spec.group_size)  # delta = C r / K
    if not np.isfinite(r).all():  # max |w| is NaN or inf exactly when some w is
        raise ValueError("quantize_layer: W contains NaN or inf")
    if moments.m == 0:
        raise ValueError("quantize_layer: moments saw no calibration rows")
    g, n0, n1 = W.shape
    data, moments = moments, moments.blend(spec.upstream)  # the fit's target X_b W (QuantSpec.upstream)
    per_column = spec.search_per_channel and spec.granularity != "tensor"
    grid = spec.c_grid if spec.scale_rule == "search" else (spec.c,)
    # Columns are independent problems once each chooses its own C: wide layers run in chunks
    # of columns, so that the passes' (g, N0, columns) arrays stay within LAYER_CHUNK_BYTES.
    width = n1 if not (per_column or len(grid) == 1) else max(1, LAYER_CHUNK_BYTES // (8 * g * n0))
    parts = [_columns(W, moments, spec, r, bsize, grid, per_column, slice(c, min(c + width, n1)))
             for c in range(0, n1, width)]
    best, rtn = parts[0][:2] if len(parts) == 1 else (
        Choice(*(np.concatenate([getattr(p[i], f) for p in parts], axis=a) for f, a in
                 (("codes", 2), ("delta", 2), ("C", 1), ("err", 1)))) for i in (0, 1))
    denom = float(sum(p[2] for p in parts))
    if moments is not data:  # the errors reported are the data's, ||X w - Xt q||^2, not the fit target's
        best_err, xw2 = data.errors(W, _dequantized(best, bsize, n0))
        rtn_err, _ = data.errors(W, _dequantized(rtn, bsize, n0))
        best, rtn, denom = best._replace(err=best_err), rtn._replace(err=rtn_err), float(xw2.sum())

    def rel(err):
        num = max(float(err.sum()), 0.0)
        return num / denom if denom > 0 else (0.0 if num == 0 else math.inf)

    bias_delta = None
    if spec.bias_correction:  # b' = b + mu_b^T W - mu_xt^T Q: the mean of the error the codes were fitted to
        Q = _dequantized(best, bsize, n0)
        # moments are the fit's (Moments.blend): mu_x is X_b's mean, mu_xt + beta (mu_x - mu_xt)
        bias_delta = np.einsum("gi,gin->gn", moments.mu_x, W) - np.einsum("gi,gin->gn", moments.mu_xt, Q)
    zeros = best.codes.size - np.count_nonzero(best.codes)  # = mean(codes == 0) * size, no bool temporary
    return LayerResult(
        codes=best.codes, scale=np.where(best.delta > 0, best.delta, 1.0), C=best.C, rel_error=rel(best.err),
        rel_error_rtn=rel(rtn.err), sparsity=zeros / best.codes.size, bias_delta=bias_delta,
        form="projected" if moments.W is not None else moments.form, group_size=bsize,
    )


def _dequantized(choice: Choice, bsize: int, n0: int) -> np.ndarray:
    """(g, N0, N1g) float64 codes times steps of a search choice."""
    return choice.codes * rows_of(choice.delta, bsize, n0)


def _columns(W: np.ndarray, moments: Moments, spec: QuantSpec, r: np.ndarray, bsize: int, grid, per_column: bool,
             cols: slice) -> tuple[Choice, Choice, float]:
    """The step search on columns ``cols`` of W: (GPFQ's choice, RTN's, sum of ||X w||^2 over them).
    With a ridge (spec.damp) the search compares the damped errors; the choices carry the data's."""
    g, n0, n1 = W.shape
    Wc = W if cols == slice(0, n1) else np.ascontiguousarray(W[:, :, cols])
    form = (GramForm(Wc, moments, cols, spec.damp) if moments.form == "gram"
            else residual_form(Wc, moments, spec.damp))
    rule = Rule.of(spec.alphabet, spec.sparsity, spec.pair_bound)
    methods = ("gpfq", "rtn") if spec.method == "gpfq" else ("rtn",)
    chosen = search(form, np.ascontiguousarray(r[:, :, cols]), bsize, rule, spec.alphabet.K, grid, per_column,
                    full_search(spec, moments.m, n0, n1, g), methods)
    if form.lam is not None:
        chosen = {m: c._replace(err=c.err - ridge_error(form.lam, Wc, c.codes, c.delta, bsize)) for m, c in chosen.items()}
    return chosen[spec.method], chosen["rtn"], float(form.wfw.sum())


DAMP_CANDIDATES = (0.0, 1.0)  # the ridges --damp auto chooses from (QuantSpec.damp)
UPSTREAM_CANDIDATES = (1.0, 0.5, 0.0)  # the shares --upstream auto chooses from (QuantSpec.upstream)
FEW_ROWS_DAMP = 1.0  # --damp rows: the ridge of a layer with fewer calibration rows than fan-in inputs


def rows_damp(m: int, n0: int) -> float:
    """--damp rows: the ridge (QuantSpec.damp) for a layer fitted on m rows of n0 inputs. With m < n0 the
    least-squares fit is underdetermined: GPFQ can match the few rows with codes far from W (an SE block's
    1x1 convs on pooled rows, a classifier after pooling: one row per calibration sample), so those layers
    get FEW_ROWS_DAMP; the others none."""
    return FEW_ROWS_DAMP if m < n0 else 0.0


def quantize_layer_held_out(W: np.ndarray, moments: Moments, spec: QuantSpec, X_h: np.ndarray, Xt_h: np.ndarray,
                            full: Moments | None = None, damps: tuple[float, ...] = DAMP_CANDIDATES,
                            upstreams: tuple[float, ...] | None = None
                            ) -> tuple[LayerResult, QuantSpec, dict[tuple[float, float], float]]:
    """The ridge (QuantSpec.damp) of ``damps`` and upstream share (QuantSpec.upstream) of ``upstreams``
    (None: spec's own) whose codes, fitted on ``moments``, give the least output error on held-out rows
    the moments never saw, ||X_h W - Xt_h Q||^2 (X_h, Xt_h: (g, m_h, N0), the same rows in both networks;
    ties go to the earlier pair, damps outer), and the layer quantized with them: on ``full`` (the Moments
    of all rows, held-out ones included) when given, else the fit itself.
    GPFQ fits its calibration rows, the upstream error (X - Xt) w on them included: where they are few for
    the fan-in, the ridge's pull towards W, or taking back less of the upstream error, generalises better;
    where they are many it only costs. Returns (result, the spec it was quantized with, the held-out error
    of each (damp, upstream), in output units^2)."""
    W = np.asarray(W, dtype=np.float64)
    W = W[None] if W.ndim == 2 else W
    X_h, Xt_h = (np.asarray(a, dtype=np.float64) for a in (X_h, Xt_h))
    target = np.einsum("gmi,gin->gmn", X_h, W)
    best, errors = None, {}
    for damp in damps:
        for upstream in (spec.upstream,) if upstreams is None else upstreams:
            trial = replace(spec, damp=float(damp), upstream=float(upstream))
            result = quantize_layer(W, moments, trial)
            key = (trial.damp, trial.upstream)
            errors[key] = float(np.sum((target - np.einsum("gmi,gin->gmn", Xt_h, result.weights())) ** 2))
            if best is None or errors[key] < errors[(best[1].damp, best[1].upstream)]:
                best = (result, trial)
    result = best[0] if full is None else quantize_layer(W, full, best[1])
    return result, best[1], errors
