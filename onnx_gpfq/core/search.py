"""The step search: delta = C r / K, C from a grid, chosen by the exact output error.

One driver for every form. A form (gram.GramForm, residual.ResidualForm, residual.FusedForm)
implements the protocol ``Form`` below: it evaluates a stage's lanes (one delta per column each)
for GPFQ and for the RTN baseline, returning each lane's per-column error and, where it keeps
them, its codes; ``codes`` computes the codes of the chosen steps where the form kept none (the
fused kernel keeps errors only). Per column (or for the whole layer) the lane with the smallest
error wins, the earlier one on ties.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np

from .rounding import Rule, rtn
from .spec import COARSE_SEARCH_FLOPS, QuantSpec
from .steps import steps_from_ranges


class Form(Protocol):
    W: np.ndarray  # (g, N0, N1) float64
    wfw: np.ndarray  # (g, N1) ||X w||^2 per column (set by the first evaluate at the latest)

    def evaluate(self, deltas: dict[str, list[np.ndarray]], bsize: int,
                 rule: Rule) -> dict[str, list[tuple[np.ndarray, np.ndarray | None]]]:
        """{method: [delta (g, nb, N1) per lane]} -> {method: [(err (g, N1), codes or None)]}."""

    def codes(self, method: str, choice: "Choice", bsize: int, rule: Rule) -> "Choice":
        """The choice with its codes (and their exact error)."""


class Choice(NamedTuple):
    """A search's result: codes (None until filled), steps, C per column and the exact errors."""

    codes: np.ndarray  # (g, N0, N1) int32
    delta: np.ndarray  # (g, nb, N1)
    C: np.ndarray  # (g, N1)
    err: np.ndarray  # (g, N1) squared output error


class Stages:
    """The C values a step search tries, stage by stage, as grid indices per column.

    Iterating yields, per stage, a list of lanes; a lane is a (g, N1) array of indices into the
    grid (one C per column; all equal when the choice is per layer). Full search: one stage, one
    lane per C. Coarse to fine (grids of 6 or more, unless full): every third C from the second
    on, then the two neighbours of the best so far (per column, or of the layer's best).
    """

    def __init__(self, grid, shape, per_column: bool, full: bool):
        self.grid, self.shape, self.per_column = np.asarray(grid, dtype=np.float64), shape, per_column
        self.refine = self.coarse_to_fine(len(grid), full)
        first = range(1, len(grid), 3) if self.refine else range(len(grid))
        self.first = [np.full(shape, i, np.intp) for i in first]
        self.best = Best(per_column, self.grid)  # fed by the caller; steers the refinement

    @staticmethod
    def coarse_to_fine(n: int, full: bool) -> bool:
        return not full and n >= 6

    @staticmethod
    def lanes(n: int, full: bool) -> int:
        """Passes one search runs over a grid of n values."""
        return len(range(1, n, 3)) + 2 if Stages.coarse_to_fine(n, full) else n

    def C(self, lane: np.ndarray) -> np.ndarray:
        return self.grid[lane]

    def __iter__(self):
        yield self.first
        if self.refine:
            i = self.best.i
            yield [np.maximum(i - 1, 0), np.minimum(i + 1, len(self.grid) - 1)]


class Best:
    """The best lane so far, per column (or per layer): grid index, error, codes if kept.
    Ties keep the earlier lane."""

    def __init__(self, per_column: bool, grid: np.ndarray):
        self.per_column, self.grid = per_column, grid
        self.i = self.err = self.codes = None

    def offer(self, lane: np.ndarray, err: np.ndarray, codes: np.ndarray | None = None) -> None:
        if self.err is None:
            self.i, self.err, self.codes = lane.copy(), err.copy(), None if codes is None else codes.copy()
        elif self.per_column:
            better = err < self.err
            if better.any():
                self.i[better] = lane[better]
                np.copyto(self.err, err, where=better)
                if codes is not None:
                    np.copyto(self.codes, codes, where=better[:, None, :])
        elif err.sum() < self.err.sum():
            self.i, self.err, self.codes = lane.copy(), err.copy(), None if codes is None else codes.copy()

    def choice(self, r: np.ndarray, K: int) -> "Choice":
        C = self.grid[self.i]
        return Choice(self.codes, steps_from_ranges(r, C, K), C, self.err)


def search(form: Form, r: np.ndarray, bsize: int, rule: Rule, K: int, grid, per_column: bool, full: bool,
           methods: tuple[str, ...]) -> dict[str, Choice]:
    """Run the stages of the search for each method in lockstep (one evaluate per stage, all
    methods' lanes together) and return each method's choice, with codes."""
    g, _, n1 = form.W.shape
    stages = {m: Stages(grid, (g, n1), per_column, full) for m in methods}
    others = {m: iter(stages[m]) for m in methods[1:]}
    for first in stages[methods[0]]:
        lanes = {methods[0]: first, **{m: next(it) for m, it in others.items()}}
        deltas = {m: [steps_from_ranges(r, stages[m].C(lane), K) for lane in ls] for m, ls in lanes.items()}
        results = form.evaluate(deltas, bsize, rule)
        for m, ls in lanes.items():
            for lane, (err, codes) in zip(ls, results[m]):
                stages[m].best.offer(lane, err, codes)
    choices = {}
    for m in methods:
        choice = stages[m].best.choice(r, K)
        choices[m] = choice if choice.codes is not None else form.codes(m, choice, bsize, rule)
    return choices


def full_search(spec: QuantSpec, m: int, n0: int, n1: int, groups: int) -> bool:
    """Whether the step search tries every C of the grid (see QuantSpec.search)."""
    return spec.search == "full" or (spec.search == "auto" and groups * n0 * n1 * min(n0, m) <= COARSE_SEARCH_FLOPS)


def search_passes(spec: QuantSpec, m: int, n0: int, n1: int, groups: int = 1) -> int:
    """Greedy passes quantize_layer runs for the step search, GPFQ and RTN baseline together."""
    if spec.scale_rule == "fixed":
        return 2
    return 2 * Stages.lanes(len(spec.c_grid), full_search(spec, m, n0, n1, groups))


ERROR_LANES_BYTES = 256 << 20  # RTN lanes whose errors are computed in one product


class PassForm:
    """A form that runs one greedy pass per GPFQ lane (``greedy``: codes and their errors) and
    computes the errors of given codes for several RTN lanes per product (``errors``); both keep
    the codes, so ``codes`` is never needed. ``rows``: m where the error product is over the rows."""

    W: np.ndarray
    rows = 0

    def evaluate(self, deltas, bsize, rule):
        g, n0, n1 = self.W.shape
        out = {}
        for method, ds in deltas.items():
            if method == "gpfq":
                out[method] = [self.greedy(d, bsize, rule)[::-1] for d in ds]
                continue
            per_call = max(1, ERROR_LANES_BYTES // (8 * g * n1 * max(n0, self.rows)))
            out[method] = []
            for i in range(0, len(ds), per_call):
                part = ds[i:i + per_call]
                codes = [rtn(self.W, d, bsize, rule) for d in part]
                out[method] += list(zip(self.errors(codes, part, bsize), codes))
        return out

    def codes(self, method, choice, bsize, rule):  # pragma: no cover - evaluate keeps every lane's codes
        raise AssertionError("PassForm keeps the codes of every lane")
