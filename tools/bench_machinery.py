"""A/B of the package's private-API machinery, in fresh processes, the two arms alternated run by run.

    python tools/bench_machinery.py --repeats 5 cold_mlp cnn
    python tools/bench_machinery.py --repeats 3 resnet50

- cold_mlp: the numba cache loader (onnx_gpfq/core/_numba_cache.py) on, vs off with
  ONNX_GPFQ_NUMBA_FULL_LOAD=1 (numba's own load, with its full context refresh); digits_mlp W4.
- cnn, resnet50: OpenBLAS workers sleeping during quantize (_threads.blas_workers_sleep) on, vs off
  with OPENBLAS_THREAD_TIMEOUT=28 (OpenBLAS's own default, which the context then leaves alone);
  digits_cnn with defaults, the onnx light ResNet-50 (tests/light_models.py, one seeded sample) with
  max_patches=64 and the fixed step rule.

Every arm runs once untimed first (numba cache and page cache warm). Per run: the seconds of the
first quantize call in the process (and of ``import onnx_gpfq``) and the output's hash. Prints one
JSON line per case: median and min per arm, and the set of hashes (must be one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CHILD = """
import hashlib, json, sys, time
t0 = time.perf_counter()
import onnx_gpfq
t1 = time.perf_counter()
q, _ = onnx_gpfq.quantize(sys.argv[1], sys.argv[2], quiet=True, **json.loads(sys.argv[3]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "quantize_s": t2 - t1,
                  "sha": hashlib.sha256(q.SerializeToString()).hexdigest()[:12]}))
"""
CACHE_ARMS = {"on": {"ONNX_GPFQ_NUMBA_FULL_LOAD": "0"}, "off": {"ONNX_GPFQ_NUMBA_FULL_LOAD": "1"}}
BLAS_ARMS = {"on": {}, "off": {"OPENBLAS_THREAD_TIMEOUT": "28"}}
CLEARED = ("OPENBLAS_THREAD_TIMEOUT", "ONNX_GPFQ_NUMBA_FULL_LOAD")


def cases(tmp: str) -> dict:
    models = os.path.join(ROOT, "models")
    calib = os.path.join(models, "digits_calib.npz")
    return {
        "cold_mlp": (lambda: (os.path.join(models, "digits_mlp.onnx"), calib), {"weight_bits": 4}, CACHE_ARMS),
        "cnn": (lambda: (os.path.join(models, "digits_cnn.onnx"), calib), {}, BLAS_ARMS),
        "resnet50": (lambda: light_resnet50(tmp), {"max_patches": 64, "scale_rule": "fixed"}, BLAS_ARMS),
    }


def light_resnet50(tmp: str) -> tuple[str, str]:
    import numpy as np
    import onnx

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import light_models

    model = light_models.prepared("resnet50")
    path, calib = os.path.join(tmp, "resnet50.onnx"), os.path.join(tmp, "resnet50_calib.npz")
    onnx.save(model, path)
    np.savez(calib, **light_models.random_inputs(model, 1, seed=1))
    return path, calib


def run(model: str, calib: str, options: dict, env_extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", CHILD, model, calib, json.dumps(options)], env=env,
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", default=["cold_mlp", "cnn", "resnet50"])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per arm")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_machinery_") as tmp:
        table = cases(tmp)
        for name in args.cases:
            make, options, arms = table[name]
            model, calib = make()
            for extra in arms.values():  # untimed: warm caches
                run(model, calib, options, extra)
            got = {arm: [] for arm in arms}
            for _ in range(args.repeats):
                for arm, extra in arms.items():
                    got[arm].append(run(model, calib, options, extra))
            summary = {arm: {key: {"median": round(statistics.median(r[key] for r in runs), 3),
                                   "min": round(min(r[key] for r in runs), 3)} for key in ("import_s", "quantize_s")}
                       for arm, runs in got.items()}
            summary["hashes"] = sorted({r["sha"] for runs in got.values() for r in runs})
            print(json.dumps({"case": name, **summary}), flush=True)


if __name__ == "__main__":
    main()
