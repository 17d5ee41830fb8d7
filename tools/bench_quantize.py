"""Quantization cost of onnx-gpfq against onnxruntime's own static quantizer, same model, same data.

    python tools/bench_quantize.py models/digits_cnn.onnx --calib models/digits_calib.npz --json
    python tools/bench_quantize.py light:resnet50 --calib random:32 --json
    python tools/bench_quantize.py light:resnet50 --calib random:32 --samples-multiplier 8 --json

Runs, each in its own fresh child process (so that neither's memory or warm caches leak into the
other's figures):

- gpfq: ``onnx_gpfq.quantize(model, calib, weight_bits=4, act_bits=8, quiet=True)`` (W4A8);
- ort:  ``onnxruntime.quantization.quantize_static`` (QDQ, per_channel=True, MinMax, activations
  QUInt8, weights QInt8) with a CalibrationDataReader over the same batches (the model's fixed
  batch size if it has one, else 32, onnx-gpfq's default). ORT first gets what it needs: opset
  raised to 13 with onnx.version_converter when lower (per-channel QDQ needs it), then
  ``quant_pre_process`` (symbolic shape inference + optimisation); the JSON's ``ort_preprocessing``
  says what it got.

Seconds are wall clock (time.perf_counter) around the quantize call alone: interpreter start and
imports (each child imports what its quantizer loads, onnxruntime included) are not counted.
The headline, ``ratio_incl_ort_preprocessing``, is like for like: onnx-gpfq's time includes its own
model normalisation (opset upgrade, optimisation, shape inference), so ORT's side counts the
``quant_pre_process`` its documented flow requires before ``quantize_static``: gpfq seconds /
(ORT quantize + ORT preprocessing seconds); ``ort_preprocess_seconds`` reports the latter. The old
``ratio`` (gpfq / ORT's quantize call alone) is reported beside it.
By default each call is the first in its process (numba's kernel cache load, or compilation when the
cache is stale, lands on gpfq; onnxruntime's first-call costs on ORT); --warmup first runs each
quantizer once, untimed, on the first calibration batch (its peak RSS then includes that run).
Peak RSS is each child's VmHWM at the end (imports and the calibration data included);
``*_rss_before_mb`` is its resident size just before the quantize call. VmHWM also counts pages
of mapped files (shared libraries; onnx-gpfq maps a spill file only while writing it), so
``*_peak_anon_mb`` adds the peak of RssAnon alone, sampled every 50 ms during the call.

MODEL: a path, or ``light:NAME`` (tests/light_models.prepared(NAME), seeded random weights).
--calib: a .npz (one array per model input) or ``random:N`` (N seeded samples, random_inputs).
--samples-multiplier K: use K times the samples (random: K*N samples; .npz: the file tiled K
times); gpfq is then also run at 1x, and the JSON adds ``gpfq_peak_rss_mb_1x`` and
``gpfq_rss_growth`` (peak at Kx / peak at 1x; the target is <= 1.1 at 4x, e.g. 64 -> 256 samples).
--cold: each child gets an empty numba cache (NUMBA_CACHE_DIR in a fresh folder): every kernel the
run needs is compiled inside the timed call, as on the first run after a fresh install.
--repeat N: the gpfq and ORT children run N times, each pair back to back (a shared machine's slow
spells then slow both of a pair); the JSON reports the pair with the median headline ratio, plus
``ratios_incl_ort_preprocessing``, ``ratios`` and every run's seconds.
MODEL ``real:NAME`` is a model of the real-model suite (from its cache, fetched by tools/real_models.py),
and --calib ``real:NAME:N`` N of its calibration samples (tools/_real_models/specs.make_data, seed 0;
with K, K*N distinct samples).
Targets: ratio_incl_ort_preprocessing <= 3 at 1x (``ratio_target_met``); gpfq_rss_growth <= 1.1 at 4x.
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

RATIO_TARGET = 3.0
RSS_GROWTH_TARGET = 1.1


# ---------------------------------------------------------------- children

def _first_batch(calib_path: str, batch: int) -> dict:
    with np.load(calib_path, allow_pickle=False) as data:
        return {k: data[k][:batch] for k in data.files}


def _parse_options(items: list[str]) -> dict:
    """KEY=VALUE strings -> keyword options for onnx_gpfq.quantize (ints, floats, none/true/false parsed)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--gpfq-option needs KEY=VALUE (got {item!r})")
        low = value.lower()
        if low in ("none", "true", "false"):
            out[key] = {"none": None, "true": True, "false": False}[low]
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def _trace_layers() -> list[dict]:
    """Wrap onnx_gpfq.core.quantize_layer (in this child only) to record, per layer, the weight shape,
    the moments' form and rows, resident memory before the call and the high-water mark after it."""
    from onnx_gpfq import core

    trace: list[dict] = []
    original = core.quantize_layer

    def traced(W, moments, spec):
        entry = {"w": list(getattr(W, "shape", ())), "form": getattr(moments, "form", None),
                 "rows": int(getattr(moments, "m", 0)), "rss_before_mb": round(common.current_rss_mb(), 1),
                 "anon_before_mb": round(common.rss_parts_mb().get("RssAnon", float("nan")), 1),
                 "hwm_before_mb": round(common.peak_rss_mb(), 1)}
        t0 = time.perf_counter()
        try:
            return original(W, moments, spec)
        finally:
            entry["seconds"] = round(time.perf_counter() - t0, 3)
            entry["hwm_after_mb"] = round(common.peak_rss_mb(), 1)
            trace.append(entry)

    core.quantize_layer = traced
    return trace


