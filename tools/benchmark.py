"""Accuracy / size / speed benchmark of onnx-gpfq (GPFQ and RTN) against onnxruntime's static quantizer.

    python tools/benchmark.py --out BENCHMARKS.md --plot docs/accuracy_vs_bits.png      # full run
    python tools/benchmark.py --quick --json --out /tmp/B.md                               # minutes

For each model (models/digits_{mlp,cnn,vit}.onnx by default) it evaluates the float model and,
for weight bits 8, 4, 3, 2 and ternary, with 8-bit activations (W+A8) and weight-only (W-only):

- onnx-gpfq ``method="gpfq"`` and ``method="rtn"`` (the package's round-to-nearest baseline, same
  scale search, same graph);
- onnxruntime ``quantize_static`` (QDQ, per_channel=True, MinMax, activations QUInt8) with weights
  QInt8 at 8 bits and QInt4 at 4 bits (the model's opset raised to 21 with onnx.version_converter
  first, as int4 QDQ needs); ORT has no 3-bit, 2-bit or ternary weight type, and its static
  quantizer has no weight-only mode with float activations (quantize_dynamic quantizes activations at
  run time, MatMulNBits covers MatMul only, block-wise): those rows are recorded as n/a.

Everything is calibrated on models/digits_calib.npz and evaluated with ``onnx_gpfq.evaluate`` on
models/digits_test.npz, all variants of one model in one call so that latency is measured side by
side (interleaved batch by batch) against the float model. Quantization times are wall clock of the
quantize call after one untimed warm-up of each quantizer (numba / onnxruntime first-call costs).

Full runs add, at 4 bits, GPFQ with ``weight_format="int4"`` (packed INT4, opset 21: the same codes,
the size comparable with ORT's QInt4).

--quick: one model (digits_mlp unless --models), bits {4, ternary}, W+A8 only, 1 latency repeat, no
int4-format rows, no error-decay run; it needs no matplotlib unless --plot is given. --json prints one JSON object.
The full run also runs tools/error_decay.py (when present) for the paper's single-layer result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as common  # noqa: E402

REPO = common.REPO
MODELS = ["digits_mlp", "digits_cnn", "digits_vit"]
BITS = ["8", "4", "3", "2", "ternary"]
QUICK_BITS = ["4", "ternary"]
ACT_MODES = {"W+A8": 8, "W-only": None}
METHODS = ["gpfq", "rtn", "ort"]
INT4_FORMAT_BITS = ("4",)  # bit widths that also get a GPFQ row with weight_format="int4" (full runs)
ORT_WEIGHT_TYPE = {"8": "QInt8", "4": "QInt4"}


def _bits_value(bits: str):
    return bits if bits == "ternary" else int(bits)


# ---------------------------------------------------------------- quantizing

def _quantize_gpfq(model_path: str, calib: str, bits: str, act_bits, method: str, out: str) -> tuple[float, dict]:
    import onnx_gpfq

    extra = {}
    if method == "gpfq-int4":  # same GPFQ codes, stored as packed INT4 (opset 21), like ORT's QInt4
        method, extra = "gpfq", {"weight_format": "int4"}
    t0 = time.perf_counter()
    model, report = onnx_gpfq.quantize(model_path, calib, weight_bits=_bits_value(bits), act_bits=act_bits,
                                       method=method, quiet=True, **extra)
    seconds = time.perf_counter() - t0
    onnx_gpfq.save_model(model, out)
    return seconds, {"layers": len(report.layers), "left_in_float": len(report.skipped),
                     "activation_tensors": report.activations}


def _quantize_ort(model_path: str, arrays, bits: str, out: str, work: str) -> tuple[float, dict]:
    info = common.ort_quantize_static(model_path, out, arrays, 32, ORT_WEIGHT_TYPE[bits], work)
    return info.pop("seconds"), info


def _warm_up(model_path: str, calib: str, arrays, work: str, with_ort: bool) -> None:
    """One untimed run of each quantizer, so numba's kernel loading/compilation and onnxruntime's
    first-call costs do not land on whichever configuration happens to be timed first."""
    out = os.path.join(work, "warmup.onnx")
    _quantize_gpfq(model_path, calib, "4", 8, "gpfq", out)
    _quantize_gpfq(model_path, calib, "4", 8, "rtn", out)
    if with_ort:
        _quantize_ort(model_path, arrays, "8", out, work)


def bench_model(name: str, bits_list: list[str], act_modes: list[str], repeats: int, calib: str, test: str,
                work: str, log, int4_format: bool = True) -> list[dict]:
    import numpy as np
    import onnx_gpfq

    model_path = os.path.join(REPO, "models", f"{name}.onnx")
    with np.load(calib, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "labels"}
    _warm_up(model_path, calib, arrays, work, with_ort="W+A8" in act_modes)

    rows: list[dict] = [{"model": name, "method": "float", "bits": "32", "act": "float", "path": model_path,
                         "quant_seconds": None, "note": ""}]
    for act in act_modes:
        act_bits = ACT_MODES[act]
        for bits in bits_list:
            methods = METHODS + (["gpfq-int4"] if int4_format and bits in INT4_FORMAT_BITS else [])
            for method in methods:
                row = {"model": name, "method": method, "bits": bits, "act": act, "path": None,
                       "quant_seconds": None, "note": ""}
                rows.append(row)
                out = os.path.join(work, f"{name}.{method}.w{bits}.{act.replace('+', '').replace('-', '')}.onnx")
                if method == "ort":
                    if act_bits is None:
                        row["note"] = "n/a: quantize_static has no weight-only mode"
                        continue
                    if bits not in ORT_WEIGHT_TYPE:
                        row["note"] = "n/a: no " + ("ternary" if bits == "ternary" else f"{bits}-bit") + " weight type in onnxruntime"
                        continue
                try:
                    if method == "ort":
                        seconds, info = _quantize_ort(model_path, arrays, bits, out, work)
                        row["note"] = (f"{ORT_WEIGHT_TYPE[bits]}, opset {info.get('opset_converted_to', info['original_opset'])}"
                                       + (", quant_pre_process" if info.get("quant_pre_process") is True else ""))
                    else:
                        seconds, info = _quantize_gpfq(model_path, calib, bits, act_bits, method, out)
                    row["quant_seconds"] = seconds
                    row["path"] = out
                except Exception as exc:  # noqa: BLE001  (a crash is a result: recorded, run goes on)
                    row["note"] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                log(f"  {name:11s} {method:5s} w{bits:8s} {act:6s} "
                    + (f"{row['quant_seconds']:.2f} s" if row["quant_seconds"] is not None else row["note"]))

    measured = [r for r in rows[1:] if r["path"]]
    log(f"  {name}: evaluating {len(measured)} models against float ({repeats} latency repeat(s))")
    metrics = onnx_gpfq.evaluate(model_path, [r["path"] for r in measured], test, batch_size=64, repeats=repeats)
    for row, m in zip([rows[0]] + measured, metrics):
        row.update(accuracy=m.accuracy, agreement=m.agreement, sqnr_db=m.sqnr_db, size_bytes=m.size_bytes,
                   latency_ms=m.latency_ms, speedup=m.speedup)
    for row in rows:
        row.pop("path", None)
        for key in ("accuracy", "agreement", "sqnr_db", "size_bytes", "latency_ms", "speedup"):
            row.setdefault(key, None)
    return rows


# ---------------------------------------------------------------- summary

def _find(rows, model, method, bits, act):
    return next((r for r in rows if r["model"] == model and r["method"] == method and r["bits"] == bits
                 and r["act"] == act), None)


def summary(rows: list[dict]) -> list[dict]:
    """GPFQ against onnxruntime (and RTN) at <= 4 weight bits, per model and activation mode."""
    out = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        fl = _find(rows, model, "float", "32", "float")
        for act in ACT_MODES:
            for bits in ("4", "3", "2", "ternary"):
                g = _find(rows, model, "gpfq", bits, act)
                if g is None or g["accuracy"] is None:
                    continue
                o = _find(rows, model, "ort", bits, act)
                r = _find(rows, model, "rtn", bits, act)
                ort_acc = o["accuracy"] if o else None
                item = {
                    "model": model, "bits": bits, "act": act, "float_accuracy": fl["accuracy"] if fl else None,
                    "gpfq_accuracy": g["accuracy"], "gpfq_sqnr_db": g["sqnr_db"],
                    "ort_accuracy": ort_acc, "ort_sqnr_db": o["sqnr_db"] if o else None,
                    "rtn_accuracy": r["accuracy"] if r else None, "rtn_sqnr_db": r["sqnr_db"] if r else None,
                }
                item["margin_vs_ort_points"] = (100 * (g["accuracy"] - ort_acc)) if ort_acc is not None else None
                item["sqnr_margin_vs_ort_db"] = (g["sqnr_db"] - o["sqnr_db"]) if o and o["sqnr_db"] is not None else None
                item["margin_vs_rtn_points"] = (100 * (g["accuracy"] - r["accuracy"])) if r and r["accuracy"] is not None else None
                item["sqnr_margin_vs_rtn_db"] = (g["sqnr_db"] - r["sqnr_db"]) if r and r["sqnr_db"] is not None else None
                out.append(item)
    return out


# ---------------------------------------------------------------- error decay

def run_error_decay(plot: str | None, log) -> dict | None:
    tool = os.path.join(REPO, "tools", "error_decay.py")
    if not os.path.exists(tool):
        log("  tools/error_decay.py not present: skipped")
        return {"skipped": "tools/error_decay.py not present"}
    cmd = [sys.executable, tool, "--json"] + (["--plot", plot] if plot else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"failed": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] }"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    try:
        res = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"failed": "no JSON on stdout"}
    res["seconds"] = seconds
    res["command"] = "python tools/error_decay.py --json" + (f" --plot {plot}" if plot else "")
    return res


# ---------------------------------------------------------------- quantization cost (tools/bench_quantize.py)

def run_bench_quantize(args: list[str], log) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "tools", "bench_quantize.py"), *args, "--json"]
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"command": "python tools/bench_quantize.py " + " ".join(args + ["--json"]),
                "failed": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    res = json.loads(lines[-1])
    log(f"  {res.get('model')}: gpfq {res.get('gpfq_seconds')} s, ort {res.get('ort_seconds')} s")
    return res


def load_cost_results(paths: list[str]) -> list[dict]:
    """bench_quantize --json outputs saved earlier (one JSON object per line)."""
    out = []
    for path in paths:
        with open(path) as f:
            out += [json.loads(ln) for ln in f if ln.strip().startswith("{")]
    return out


def _commit(c: dict) -> str:
    """' (commit X)' for a saved run that names the package commit it measured (rows may come from several)."""
    return f" (commit {c['commit']})" if c.get("commit") else ""


def _cost_lines(costs: list[dict]) -> list[str]:
    """The section: one row per 1x run; a --samples-multiplier run of the same model adds its peak-RSS
    growth to that model's row (or gets a row of its own where there is no 1x run)."""
    lines = ["## Quantization cost: onnx-gpfq W4A8 vs onnxruntime quantize_static", "",
             "`tools/bench_quantize.py`: each quantizer in its own fresh child process, wall clock of the quantize "
             "call (first call in the process: numba's kernel cache load lands on onnx-gpfq; `--cold`: an empty "
             "cache, kernels compiled in the call), peak RSS = the child's VmHWM (imports included; calibration "
             "data from an uncompressed .npz stays in its file for onnx-gpfq), anon = peak RssAnon sampled every "
             "50 ms. ORT: QDQ, per-channel, MinMax, QUInt8/QInt8, on the model after its `quant_pre_process`, "
             "which its documented flow requires: the headline ratio (onnx-gpfq seconds / (ORT quantize + ORT "
             "preprocessing seconds)) counts it, as onnx-gpfq's own time counts its model normalisation; the "
             "ratio to ORT's quantize call alone is beside it. `--repeat N`: N gpfq/ORT pairs back to back, the "
             "pair with the median headline ratio shown (timings on this machine swing by 20% and more from run "
             "to run). Targets: headline ratio <= 3; peak RSS at 4x the samples (64 -> 256) <= 1.1x the 1x peak. "
             "Each row names the onnx-gpfq commit it measured.",
             "", "| model | samples | onnx-gpfq (s) | ORT + preprocessing (s) | ratio incl. ORT preprocessing "
             "(target <= 3) | ratio to ORT's quantize call | gpfq peak RSS / anon (MiB) | ORT peak RSS / anon "
             "(MiB) | gpfq peak RSS 4x / 1x samples (target <= 1.1) | spilled (GB) | command |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    ones = {c["model"] for c in costs if "failed" not in c and c.get("samples_multiplier", 1) == 1}
    growth_of = {c["model"]: c for c in costs if "failed" not in c and c.get("samples_multiplier", 1) > 1}
    for c in costs:
        if "failed" in c:
            lines.append(f"| | | | | failed: {c['failed']} | | | | | | `{c.get('command', '')}` |")
            continue
        multiplied = c.get("samples_multiplier", 1) > 1
        if multiplied and c["model"] in ones:
            continue  # shown in its model's 1x row
        g = c if multiplied else None if c.get("cold") else growth_of.get(c["model"])
        growth_text = "-"
        if g is not None and g.get("gpfq_rss_growth"):
            growth = g["gpfq_rss_growth"]
            command = "" if g is c else f"; `{g.get('command', '')}`{_commit(g)}"
            growth_text = (f"{growth:.3f}{' (met)' if growth <= 1.1 else ' (**not met**)'} "
                           f"({g['gpfq_peak_rss_mb_1x']:.0f} -> {g['gpfq_peak_rss_mb']:.0f} MiB at "
                           f"{g['samples'] // g['samples_multiplier']} -> {g['samples']}{command})")
        head = c.get("ratio_incl_ort_preprocessing")
        runs = c.get("ratios_incl_ort_preprocessing")
        runs_text = f" (median of {len(runs)}: {', '.join(f'{r:.2f}' for r in runs)})" if runs else ""
        met = "" if head is None or multiplied else (" (met)" if head <= 3 else " (**not met**)")
        ort_total = (c.get("ort_seconds") or 0) + (c.get("ort_preprocess_seconds") or 0)
        cold = " (cold)" if c.get("cold") else ""
        lines.append(
            f"| {c['model']}{cold} | {c['samples']} | {_secs(c.get('gpfq_seconds'))} | {_secs(ort_total)} | "
            f"{_f(head, '.2f')}{met}{runs_text} | {_f(c.get('ratio'), '.2f')} | "
            f"{_f(c.get('gpfq_peak_rss_mb'), '.0f')} / {_f(c.get('gpfq_peak_anon_mb'), '.0f')} | "
            f"{_f(c.get('ort_peak_rss_mb'), '.0f')} / {_f(c.get('ort_peak_anon_mb'), '.0f')} | {growth_text} | "
            f"{(c.get('gpfq_spilled_bytes') or 0) / 1e9:.1f} | `{c.get('command', '')}`{_commit(c)} |")
    slow = [c for c in costs if c.get("gpfq_slowest_layers")]
    if slow:
        c = max(slow, key=lambda c: c.get("gpfq_seconds") or 0)
        lines += ["", f"Slowest onnx-gpfq layers for {c['model']} at {c['samples']} samples "
                  f"({c.get('gpfq_layers')} layers, {_f(c.get('gpfq_layer_seconds'), '.0f')} s in the per-layer loop of "
                  f"{_f(c.get('gpfq_seconds'), '.0f')} s): " + "; ".join(
                      f"{x['node']} ({x['op']} {'x'.join(map(str, x['weight_shape']))}, {x['form']}, {x['rows']} rows) "
                      f"{x['seconds']:.1f} s" for x in c["gpfq_slowest_layers"]) + "."]
    for c in costs:
        if c.get("warning"):
            lines += ["", f"Note on `{c.get('command', '')}`: {c['warning']} (package commits seen by its runs: "
                      f"{', '.join(c.get('child_commits') or [])}; 1x run: {c.get('gpfq_commit_1x')})."]
    for c in costs:
        trace = c.get("gpfq_memory_trace")
        if not trace:
            continue
        math_s = sum(e.get("seconds", 0) for e in trace["layers"])
        rises = "; ".join(f"{r['where']}: +{r['mb']:.0f} MiB" for r in trace["largest_rises"][:3])
        spilled = c.get("gpfq_spilled_bytes")
        lines += ["", f"Memory trace for {c['model']} at {c['samples']} samples (`--trace-memory`): the GPFQ math "
                  f"(`quantize_layer`) took {math_s:.0f} s of {_f(c.get('gpfq_seconds'), '.0f')} s, the rest is "
                  f"calibration capture, moment accumulation and graph rewriting"
                  + (f"; {spilled / 2**30:.1f} GiB of activations spilled to disk" if spilled else "")
                  + f". The high-water mark rose most {rises}."]
    return lines + [""]


# ---------------------------------------------------------------- plot

def plot_accuracy(rows: list[dict], path: str) -> None:
    import matplotlib  # only with --plot: the benchmark's own requirement, not the package's

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    bits_order = [b for b in BITS if any(r["bits"] == b for r in rows)]
    xs = {b: i for i, b in enumerate(bits_order)}
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.2), squeeze=False)
    styles = {("gpfq", "W+A8"): ("tab:blue", "o", "-"), ("gpfq", "W-only"): ("tab:blue", "o", ":"),
              ("rtn", "W+A8"): ("tab:orange", "s", "-"), ("rtn", "W-only"): ("tab:orange", "s", ":"),
              ("ort", "W+A8"): ("tab:green", "^", "-")}
    for col, model in enumerate(models):
        fl = _find(rows, model, "float", "32", "float")
        for row_i, (key, label) in enumerate((("accuracy", "test accuracy"), ("sqnr_db", "output SQNR (dB)"))):
            ax = axes[row_i][col]
            for (method, act), (color, marker, ls) in styles.items():
                pts = [(xs[r["bits"]], r[key]) for r in rows if r["model"] == model and r["method"] == method
                       and r["act"] == act and r[key] is not None and r["bits"] in xs and math.isfinite(r[key])]
                if pts:
                    ax.plot(*zip(*pts), color=color, marker=marker, linestyle=ls, label=f"{method.upper()} {act}")
            if key == "accuracy" and fl and fl["accuracy"] is not None:
                ax.axhline(fl["accuracy"], color="gray", linestyle="--", linewidth=1, label="float")
            ax.set_xticks(range(len(bits_order)))
            ax.set_xticklabels(["tern." if b == "ternary" else b for b in bits_order])
            ax.set_xlabel("weight bits")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
            if row_i == 0:
                ax.set_title(model)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("GPFQ vs RTN vs onnxruntime (digits test set)", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


# ---------------------------------------------------------------- markdown

def _f(value, fmt: str, none: str = "n/a") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, fmt)


