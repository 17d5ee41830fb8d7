"""Deployed latency of several ONNX models on the same inputs, measured interleaved so that a loaded
machine slows them alike: one sample per run, one intra-op thread (as tools/real_models.py measures),
default session options otherwise. Prints JSON.

    python tools/latency.py --data calib.npz A.onnx B.onnx [C.onnx ...] [--rounds 7] [--samples 16]

Each round runs every model over the same samples (the order of the models rotating from round to
round); a model's figure is the median over rounds of its mean ms per sample, with the minimum
beside it. ``ratio_to_first``: each model's median over the first model's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _real_models.report import cpu_flags  # noqa: E402


def session(path: str):
    import onnxruntime as ort  # noqa: PLC0415

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def measure(paths: list[str], arrays: dict[str, np.ndarray], rounds: int, samples: int) -> dict:
    """path -> {median_ms, min_ms, rounds_ms} (ms per sample)."""
    n = min(samples, min(len(v) for v in arrays.values()))
    feeds = [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(n)]
    sessions = [session(p) for p in paths]
    for s in sessions:
        s.run(None, feeds[0])  # warm-up, untimed
    per = [[] for _ in paths]
    for r in range(rounds):
        order = [(r + j) % len(paths) for j in range(len(paths))]
        for j in order:
            t0 = time.perf_counter()
            for feed in feeds:
                sessions[j].run(None, feed)
            per[j].append(1000 * (time.perf_counter() - t0) / n)
    first = float(np.median(per[0]))
    return {p: {"median_ms": float(np.median(t)), "min_ms": float(min(t)), "ratio_to_first": float(np.median(t)) / first,
                "rounds_ms": [round(x, 3) for x in t]} for p, t in zip(paths, per)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--data", required=True, help=".npz of model inputs, samples stacked on axis 0")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--samples", type=int, default=16)
    args = ap.parse_args(argv)
    for p in args.models + [args.data]:
        if not os.path.isfile(p):
            print(f"latency: no such file: {p}", file=sys.stderr)
            return 2
    if args.rounds < 1 or args.samples < 1:
        print("latency: --rounds and --samples must be positive", file=sys.stderr)
        return 2
    with np.load(args.data, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    import onnxruntime  # noqa: PLC0415

    try:
        models = measure(args.models, arrays, args.rounds, args.samples)
    except Exception as exc:  # noqa: BLE001  (onnxruntime refusing a model or the data: one line)
        print(f"latency: onnxruntime cannot run it: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
        return 2
    out = {"cpu": cpu_flags(), "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "rounds": args.rounds,
           "samples": min(args.samples, min(len(v) for v in arrays.values())), "models": models}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
