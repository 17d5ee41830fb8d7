"""How much a task metric of the real-model suite moves under perturbations far smaller than 8-bit
quantization: the float model with its layer weights rounded to float16, and with seeded Gaussian
noise added to every layer weight at a given per-tensor SQNR. Scored exactly as tools/real_models.py
scores a quantized model (same samples, same decoding, against the float model's own predictions).

    python tools/metric_floor.py --models det,nudenet --json

What it answers: whether a target such as "within 0.3 F1 points of float" is within reach of any
quantizer, or below what the metric resolves on the suite's samples (a detector's box F1 against
the float model's own boxes moves in steps of one box, and boxes near the score threshold flip
under tiny perturbations).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as common  # noqa: E402
from _real_models import fetch, report, specs  # noqa: E402
from real_models import run_model, sqnr  # noqa: E402

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def layer_weights(model) -> list:
    """The float32 weight tensors (TensorProto, in initializers or Constant nodes) that the model's
    Conv / ConvTranspose / Gemm / MatMul nodes read directly."""
    import onnx  # noqa: PLC0415

    names = {i for n in model.graph.node if n.op_type in LAYER_OPS for i in n.input[:2] if i}
    found = [t for t in model.graph.initializer if t.name in names]
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in names:
            found += [a.t for a in node.attribute if a.name == "value"]
    return [t for t in found if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims, dtype=np.int64) > 1]


def perturbed(model, kind: str, sqnr_db: float | None, seed: int):
    """A copy of ``model`` with every layer weight rounded to float16 (kind "fp16") or plus Gaussian
    noise of power ||w||^2 / n / 10^(sqnr_db / 10) (kind "noise", per tensor, seeded)."""
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for tensor in layer_weights(out):
        w = numpy_helper.to_array(tensor)
        if kind == "fp16":
            new = w.astype(np.float16).astype(np.float32)
        else:
            sigma = np.sqrt(np.mean(w.astype(np.float64) ** 2) / 10 ** (sqnr_db / 10))
            new = (w + rng.normal(0.0, sigma, w.shape)).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(new, tensor.name))
    return out


def perturbations(levels: list[float], seeds: int) -> list[tuple[str, float | None, int]]:
    return [("fp16", None, 0)] + [("noise", level, s) for level in levels for s in range(seeds)]


def floor_of(spec: specs.Spec, args, work: str) -> dict:
    import onnx  # noqa: PLC0415

    n_cal = spec.calib_default
    n_eval = args.eval or spec.eval_default
    _, cal_meta = specs.make_data(spec, n_cal, 0, args.seed, args.cache)  # excluded from evaluation, as in the suite
    evals, meta = specs.make_data(spec, n_eval, 1, args.seed, args.cache, exclude=set(cal_meta.get("truth", [])))
    path = spec.path(args.cache)
    ref_outs, _ = run_model(path, evals)
    ref_preds = [specs.decode(spec, o, args.cache) for o in ref_outs]
    model = onnx.load(path)
    rows = []
    for kind, level, seed in perturbations(args.levels, args.noise_seeds):
        out_path = os.path.join(work, f"{spec.name}-perturbed.onnx")
        onnx.save(perturbed(model, kind, level, seed), out_path)
        outs, _ = run_model(out_path, evals)
        score = specs.score(spec, [specs.decode(spec, o, args.cache) for o in outs], ref_preds, meta)
        row = {"perturbation": "float16 weights" if kind == "fp16" else f"weight noise {level:g} dB",
               "noise_seed": None if kind == "fp16" else seed, "sqnr_db": sqnr(ref_outs, outs), **score}
        print(f"[{spec.name}] {row['perturbation']} (seed {seed}): {spec.metric}={row[spec.metric]:.4f} "
              f"sqnr={row['sqnr_db']:.2f}", file=sys.stderr, flush=True)
        rows.append(row)
    return {"name": spec.name, "metric": spec.metric, "evaluation_samples": n_eval, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="det,nudenet,layout", help=f"comma-separated, of {', '.join(specs.SPECS)}")
    ap.add_argument("--eval", type=int, help="evaluation samples (default: the suite's, per model)")
    ap.add_argument("--levels", default="50,40,30", help="weight-noise SQNRs in dB (default %(default)s)")
    ap.add_argument("--noise-seeds", type=int, default=2, help="noise draws per level (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="the data seed, as tools/real_models.py --seed")
    ap.add_argument("--cache", default=fetch.DEFAULT_CACHE)
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in specs.SPECS]
    try:
        args.levels = [float(v) for v in args.levels.split(",") if v.strip()]
    except ValueError:
        unknown.append(f"--levels {args.levels}")
    if unknown or not names or args.noise_seeds < 0 or (args.eval is not None and args.eval < 1):
        print(f"metric_floor.py: error: bad arguments ({', '.join(unknown) or 'counts must be positive'}); "
              f"models: {', '.join(specs.SPECS)}", file=sys.stderr)
        return 2
    command = "python tools/metric_floor.py " + " ".join(argv or sys.argv[1:])
    result = {"machine": common.machine() | report.cpu_flags(), "command": command, "models": {}}
    with tempfile.TemporaryDirectory(prefix="metric_floor_") as work:
        for name in names:
            try:
                result["models"][name] = floor_of(specs.SPECS[name], args, work)
            except (fetch.FetchError, RuntimeError) as exc:
                print(f"metric_floor.py: error: {name}: {exc}", file=sys.stderr)
                return 1
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