def _child_gpfq(model_path: str, calib_path: str, warmup: bool, extra: dict | None = None,
                trace_memory: bool = False) -> dict:
    import onnxruntime  # noqa: F401  (onnx-gpfq imports it on first use; imports are not timed, as for ORT)
    import threadpoolctl  # noqa: F401  (the same)

    import onnx_gpfq

    extra = extra or {}

    with np.load(calib_path, allow_pickle=False) as data:
        n = min(data[k].shape[0] for k in data.files)
    warm = None
    if warmup:  # untimed: numba kernels loaded / compiled on one batch of the same model
        t0 = time.perf_counter()
        onnx_gpfq.quantize(model_path, _first_batch(calib_path, common.fixed_batch(model_path) or 32),
                           **({"weight_bits": 4, "act_bits": 8, "quiet": True} | extra))
        warm = time.perf_counter() - t0
    before = common.current_rss_mb()
    trace = _trace_layers() if trace_memory else None
    with common.RssSampler() as sampler:
        t0 = time.perf_counter()
        model, report = onnx_gpfq.quantize(model_path, calib_path,
                                           **({"weight_bits": 4, "act_bits": 8, "quiet": True} | extra))
        seconds = time.perf_counter() - t0
    peak = common.peak_rss_mb()
    hwm_end = common.peak_rss_mb()
    layer_seconds = sum(layer.seconds for layer in report.layers)
    memory = None
    if trace is not None:
        # where the high-water mark rose: before the first layer (loading, normalising, first capture),
        # inside a layer's GPFQ call, or between calls (capture of the next layer's inputs, rewrite)
        rises, last = [], before
        for i, e in enumerate(trace):
            rises.append({"where": f"before layer {i} (capture, rewrite)", "mb": e["hwm_before_mb"] - last})
            rises.append({"where": f"in layer {i} {e['w']} {e['form']} rows={e['rows']}", "mb": e["hwm_after_mb"] - e["hwm_before_mb"]})
            last = e["hwm_after_mb"]
        rises.append({"where": "after the last layer (final calibration, rewrite, validation)", "mb": hwm_end - last})
        memory = {"layers": trace, "largest_rises": sorted((r for r in rises if r["mb"] > 0), key=lambda r: -r["mb"])[:6]}
    slowest = sorted(report.layers, key=lambda layer: -layer.seconds)[:5]
    return {"seconds": seconds, "peak_rss_mb": peak, "rss_before_mb": before, "samples": n,
            "peak_anon_mb": sampler.peak_anon, "peak_anon_plus_file_mb": sampler.peak_total,
            "layers": len(report.layers), "left_in_float": len(report.skipped), "warmup_seconds": warm,
            "layer_seconds": layer_seconds, "memory_trace": memory,
            "spilled_bytes": getattr(report, "spilled_bytes", None),
            "peak_held_bytes": getattr(report, "peak_held_bytes", None),
            "slowest_layers": [{"node": layer.node, "op": layer.op_type, "weight_shape": list(layer.weight_shape),
                                "form": layer.form, "rows": layer.rows, "seconds": round(layer.seconds, 3)}
                               for layer in slowest]}


