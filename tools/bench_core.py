"""Time one GPFQ greedy pass (Gram form) against one float64 GEMM of the same size.

    python tools/bench_core.py --n0 2048 --n1 2048 --json
    python tools/bench_core.py --n0 9 --n1 1 --groups 512 --json     # depthwise 3x3
    python tools/bench_core.py --n0 25088 --n1 4096 --rows 1 --json  # residual form, VGG fc6, m = 1

Builds random correlated X, Xt with m = 2 N0 rows, G = Xt^T X, H = Xt^T Xt and W, warms up
(numba compile excluded), then times ONE pass of onnx_gpfq.core.gpfq_gram (fixed C = 1,
per-channel steps, including A = tril(G) W) and an (N0 x N0) @ (N0 x N1) float64 numpy product
(batched over groups when groups > 1); best of --repeats for both, timed alternately, same
threads for both (whatever numpy/numba pick; nothing is pinned).
Prints {"n0", "n1", "groups", "seconds", "gemm_seconds", "ratio"}.

With --rows M: the residual form instead (m = M calibration rows kept as X, Xt; no N0 x N0):
one pass of gpfq_residual (fixed C = 1; the fused kernel for M <= RESIDUAL_FUSED_MAX_M, else
blocked) against the product X @ W (M x N0 @ N0 x N1, one read of W like the pass). Adds
"rows" and "form" to the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from onnx_gpfq.core import (  # noqa: E402
    GRAM_BLOCK,
    RESIDUAL_FUSED_MAX_M,
    Alphabet,
    gpfq_gram,
    gpfq_residual,
    step_ranges,
    steps_from_ranges,
)


def make_problem(n0: int, n1: int, groups: int, seed: int = 0):
    """Random correlated inputs: X = Z M with a mixing M (neighbouring fan-in entries correlated),
    Xt = X + 10% noise; returns W (g, N0, N1), G, H (g, N0, N0)."""
    rng = np.random.default_rng(seed)
    m = 2 * n0
    G = np.empty((groups, n0, n0))
    H = np.empty((groups, n0, n0))
    for k in range(groups):
        Z = rng.standard_normal((m, n0))
        X = Z + 0.5 * np.roll(Z, 1, axis=1) + 0.25 * np.roll(Z, 2, axis=1)
        Xt = X + 0.1 * rng.standard_normal((m, n0))
        G[k] = Xt.T @ X
        H[k] = Xt.T @ Xt
    W = rng.standard_normal((groups, n0, n1)) / np.sqrt(n0)
    return W, G, H


def make_rows(n0: int, n1: int, groups: int, rows: int, seed: int = 0):
    """The same kind of inputs for the residual form: X, Xt (g, rows, N0) and W (g, N0, N1)."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((groups, rows, n0))
    X = Z + 0.5 * np.roll(Z, 1, axis=2) + 0.25 * np.roll(Z, 2, axis=2)
    Xt = X + 0.1 * rng.standard_normal(X.shape)
    W = rng.standard_normal((groups, n0, n1)) / np.sqrt(n0)
    return W, X, Xt


def best_of_interleaved(fns, repeats: int) -> list[float]:
    """Best wall time of each function, alternating them so that a change in machine load hits
    both alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def bench(n0: int, n1: int, groups: int = 1, repeats: int = 7, block: int = GRAM_BLOCK, rows: int = 0) -> dict:
    alphabet = Alphabet.from_bits(4)
    if rows:
        W, X, Xt = make_rows(n0, n1, groups, rows)
    else:
        W, G, H = make_problem(n0, n1, groups)
    r, _ = step_ranges(W, "channel")
    delta = steps_from_ranges(r, 1.0, alphabet.K)
    Wg = W[0] if groups == 1 else W
    dg = delta[0] if groups == 1 else delta
    if rows:
        Xg, Xtg = (X[0], Xt[0]) if groups == 1 else (X, Xt)

        def one_pass():
            gpfq_residual(Wg, Xg, Xtg, dg, alphabet)

        def gemm():
            np.matmul(Xg, Wg)
    else:
        Gg, Hg = (G[0], H[0]) if groups == 1 else (G, H)

        def one_pass():
            gpfq_gram(Wg, Gg, Hg, dg, alphabet, block=block)

        Gc = Gg.copy()

        def gemm():
            np.matmul(Gc, Wg)

    t0 = time.perf_counter()
    one_pass()  # warm-up: numba compile / cache load
    gemm()
    t0 = time.perf_counter() - t0
    one_pass()
    if t0 < 0.01:  # tiny problems: enough repeats for a stable minimum
        repeats = max(repeats, 200)
    t, tg = best_of_interleaved([one_pass, gemm], repeats)
    res = {"n0": n0, "n1": n1, "groups": groups, "seconds": t, "gemm_seconds": tg, "ratio": t / tg}
    if rows:
        res.update(rows=rows, form="residual fused" if rows <= RESIDUAL_FUSED_MAX_M else "residual blocked")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n0", type=int, required=True, help="fan-in per group")
    ap.add_argument("--n1", type=int, required=True, help="output columns per group")
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs of each (at least 200 for tiny problems)")
    ap.add_argument("--block", type=int, default=GRAM_BLOCK, help="rows per block of the forward substitution")
    ap.add_argument("--rows", type=int, default=0,
                    help="time the residual form with this many calibration rows instead (vs X @ W)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    res = bench(args.n0, args.n1, args.groups, args.repeats, args.block, args.rows)
    if args.json:
        print(json.dumps(res))
    else:
        what = f" rows={res['rows']} ({res['form']})" if args.rows else ""
        print(f"N0={res['n0']} N1={res['n1']} groups={res['groups']}{what}: pass {res['seconds']:.4f} s, "
              f"gemm {res['gemm_seconds']:.4f} s, ratio {res['ratio']:.2f}")


if __name__ == "__main__":
    main()
