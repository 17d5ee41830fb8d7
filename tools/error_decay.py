"""The paper's single-layer experiment: relative error of GPFQ vs MSQ (round to nearest) as the
fan-in N0 grows.

    python tools/error_decay.py --json [--plot decay.png] [--trials 20] [--n0-max 4096]

X ~ N(0, 1) of shape (m = 64, N0), Xt = X (first layer), w ~ U[-1, 1] (--neurons columns),
N0 = 64, 128, ..., n0-max. Two alphabets with a fixed step (not the C rule): K = 4 with
delta = 0.25 (levels -1..1 in steps of 0.25) and K = 1 with delta = 1 (ternary). The relative
square error ||Xw - Xq||^2 / ||Xw||^2 is averaged over trials and neurons; the slope of
log(mean error) against log(N0) is fitted for each method. GPFQ's error falls roughly like 1/N0
(slope about -1), MSQ's stays flat (slope about 0). m < N0 for most points, so the residual form
is used (exact, no N0 x N0 matrices).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from onnx_gpfq.core import Alphabet, gpfq_residual, rtn_codes  # noqa: E402

ALPHABETS = {"K4": (Alphabet(-4, 4), 0.25), "ternary": (Alphabet(-1, 1), 1.0)}


def rel_error(X: np.ndarray, w: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per column ||X w - X q||^2 / ||X w||^2."""
    y = X @ w
    return ((y - X @ q) ** 2).sum(axis=0) / (y**2).sum(axis=0)


def slope(n0s, errs) -> float:
    """Least-squares slope of log(err) vs log(N0)."""
    return float(np.polyfit(np.log(np.asarray(n0s, float)), np.log(np.asarray(errs, float)), 1)[0])


def run(trials: int = 20, n0_max: int = 4096, m: int = 64, neurons: int = 4, seed: int = 0) -> dict:
    """Returns mean relative errors per N0 and fitted slopes for both alphabets and both methods."""
    rng = np.random.default_rng(seed)
    n0s = [64 * 2**i for i in range(int(np.log2(n0_max // 64)) + 1)]
    errs = {(a, meth): [] for a in ALPHABETS for meth in ("gpfq", "msq")}
    for n0 in n0s:
        acc = {key: [] for key in errs}
        for _ in range(trials):
            X = rng.standard_normal((m, n0))
            W = rng.uniform(-1.0, 1.0, (n0, neurons))
            for name, (alphabet, delta) in ALPHABETS.items():
                q_gpfq = gpfq_residual(W, X, X, delta, alphabet) * delta
                q_msq = rtn_codes(W, delta, alphabet) * delta
                acc[(name, "gpfq")].append(rel_error(X, W, q_gpfq))
                acc[(name, "msq")].append(rel_error(X, W, q_msq))
        for key, v in acc.items():
            errs[key].append(float(np.mean(v)))
    out = {
        "gpfq_slope": slope(n0s, errs[("K4", "gpfq")]),
        "msq_slope": slope(n0s, errs[("K4", "msq")]),
        "gpfq_slope_ternary": slope(n0s, errs[("ternary", "gpfq")]),
        "msq_slope_ternary": slope(n0s, errs[("ternary", "msq")]),
        "n0": n0s,
        "gpfq_error": errs[("K4", "gpfq")],
        "msq_error": errs[("K4", "msq")],
        "gpfq_error_ternary": errs[("ternary", "gpfq")],
        "msq_error_ternary": errs[("ternary", "msq")],
        "m": m,
        "trials": trials,
        "neurons": neurons,
    }
    return out


def plot(res: dict, path: str) -> None:
    import matplotlib  # only with --plot: not a runtime dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    panels = ((axes[0], "", "K = 4, delta = 0.25"), (axes[1], "_ternary", "K = 1 (ternary), delta = 1"))
    for ax, suffix, title in panels:
        for meth, style in (("gpfq", "o-"), ("msq", "s--")):
            ax.loglog(res["n0"], res[f"{meth}_error{suffix}"], style, base=2,
                      label=f"{meth.upper()} (slope {res[f'{meth}_slope{suffix}']:.2f})")
        ax.set_xlabel("N0 (fan-in)")
        ax.set_ylabel("mean ||Xw - Xq||^2 / ||Xw||^2")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"single layer, X ~ N(0,1) of shape ({res['m']}, N0), w ~ U[-1,1], {res['trials']} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ap.add_argument("--plot", metavar="PNG", help="write log-log curves (needs matplotlib)")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--n0-max", type=int, default=4096)
    ap.add_argument("--neurons", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.n0_max < 128 or args.trials < 1:
        ap.error("need --n0-max >= 128 and --trials >= 1")
    res = run(args.trials, args.n0_max, neurons=args.neurons, seed=args.seed)
    if args.plot:
        plot(res, args.plot)
    if args.json:
        print(json.dumps(res))
    else:
        for key in ("gpfq_slope", "msq_slope", "gpfq_slope_ternary", "msq_slope_ternary"):
            print(f"{key}: {res[key]:.3f}")


if __name__ == "__main__":
    main()