def _child_ort(model_path: str, calib_path: str, warmup: bool) -> dict:
    import onnxruntime  # noqa: F401  (imported before the RSS baseline, like onnx_gpfq in the other child)

    with np.load(calib_path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    batch = common.fixed_batch(model_path) or 32
    warm = None
    with tempfile.TemporaryDirectory(prefix="bq-ort-") as work:
        if warmup:  # untimed: one batch through the same path (preprocessing included)
            t0 = time.perf_counter()
            common.ort_quantize_static(model_path, os.path.join(work, "warm.onnx"), _first_batch(calib_path, batch),
                                       batch, "QInt8", work)
            warm = time.perf_counter() - t0
        before = common.current_rss_mb()
        with common.RssSampler() as sampler:
            info = common.ort_quantize_static(model_path, os.path.join(work, "ort.onnx"), arrays, batch, "QInt8", work)
        peak = common.peak_rss_mb()
    return {"seconds": info.pop("seconds"), "peak_rss_mb": peak, "rss_before_mb": before,
            "peak_anon_mb": sampler.peak_anon,
            "samples": common.sample_count(arrays), "batch_size": batch, "preprocessing": info,
            "warmup_seconds": warm}


def _run_child(kind: str, model_path: str, calib_path: str, workdir: str, warmup: bool = False,
               gpfq_options: list[str] | None = None, trace_memory: bool = False, cold: bool = False) -> dict:
    out = os.path.join(workdir, f"child-{kind}-{os.getpid()}-{time.monotonic_ns()}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--child-model", model_path,
           "--child-calib", calib_path, "--child-out", out] + (["--warmup"] if warmup else [])
    for item in gpfq_options or []:
        cmd += ["--gpfq-option", item]
    if trace_memory and kind == "gpfq":
        cmd.append("--trace-memory")
    env = dict(os.environ)
    if cold:  # an empty numba cache: compilation inside the timed call (ORT's child has no numba, no change)
        env["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba-cold-", dir=workdir)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0 or not os.path.exists(out):
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"error": f"{kind} child exited with {proc.returncode}: {tail}"}
    with open(out) as f:
        return json.load(f)


# ---------------------------------------------------------------- parent

def _ort_total(o: dict) -> float | None:
    """ORT's quantize seconds plus the preprocessing its flow requires (the headline's denominator)."""
    if o.get("seconds") is None:
        return None
    return o["seconds"] + ((o.get("preprocessing") or {}).get("preprocess_seconds") or 0.0)