def _secs(value) -> str:
    return _f(value, ".2f" if value is not None and value < 10 else ".1f")


def _method_name(method: str) -> str:
    return {"gpfq": "onnx-gpfq GPFQ", "gpfq-int4": "onnx-gpfq GPFQ, int4 format", "rtn": "onnx-gpfq RTN",
            "ort": "onnxruntime", "float": "float"}[method]


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `tools/benchmark.py` (do not edit by hand; rerun the command below).",
        "",
        f"- Date: {result['date']}",
        f"- Command: `{result['command']}` ({result['seconds']:.0f} s wall clock)",
        f"- CPU int8 path: {m.get('int8_path_text', 'not recorded')}\n"
        f"- Machine: {m['cpu']}, {m['cores']} cores available, {m['memory_gib']} GiB RAM, {m['os']}; "
        f"load average at start {result.get('load_average', 'n/a')} (the machine was shared: timings are indicative)",
        f"- Versions: Python {m['python']}, onnxruntime {m['onnxruntime']}, onnx {m['onnx']}, numpy {m['numpy']}, "
        f"numba {m['numba']}, onnx-gpfq {m['onnx_gpfq']} (commit {m.get('commit')})",
        "- Data: calibration `models/digits_calib.npz` (256 samples), test `models/digits_test.npz` (500 samples, labels).",
        "",
        "## Method",
        "",
        "- **onnx-gpfq GPFQ / RTN**: `onnx_gpfq.quantize(model, calib, weight_bits=B, act_bits=8|None, method=...)`, "
        "defaults otherwise (per-channel, scale search). RTN is the package's round-to-nearest baseline on the same graph.",
        "- **onnxruntime**: `quantize_static` (QDQ, `per_channel=True`, `CalibrationMethod.MinMax`, activations "
        "`QUInt8`, weights `QInt8` at 8 bits, `QInt4` at 4 bits with the opset first raised to 21 by "
        "`onnx.version_converter`), on the output of `quant_pre_process`, default op types (it also quantizes "
        "e.g. Add/LayerNormalization inputs where it can). ORT has no 3-bit, 2-bit or ternary weight type, and no "
        "weight-only static mode (float activations): those rows are n/a. `quantize_dynamic` quantizes activations "
        "at run time and `MatMulNBits` covers MatMul only (block-wise), so neither is a clean weight-only equivalent.",
        "- **Metrics** (`onnx_gpfq.evaluate`, batch 64): accuracy = top-1 vs labels; agreement = top-1 equal to the "
        "float model's; SQNR = 10 log10(sum y^2 / sum (y - y_q)^2) over the logits; latency = median ms per batch of 64 "
        "(onnxruntime CPU, all optimisations), all models of one table measured interleaved; speedup = float "
        "latency / latency. Time = wall clock of the quantize call (after one untimed warm-up of each quantizer). "
        "Size = bytes of the .onnx file.",
        "- onnx-gpfq's default `weight_format=\"int8\"` stores weight codes in int8 containers at every bit width "
        "(so the file does not shrink below 8 bits, but onnxruntime runs int8 kernels); the "
        "\"GPFQ, int4 format\" rows are the same GPFQ codes with `weight_format=\"int4\"` (packed INT4, opset 21), "
        "comparable in size with onnxruntime's QInt4.",
        "- 2-bit weights: onnx-gpfq's symmetric 2-bit alphabet is {-1, 0, 1} x step, i.e. ternary, so the 2 and "
        "ternary rows coincide.",
        "- Latency: onnxruntime fuses QDQ with 8-bit activations and int8 weights into integer kernels; weight-only "
        "models and packed INT4 weights (onnx-gpfq's int4 format and ORT's QInt4 alike) keep DequantizeLinear on "
        "the weights at every inference on the CPU provider, which shows in their speedup column. The machine was "
        "shared with other jobs: single latency figures can be off; compare within a table.",
        "",
    ]

    summ = result["summary"]
    if summ:
        lines += ["## Summary: GPFQ vs onnxruntime at <= 4 bits", "",
                  "Accuracy in %, margins in accuracy points (GPFQ minus the other) and SQNR dB. "
                  "Where onnxruntime has no such configuration, the margin vs onnx-gpfq's RTN is the reference. "
                  "With 500 test samples one sample is 0.2 points: accuracy differences of a few tenths are at "
                  "the resolution of the test set; the output SQNR is the finer measure.", "",
                  "| model | weights | acts | float | GPFQ | ORT | RTN | GPFQ - ORT | GPFQ - RTN | SQNR GPFQ / ORT / RTN (dB) |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for s in summ:
            lines.append(
                f"| {s['model']} | {s['bits']} | {s['act']} | {_f(_pct(s['float_accuracy']), '.1f')} | "
                f"{_f(_pct(s['gpfq_accuracy']), '.1f')} | {_f(_pct(s['ort_accuracy']), '.1f')} | {_f(_pct(s['rtn_accuracy']), '.1f')} | "
                f"{_f(s['margin_vs_ort_points'], '+.1f')} | {_f(s['margin_vs_rtn_points'], '+.1f')} | "
                f"{_f(s['gpfq_sqnr_db'], '.1f')} / {_f(s['ort_sqnr_db'], '.1f')} / {_f(s['rtn_sqnr_db'], '.1f')} |")
        lines.append("")
        lines += _findings(summ)

    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["model"] == model]
        lines += [f"## {model}", "",
                  "| method | weights | acts | accuracy | SQNR (dB) | agreement | quant time (s) | size (bytes) | latency (ms/64) | speedup | note |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            lines.append(
                f"| {_method_name(r['method'])} | {'fp32' if r['method'] == 'float' else r['bits']} | {r['act']} | "
                f"{_f(_pct(r['accuracy']), '.1f')} | {_f(r['sqnr_db'], '.1f', '-' if r['method'] == 'float' else 'n/a')} | "
                f"{_f(_pct(r['agreement']), '.1f')} | {_f(r['quant_seconds'], '.2f', '-' if r['method'] == 'float' else 'n/a')} | "
                f"{_f(r['size_bytes'], 'd')} | {_f(r['latency_ms'], '.3f')} | {_f(r['speedup'], '.2f')} | {r['note']} |")
        lines.append("")

    if result.get("plot"):
        rel = os.path.relpath(os.path.abspath(result["plot"]), os.path.dirname(os.path.abspath(result["out"])))
        lines += [f"![accuracy and SQNR vs weight bits]({rel})", ""]

    if result.get("cost"):
        lines += _cost_lines(result["cost"])

    ed = result.get("error_decay")
    lines += ["## Single-layer error decay (the paper's experiment)", ""]
    if not ed:
        lines += ["Not run (`--quick`).", ""]
    elif "skipped" in ed or "failed" in ed:
        lines += [f"Not available: {ed.get('skipped') or ed.get('failed')}.", ""]
    else:
        lines += [f"`{ed['command']}` ({ed['seconds']:.0f} s): X ~ N(0,1) of shape ({ed['m']}, N0), w ~ U[-1,1], "
                  f"{ed['trials']} trials x {ed['neurons']} neurons, N0 = {ed['n0'][0]} .. {ed['n0'][-1]}. "
                  "Slope of log(mean relative error) against log(N0) (the paper predicts about -1 for GPFQ, about 0 "
                  "for MSQ = round to nearest):", "",
                  "| alphabet | GPFQ slope | MSQ slope |", "|---|---:|---:|",
                  f"| K = 4, step 0.25 | {ed['gpfq_slope']:.3f} | {ed['msq_slope']:.3f} |",
                  f"| ternary, step 1 | {ed['gpfq_slope_ternary']:.3f} | {ed['msq_slope_ternary']:.3f} |", ""]
        if ed.get("plot"):
            lines += [f"![error decay]({ed['plot']})", ""]
    return "\n".join(lines)


