"""Which form a layer uses: the cost model behind choose_form, before any moment is accumulated.

Costs are in units of one BLAS multiply-add of a large float64 GEMM (one core: about 0.022 ns on
the machine the coefficients were measured on, an AMD EPYC with AVX-512). Everything that is not
a large GEMM is converted to those units by a measured coefficient:

- TRIANGLE_FLOP_WEIGHT: one multiply-add of the numba triangle (greedy.greedy_block) costs
  about 4 BLAS ones (no blocking for registers, a decision per row).
- TRIANGLE_ROW_COST: the triangle kernel's fixed cost per row, group and pass, ~40 ns.
- FUSED_*: the fused residual kernel (fused.residual_lanes), per lane: ~17 + 2.5 m ns per row and
  group plus ~0.6 + 0.15 m ns per row and column (one core, 12 + 12 lanes, m = 1..64,
  N1 = 1..512), i.e. (FUSED_ROW + FUSED_ROW_PER_M m) + N1 (FUSED_COLUMN + FUSED_COLUMN_PER_M m).

Re-measuring: ``python tools/bench_core.py --n0 N0 --n1 N1 [--groups g] [--rows m] --json`` times
one pass of a form against one GEMM of the same size on the same machine ("ratio"); the
triangle coefficients follow from Gram passes at small N1 (overhead) and large N1 (flop weight),
the fused ones from --rows m for m = 1..64 at N1 = 1 and N1 = 512, each divided by the GEMM's
time per multiply-add. The model was checked against whole quantize_layer runs (default grid,
one core): fused residual 3x faster than Gram at m = 64, N0 = 576, N1 = 64 and 7x at N0 = 2304,
N1 = 256; as fast at m = 64, N0 = 27..64; Gram 2-4x faster for depthwise 3x3 (N0 = 9, N1 = 1)
from m = 16 on; blocked residual 5x faster at m = 256, N0 = 2304; equal at m = 1024, N0 = 1152,
N1 = 128. Only the ranking matters: a coefficient off by 2x moves the break-even point, not the
results (both forms give the same codes).
"""

from __future__ import annotations

import numpy as np

from .fused import RESIDUAL_FUSED_MAX_M
from .gram import GRAM_BLOCK
from .moments import PROJECTED_BLOCK
from .residual import residual_block
from .spec import DEFAULT_C_GRID

TRIANGLE_FLOP_WEIGHT = 4
TRIANGLE_ROW_COST = 1800
FUSED_ROW = 770
FUSED_ROW_PER_M = 115
FUSED_COLUMN = 27
FUSED_COLUMN_PER_M = 7


def _accumulate_flops(m: int, n0: int, n1: int, g: int, projected: bool) -> int:
    """Gram form, accumulation and per-layer products: plain G, H, F then tril(G) W, G W, F W; or
    projected (H, and A, G W, ||XW||^2 from the rows)."""
    if projected:
        return 2 * g * m * n0 * n0 + 6 * g * m * n0 * n1 + 2 * g * m * min(n0, PROJECTED_BLOCK) * n0
    return 6 * g * m * n0 * n0 + 5 * g * n0 * n0 * n1


def projection_pays(m: int, n0: int, n1: int, groups: int = 1) -> bool:
    """Whether Moments projected on W (see Moments) costs less than plain G, H, F: roughly when
    6 N1 + 2 min(N0, 256) < 4 N0 (3x3 convs, bottleneck 1x1 convs; not expanding layers)."""
    return _accumulate_flops(m, n0, n1, groups, True) < _accumulate_flops(m, n0, n1, groups, False)


# A form's arrays beyond this rule it out (unless both forms exceed it): the per-layer part of the
# peak memory stays a constant of the model, not of the calibration set (the rows of a depthwise
# layer's residual form grow with m times its groups).
FORM_MEMORY_BYTES = 256 << 20


def choose_form(m: int, n0: int, n1: int, groups: int = 1, memory_limit_bytes: int = FORM_MEMORY_BYTES,
                passes: int = 2 * len(DEFAULT_C_GRID), projected: bool = False) -> str:
    """Pick the Gram or the residual form for a layer with m calibration rows, fan-in n0 per
    group and n1 output columns *per group* (N1g), g groups and ``passes`` greedy passes (one per
    C of the grid, for GPFQ and for the RTN baseline); projected: the Gram form would accumulate
    Moments projected on W.

    Memory (bytes):  gram     3 g N0^2 * 8 (G, H, F); projected g N0^2 * 8 + 3 g N0 N1 * 8
                     residual 2 g m N0 * 8 (X, Xt as float64) + g m N1 * 8 (the state U)
    Cost (module docstring for the coefficients):
      gram      accumulate 6 g m N0^2 + once per layer 5 g N0^2 N1 (tril(G) W, G W, F W)
                (projected: 2 g m N0^2 + 6 g m N0 N1 + 2 g m min(N0, 256) N0 instead)
                + per pass g (N0^2 N1 + TRIANGLE_FLOP_WEIGHT min(N0, GRAM_BLOCK) N0 N1
                              + TRIANGLE_ROW_COST N0)
      residual, m <= RESIDUAL_FUSED_MAX_M (fused, passes + 1 lanes of one sweep):
                (passes + 1) g N0 (FUSED_ROW + FUSED_ROW_PER_M m + N1 (FUSED_COLUMN + FUSED_COLUMN_PER_M m))
      residual, more rows (blocked): 4 g m N0 N1 once
                + per pass g (4 m N0 N1 + TRIANGLE_FLOP_WEIGHT B N0 N1 + TRIANGLE_ROW_COST N0),
                B = residual_block(m)
    A form whose memory exceeds memory_limit_bytes is ruled out (if both do, the smaller one
    wins); otherwise the one with the lower cost. A wide FC layer seen by few rows (m << N0, e.g.
    N0 = 25088, m = 32) therefore never allocates N0^2.
    """
    for name, v in (("m", m), ("n0", n0), ("n1", n1), ("groups", groups), ("passes", passes)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (0 if name == "m" else 1):
            raise ValueError(f"choose_form: {name} must be an int >= {0 if name == 'm' else 1} (got {v!r})")
    g, m, n0, n1 = int(groups), int(m), int(n0), int(n1)
    gram_bytes = (g * n0 * n0 + 3 * g * n0 * n1) * 8 if projected else 3 * g * n0 * n0 * 8
    res_bytes = 2 * g * m * n0 * 8 + g * m * n1 * 8
    gram_ok, res_ok = gram_bytes <= memory_limit_bytes, res_bytes <= memory_limit_bytes
    if gram_ok != res_ok:
        return "gram" if gram_ok else "residual"
    if not gram_ok:
        return "gram" if gram_bytes <= res_bytes else "residual"
    tri, row = TRIANGLE_FLOP_WEIGHT, TRIANGLE_ROW_COST
    gram_flops = (_accumulate_flops(m, n0, n1, g, projected)
                  + passes * g * (n0 * n0 * n1 + tri * min(n0, GRAM_BLOCK) * n0 * n1 + row * n0))
    if m <= RESIDUAL_FUSED_MAX_M:
        res_flops = (passes + 1) * g * n0 * (FUSED_ROW + FUSED_ROW_PER_M * m
                                             + n1 * (FUSED_COLUMN + FUSED_COLUMN_PER_M * m))
    else:
        res_flops = 4 * g * m * n0 * n1 + passes * g * (4 * m * n0 * n1 + tri * residual_block(m) * n0 * n1 + row * n0)
    return "residual" if res_flops < gram_flops else "gram"