def _median_pair(runs: list[tuple[dict, dict]]) -> tuple[dict, dict, list[float]]:
    """The (gpfq, ort) pair of the median headline ratio, gpfq / (ORT quantize + ORT preprocessing)
    (pairs run back to back, so a slow spell of a shared machine slows both of a pair), and every
    pair's headline ratio."""
    ratios = [g["seconds"] / _ort_total(o) if g.get("seconds") is not None and _ort_total(o) else float("inf")
              for g, o in runs]
    order = sorted(range(len(runs)), key=lambda i: ratios[i])
    return (*runs[order[(len(runs) - 1) // 2]], ratios)


def bench(model_spec: str, calib_spec: str, multiplier: int = 1, warmup: bool = False,
          gpfq_options: list[str] | None = None, trace_memory: bool = False, repeat: int = 1, cold: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as work:
        model_path = common.resolve_model(model_spec, work)
        arrays, calib_text = common.resolve_calibration(calib_spec, model_path, multiplier)
        calib_path = os.path.join(work, "calib.npz")
        np.savez(calib_path, **arrays)
        runs = [(_run_child("gpfq", model_path, calib_path, work, warmup, gpfq_options, trace_memory, cold),
                 _run_child("ort", model_path, calib_path, work, warmup)) for _ in range(repeat)]
        g, o, ratios = _median_pair(runs)
        result: dict = {"model": model_spec,
                        "ratio_incl_ort_preprocessing": None,  # the headline, first: filled in below
                        "ratio": None,  # the old figure (ORT's quantize call alone), beside it
                        "commit": common.package_commit(),
                        "calibration": calib_text, "samples": common.sample_count(arrays),
                        "samples_multiplier": multiplier, "warmup": warmup, "repeat": repeat, "cold": cold,
                        "gpfq_options": {"weight_bits": 4, "act_bits": 8} | _parse_options(gpfq_options)}
        result["gpfq_seconds"] = g.get("seconds")
        result["ort_seconds"] = o.get("seconds")
        ok = result["gpfq_seconds"] is not None and result["ort_seconds"]
        pre = (o.get("preprocessing") or {}).get("preprocess_seconds")
        # the headline (like for like): onnx-gpfq's time includes its own normalisation (opset upgrade,
        # optimisation, shape inference); onnxruntime's includes the preprocessing its flow requires
        result["ratio_incl_ort_preprocessing"] = (result["gpfq_seconds"] / (result["ort_seconds"] + pre)
                                                  if ok and pre is not None else None)
        result["ratio"] = result["gpfq_seconds"] / result["ort_seconds"] if ok else None  # ORT's quantize call alone
        if repeat > 1:  # every pair, in run order; the figures above are the median pair's
            result["ratios_incl_ort_preprocessing"] = [round(r, 3) for r in ratios]
            result["ratios"] = [round(g_["seconds"] / o_["seconds"], 3) if g_.get("seconds") is not None and o_.get("seconds")
                                else float("inf") for g_, o_ in runs]
            result["gpfq_seconds_runs"] = [r[0].get("seconds") for r in runs]
            result["ort_seconds_runs"] = [r[1].get("seconds") for r in runs]
        result["gpfq_peak_rss_mb"] = g.get("peak_rss_mb")
        result["ort_peak_rss_mb"] = o.get("peak_rss_mb")
        result["gpfq_peak_anon_mb"] = g.get("peak_anon_mb")  # sampled every 50 ms: anonymous memory only
        result["ort_peak_anon_mb"] = o.get("peak_anon_mb")
        result["gpfq_rss_before_mb"] = g.get("rss_before_mb")
        result["ort_rss_before_mb"] = o.get("rss_before_mb")
        result["ort_preprocessing"] = o.get("preprocessing")
        result["ort_preprocess_seconds"] = (o.get("preprocessing") or {}).get("preprocess_seconds")
        result["ort_batch_size"] = o.get("batch_size")
        commits = {r.get("commit") for r in (g, o)}
        result["child_commits"] = sorted(c for c in commits if c)  # more than one: the package changed mid-run
        result["gpfq_layers"] = g.get("layers")
        result["gpfq_layer_seconds"] = g.get("layer_seconds")  # per-layer work (capture + GPFQ), from the Report
        result["gpfq_slowest_layers"] = g.get("slowest_layers")
        result["gpfq_spilled_bytes"] = g.get("spilled_bytes")
        result["gpfq_peak_held_bytes"] = g.get("peak_held_bytes")  # captured activations held at once (<= budget)
        if trace_memory:
            result["gpfq_memory_trace"] = g.get("memory_trace")
        if warmup:
            result["gpfq_warmup_seconds"] = g.get("warmup_seconds")
            result["ort_warmup_seconds"] = o.get("warmup_seconds")
        if multiplier > 1:
            base_arrays, _ = common.resolve_calibration(calib_spec, model_path, 1)
            base_path = os.path.join(work, "calib_1x.npz")
            np.savez(base_path, **base_arrays)
            g1 = _run_child("gpfq", model_path, base_path, work, warmup, gpfq_options, trace_memory, cold)
            result["gpfq_seconds_1x"] = g1.get("seconds")
            result["gpfq_peak_rss_mb_1x"] = g1.get("peak_rss_mb")
            result["gpfq_commit_1x"] = g1.get("commit")
            if trace_memory:
                result["gpfq_memory_trace_1x"] = g1.get("memory_trace")
            if g1.get("commit") != g.get("commit"):
                result["warning"] = "the package changed between the Kx and 1x gpfq runs; compare with care"
            result["gpfq_peak_anon_mb_1x"] = g1.get("peak_anon_mb")
            if g1.get("peak_anon_mb") and g.get("peak_anon_mb"):
                result["gpfq_anon_growth"] = g["peak_anon_mb"] / g1["peak_anon_mb"]
            if g1.get("peak_rss_mb") and g.get("peak_rss_mb"):
                growth = g["peak_rss_mb"] / g1["peak_rss_mb"]
                result["gpfq_rss_growth"] = growth
                result["rss_growth_target_met"] = growth <= RSS_GROWTH_TARGET
            if "error" in g1:
                result["gpfq_1x_error"] = g1["error"]
        else:
            headline = result["ratio_incl_ort_preprocessing"]
            result["ratio_target_met"] = headline is not None and headline <= RATIO_TARGET
        for name, r in (("gpfq", g), ("ort", o)):
            if "error" in r:
                result[f"{name}_error"] = r["error"]
        return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", metavar="MODEL.onnx|light:NAME")
    ap.add_argument("--calib", metavar="DATA.npz|random:N")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--samples-multiplier", type=int, default=1, metavar="K",
                    help="use K times the samples; also runs gpfq at 1x and reports the peak-RSS growth")
    ap.add_argument("--warmup", action="store_true",
                    help="before the timed call, one untimed run of each quantizer on the first batch (same child)")
    ap.add_argument("--gpfq-option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra onnx_gpfq.quantize option for diagnosis, e.g. scale_rule=fixed (repeatable)")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run the pair of children N times (back to back) and report the pair of the median headline ratio")
    ap.add_argument("--cold", action="store_true",
                    help="an empty numba cache in each child: kernel compilation counted, as after a fresh install")
    ap.add_argument("--trace-memory", action="store_true",
                    help="record resident memory around every layer of the gpfq run (where the peak comes from)")
    ap.add_argument("--child", choices=["gpfq", "ort"], help=argparse.SUPPRESS)
    ap.add_argument("--child-model", help=argparse.SUPPRESS)
    ap.add_argument("--child-calib", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        started_at_commit = common.package_commit()
        if args.child == "gpfq":
            res = _child_gpfq(args.child_model, args.child_calib, args.warmup, _parse_options(args.gpfq_option),
                              args.trace_memory)
        else:
            res = _child_ort(args.child_model, args.child_calib, args.warmup)
        res["commit"] = started_at_commit
        with open(args.child_out, "w") as f:
            json.dump(res, f)
        return 0

    if not args.model or not args.calib:
        ap.error("MODEL and --calib are required")
    if args.samples_multiplier < 1:
        ap.error("--samples-multiplier must be >= 1")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    _parse_options(args.gpfq_option)  # fail early on a malformed KEY=VALUE
    res = bench(args.model, args.calib, args.samples_multiplier, args.warmup, args.gpfq_option, args.trace_memory,
                args.repeat, args.cold)
    res["command"] = "python tools/bench_quantize.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k}: {v}")
    return 1 if any(k.endswith("_error") for k in res) else 0


if __name__ == "__main__":
    sys.exit(main())