def _pct(x):
    return None if x is None else 100 * x


def _findings(summ: list[dict]) -> list[str]:
    """Where GPFQ is below onnxruntime or RTN, and whether the test set can tell."""
    out = []

    def describe(s, key, sqnr_key):
        text = f"{s['model']} W{s['bits']} {s['act']} ({s[key]:+.1f} points"
        sq = s.get(sqnr_key)
        if sq is not None and sq > 0 and s[key] >= -0.6:
            text += f", {round(-s[key] / 0.2):d} test sample(s), while GPFQ's SQNR is {sq:.1f} dB higher: within the resolution of the test set"
        elif sq is not None:
            text += f", SQNR {sq:+.1f} dB"
        return text + ")"

    for name, label, wherever in (("ort", "onnxruntime", "onnxruntime's wherever both exist"),
                                  ("rtn", "its own RTN baseline", "RTN's in every configuration")):
        key, sqnr_key = f"margin_vs_{name}_points", f"sqnr_margin_vs_{name}_db"
        below = [s for s in summ if s[key] is not None and s[key] < 0]
        below_sqnr = [s for s in summ if s[sqnr_key] is not None and s[sqnr_key] < 0]
        if below:
            out.append(f"GPFQ is **below {label}** in accuracy at: "
                       + "; ".join(describe(s, key, sqnr_key) for s in below) + ".")
        short = "onnxruntime" if name == "ort" else "RTN"
        if below_sqnr:
            out.append(f"GPFQ has a **lower output SQNR than {short}** at: " + ", ".join(
                f"{s['model']} W{s['bits']} {s['act']} ({s[sqnr_key]:+.1f} dB)" for s in below_sqnr) + ".")
        else:
            out.append(f"GPFQ's output SQNR is above {wherever}.")
    return [" ".join(out), ""]


