"""GPFQ math core: greedy path-following quantization of one layer. Knows nothing about ONNX.

A layer computes ``Y = X W`` with ``X`` (m, N0) and ``W`` (N0, N1), one column per output neuron.
``X`` is the layer input in the float network, ``Xt`` (X~) the same input in the partially
quantized network. For every column w GPFQ walks the fan-in t = 0..N0-1 with a residual u:

    z_t = <Xt_t, u_{t-1} + w_t X_t> / ||Xt_t||^2,   q_t = Quant(z_t),   u_t = u_{t-1} + w_t X_t - q_t Xt_t

so that u = X w - Xt q at the end: each rounding decision compensates the output error made so
far. ``reference.py`` is that loop, as written; the fast forms take the same decisions:

- the Gram form (gram.py), on G = Xt^T X and H = Xt^T Xt accumulated over batches:
  z_t = (sum_{s<=t} G[t,s] w_s - sum_{s<t} H[t,s] q_s) / H[t,t];
- the residual form (residual.py, and fused.py for few rows), on the rows themselves.

The step: delta = C r / K, with r the max |w| per column (or per layer, or per block of the
fan-in), K the alphabet's largest level and C chosen from a grid by the exact output error
(search.py). Quant is rounding.level, optionally within a pair bound on consecutive rows (for
integer kernels that add two products in int16; a pair the greedy step would take beyond it is
re-decided jointly; see rounding.py). cost.py picks the form.

Grouped / depthwise convolutions are ``g`` independent problems: all arrays carry a leading
group axis g; W is (g, N0, N1g) with N0 the fan-in per group and N1g the outputs per group.
Units: W, Q, delta, lam are in weight units; G, H, F in (input units)^2; errors in output units^2.
Everything is float64 internally and deterministic (same input -> same bits).
"""

from . import fused, greedy, rounding, steps
from .fused import RESIDUAL_FUSED_MAX_M
from ._numba_cache import drop_stale, load_from_cache_without_refresh
from .cost import choose_form, projection_pays
from .gram import GRAM_BLOCK, gpfq_gram, tril_matmul
from .layer import (DAMP_CANDIDATES, FEW_ROWS_DAMP, UPSTREAM_CANDIDATES, LayerResult, quantize_layer,
                    quantize_layer_held_out, rows_damp)
from .moments import Moments
from .residual import gpfq_residual
from .rounding import Rule, quantize_codes, rtn_codes
from .search import search_passes
from .spec import (DEFAULT_C_GRID, GRANULARITIES, METHODS, SCALE_RULES, SEARCHES, Alphabet, QuantSpec,
                   Sparsity)
from .steps import dequantize, output_error, step_ranges, steps_from_ranges

drop_stale((fused, greedy, rounding, steps))  # kernels inline each other's helpers: one stamp for all
for _module in (fused, greedy, rounding, steps):
    load_from_cache_without_refresh(vars(_module))
del _module

__all__ = [
    "Alphabet", "Sparsity", "QuantSpec", "Moments", "LayerResult", "quantize_layer", "quantize_layer_held_out",
    "DAMP_CANDIDATES", "FEW_ROWS_DAMP", "UPSTREAM_CANDIDATES", "choose_form", "rows_damp",
    "projection_pays", "search_passes", "gpfq_gram", "gpfq_residual", "rtn_codes", "quantize_codes",
    "step_ranges", "steps_from_ranges", "dequantize", "output_error", "tril_matmul", "Rule",
    "DEFAULT_C_GRID", "GRAM_BLOCK", "RESIDUAL_FUSED_MAX_M", "METHODS", "GRANULARITIES", "SCALE_RULES", "SEARCHES",
]