# ---------------------------------------------------------------- main

SECTION = re.compile(r"<!-- ([a-z0-9-]+):begin -->\n.*?<!-- \1:end -->\n", re.S)


def keep_sections(text: str, path: str) -> str:
    """``text`` with the sections other tools write into the same file (``<!-- NAME:begin -->`` ...
    ``<!-- NAME:end -->``, e.g. tools/real_models.py's and tools/peers.py's) carried over from it."""
    try:
        with open(path) as f:
            old = f.read()
    except OSError:
        return text
    kept = [m.group(0) for m in SECTION.finditer(old) if m.group(0) not in text]
    return text.rstrip("\n") + "\n\n" + "\n".join(kept) if kept else text


def _clean(obj):
    """JSON-safe: non-finite floats (an exact model's infinite SQNR) become None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one model, bits {4, ternary}, W+A8 only, 1 latency repeat")
    ap.add_argument("--json", action="store_true", help="print one JSON object with all rows")
    ap.add_argument("--out", default=os.path.join(REPO, "BENCHMARKS.md"), help="markdown report (default: BENCHMARKS.md)")
    ap.add_argument("--plot", metavar="PNG", help="accuracy/SQNR vs bits plot (needs matplotlib)")
    ap.add_argument("--models", nargs="+", choices=MODELS, metavar="NAME", help=f"subset of {', '.join(MODELS)}")
    ap.add_argument("--bits", nargs="+", choices=BITS, help="weight bit widths (default: all; --quick: 4 ternary)")
    ap.add_argument("--repeats", type=int, help="latency repeats (default 5; --quick: 1)")
    ap.add_argument("--error-decay", dest="error_decay", action="store_true", default=None,
                    help="run tools/error_decay.py (default: on, off with --quick)")
    ap.add_argument("--no-error-decay", dest="error_decay", action="store_false")
    ap.add_argument("--decay-plot", default="docs/error_decay.png", metavar="PNG",
                    help="plot for tools/error_decay.py, written when --plot is given (default: docs/error_decay.png)")
    ap.add_argument("--cost", dest="cost", action="store_true", default=None,
                    help="run tools/bench_quantize.py on models/digits_cnn.onnx (default: on, off with --quick)")
    ap.add_argument("--no-cost", dest="cost", action="store_false")
    ap.add_argument("--cost-results", nargs="+", default=[], metavar="JSONL",
                    help="saved `bench_quantize.py --json` outputs to include (e.g. the light:resnet50 runs)")
    args = ap.parse_args(argv)

    models = args.models or (["digits_mlp"] if args.quick else MODELS)
    bits = args.bits or (QUICK_BITS if args.quick else BITS)
    bits = [b for b in BITS if b in bits]
    act_modes = ["W+A8"] if args.quick else list(ACT_MODES)
    repeats = args.repeats or (1 if args.quick else 5)
    error_decay = (not args.quick) if args.error_decay is None else args.error_decay
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))

    calib = os.path.join(REPO, "models", "digits_calib.npz")
    test = os.path.join(REPO, "models", "digits_test.npz")
    start = time.perf_counter()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result: dict = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(os.path.abspath(__file__), REPO)]
                                       + (sys.argv[1:] if argv is None else list(argv))),
        "machine": common.machine(),
        "load_average": " / ".join(f"{x:.1f}" for x in load) if load else None,
        "models": models, "bits": bits, "act_modes": act_modes, "latency_repeats": repeats,
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="onnx-gpfq-bench-") as work:
        for name in models:
            log(f"{name}:")
            result["rows"] += bench_model(name, bits, act_modes, repeats, calib, test, work, log,
                                          int4_format=not args.quick)
    result["summary"] = summary(result["rows"])
    run_cost = (not args.quick) if args.cost is None else args.cost
    result["cost"] = []
    if run_cost:
        log("quantization cost:")
        result["cost"].append(run_bench_quantize(["models/digits_cnn.onnx", "--calib", "models/digits_calib.npz"], log))
    result["cost"] += load_cost_results(args.cost_results)
    if error_decay:
        log("error decay:")
        decay_plot = os.path.abspath(args.decay_plot) if args.plot else None
        result["error_decay"] = run_error_decay(decay_plot, log)
        if result["error_decay"] and decay_plot and "n0" in result["error_decay"]:
            result["error_decay"]["command"] = ("python tools/error_decay.py --json --plot "
                                                + os.path.relpath(decay_plot, REPO))
            result["error_decay"]["plot"] = os.path.relpath(decay_plot, os.path.dirname(os.path.abspath(args.out)))
    else:
        result["error_decay"] = None
    if args.plot:
        plot_accuracy(result["rows"], args.plot)
        result["plot"] = args.plot
    result["seconds"] = time.perf_counter() - start
    result["out"] = args.out
    text = keep_sections(markdown(result), args.out)  # read before the file is opened for writing
    with open(args.out, "w") as f:
        f.write(text)
    log(f"wrote {args.out} in {result['seconds']:.0f} s")
    if args.json:
        print(json.dumps(_clean(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
