"""The pure half of tools/peers.py: rows, the JSON document, the table, the prose and the BENCHMARKS.md section.

Nothing here imports a peer, onnxruntime or onnx-gpfq (tests/test_peers.py runs it with none installed).
"""

from __future__ import annotations

import json
import math
import re
import subprocess

BEGIN = "<!-- peers:begin -->"  # the form tools/benchmark.py carries over when it rewrites BENCHMARKS.md
END = "<!-- peers:end -->"
INSERT_BEFORE = "## Single-layer error decay"
NOTES = "### Notes on the peers run"  # hand-written, inside the markers: kept when the section is regenerated
SCHEMA = 1

RUNS = [  # (quantizer, method, weight bits, activation bits), in table order
    ("onnx-gpfq", "gpfq", 4, 8), ("onnx-gpfq", "gpfq", 8, 8),
    ("aimet-onnx", "seqmse", 4, 8), ("aimet-onnx", "seqmse", 8, 8),
    ("aimet-onnx", "adaround", 4, 8), ("aimet-onnx", "adaround", 8, 8),
    ("amd-quark", "adaround", 4, 8), ("amd-quark", "adaround", 8, 8), ("amd-quark", "ptq", 8, 8),
    ("brevitas", "gpfq", 4, 8), ("brevitas", "gpfq", 8, 8),
]
ROW_KEYS = ("model", "quantizer", "method", "bits", "metric_name", "higher_is_better", "metric", "float_metric", "sqnr_db", "wall_s",
            "cpu_s", "process_wall_s", "process_cpu_s", "peak_rss_mb", "integer_ops", "float_compute_ops",
            "integer_kernels", "settings", "versions", "reason")


def row_key(row: dict) -> tuple:
    return (row["model"], row["quantizer"], row["method"], row["bits"])


def make_row(model: str, quantizer: str, method: str, bits: str, res: dict, metric_name: str | None,
             higher_is_better: bool = True) -> dict:
    """One table row from a child's result (or a float reference): every ROW_KEYS key, None where unknown."""
    row = {k: None for k in ROW_KEYS}
    row.update(model=model, quantizer=quantizer, method=method, bits=bits, metric_name=metric_name,
               higher_is_better=higher_is_better)
    for k in ROW_KEYS[6:]:
        if k in res:
            row[k] = res[k]
    if res.get("unsupported"):
        row["reason"] = "cannot run: " + res["unsupported"]
        row["wall_s"] = row["cpu_s"] = None  # no quantization happened (the process figures stay)
    elif res.get("error"):
        row["reason"] = "failed: " + res["error"]
    if row["integer_ops"] is not None:
        row["integer_kernels"] = row["integer_ops"] > 0
    return row


def sqnr_db(ref: list, out: list) -> float:
    """10 log10(signal / error) over all outputs' elements (float64)."""
    import numpy as np

    signal = noise = 0.0
    for r, o in zip(ref, out, strict=True):
        r = np.asarray(r, dtype=np.float64).reshape(-1)
        o = np.asarray(o, dtype=np.float64).reshape(-1)
        if r.shape != o.shape:
            raise ValueError("output sizes differ")
        signal += float(r @ r)
        noise += float((r - o) @ (r - o))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def load_rows(path: str) -> list[dict]:
    """The rows of a JSON-lines file, the last one for each (model, quantizer, method, bits), in first-seen order."""
    rows: dict[tuple, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip().startswith("{"):
                row = json.loads(line)
                if (row.get("reason") or "").startswith("cannot run"):
                    row["wall_s"] = row["cpu_s"] = None  # rows saved before make_row blanked these
                rows[row_key(row)] = row
    return list(rows.values())


def machine() -> dict:
    """The CPU: lscpu's model name and whether it lists avx512_vnni / avx_vnni."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        text = ""
    return machine_from_lscpu(text)


def machine_from_lscpu(text: str) -> dict:
    name = re.search(r"^Model name:\s*(.+)$", text, re.M)
    flags = re.search(r"^Flags:\s*(.+)$", text, re.M)
    flag_set = set(flags.group(1).split()) if flags else set()
    cpus = re.search(r"^CPU\(s\):\s*(\d+)", text, re.M)
    return {"cpu": name.group(1).strip() if name else None, "avx512_vnni": "avx512_vnni" in flag_set,
            "avx_vnni": "avx_vnni" in flag_set, "cpus": int(cpus.group(1)) if cpus else None}


# ---------------------------------------------------------------- the document

def _find(rows, model, quantizer, method, bits):
    for r in rows:
        if (r["model"], r["quantizer"], r["method"], r["bits"]) == (model, quantizer, method, bits):
            return r
    return None


def gain(row: dict, other: dict) -> float:
    """How much better ``row``'s task metric is than ``other``'s (negative: worse), whichever way the metric runs."""
    d = row["metric"] - other["metric"]
    return d if row.get("higher_is_better") is not False else -d


def _delta_text(row: dict, d: float) -> str:
    if row.get("metric_name") == "accuracy":
        return f"{d * 100:.1f} points"
    return f"{d:.3f} {row.get('metric_name') or ''}".rstrip()


def _ran(row) -> bool:
    return row is not None and row.get("metric") is not None and row.get("reason") is None


def acceptance(rows: list[dict]) -> dict:
    """The issue's two targets, per model: onnx-gpfq W4A8 at least as accurate as AIMET SeqMSE W4A8
    where it runs, and at least 20x faster (CPU seconds) than AIMET AdaRound W4A8 at its defaults."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        ours = _find(rows, model, "onnx-gpfq", "gpfq", "W4A8")
        seq = _find(rows, model, "aimet-onnx", "seqmse", "W4A8")
        ada = _find(rows, model, "aimet-onnx", "adaround", "W4A8")
        entry = {}
        if _ran(ours) and _ran(seq):
            entry["vs_seqmse_metric_delta"] = gain(ours, seq)  # positive: onnx-gpfq better
            entry["as_accurate_as_seqmse"] = gain(ours, seq) >= 0
        if _ran(ours) and _ran(ada) and ours.get("cpu_s") and ada.get("cpu_s"):
            entry["adaround_cpu_speedup"] = ada["cpu_s"] / ours["cpu_s"]
            entry["adaround_wall_speedup"] = ada["wall_s"] / ours["wall_s"] if ours.get("wall_s") else None
            entry["faster_20x_than_adaround"] = entry["adaround_cpu_speedup"] >= 20
        elif (_ran(ours) and ada is not None and (ada.get("reason") or "").startswith("failed: timed out")
              and ada.get("process_cpu_s") and ours.get("cpu_s")):
            # AdaRound did not finish: the CPU seconds it had spent when stopped bound the ratio from below
            entry["adaround_cpu_speedup_at_least"] = ada["process_cpu_s"] / ours["cpu_s"]
            entry["faster_20x_than_adaround"] = entry["adaround_cpu_speedup_at_least"] >= 20
        if entry:
            out[model] = entry
    return out


def ordered(rows: list[dict]) -> list[dict]:
    """Models in first-seen order, each with its float row first (made from the rows' float_metric where
    no float row was saved), then the quantizers in RUNS order."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    out = []
    order = {(q, m, f"W{w}A{a}"): i for i, (q, m, w, a) in enumerate(RUNS)}
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        floats = [r for r in mine if r["quantizer"] == "float"]
        if not floats:
            ref = next((r for r in mine if r.get("float_metric") is not None), None)
            if ref is not None:
                floats = [make_row(model, "float", "-", "float", {"metric": ref["float_metric"]},
                                   ref.get("metric_name"), ref.get("higher_is_better", True))]
        out += floats[:1] + sorted((r for r in mine if r["quantizer"] != "float"),
                                   key=lambda r: order.get((r["quantizer"], r["method"], r["bits"]), len(order)))
    return out


def document(rows: list[dict], machine_info: dict, command: str) -> dict:
    """The JSON the tool prints (and the section is made from)."""
    rows = ordered(rows)
    return {"schema": SCHEMA, "command": command, "machine": machine_info, "rows": rows,
            "acceptance": acceptance(rows)}


def _f(x, fmt: str, scale: float = 1.0) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x * scale, fmt)


def _metric(row) -> str:
    if row.get("metric") is None:
        return "-"
    return f"{row['metric'] * 100:.1f}" if row.get("metric_name") == "accuracy" else f"{row['metric']:.3f}"


def table(rows: list[dict]) -> list[str]:
    """Markdown lines: one row per (model, quantizer, method, bits)."""
    lines = ["| model | quantizer | method | bits | task metric | SQNR vs float (dB) | quantize wall / CPU (s) | "
             "child peak RSS (MiB) | integer kernels (int / float compute ops) | note |",
             "|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        metric_label = f"{r.get('metric_name') or ''} {_metric(r)}".strip() if r.get("metric") is not None else "-"
        if r["quantizer"] == "float":
            lines.append(f"| {r['model']} | float | - | float | {metric_label} | - | - | - | - | |")
            continue
        ints = ("-" if r.get("integer_ops") is None else
                f"{'yes' if r['integer_ops'] else 'no'} ({r['integer_ops']} / {r.get('float_compute_ops')})")
        lines.append(f"| {r['model']} | {r['quantizer']} | {r['method']} | {r['bits']} | {metric_label} | "
                     f"{_f(r.get('sqnr_db'), '.1f')} | {_f(r.get('wall_s'), '.2f')} / {_f(r.get('cpu_s'), '.2f')} | "
                     f"{_f(r.get('peak_rss_mb'), '.0f')} | {ints} | {(r.get('reason') or '').replace('|', '/')} |")
    return lines


def prose(rows: list[dict]) -> list[str]:
    """Where a peer is more accurate than onnx-gpfq at the same bits (and by how much), where onnx-gpfq
    wins (by how much) and what the peer's time is against ours."""
    better, worse = [], []
    for r in rows:
        if r["quantizer"] in ("float", "onnx-gpfq") or not _ran(r):
            continue
        ours = _find(rows, r["model"], "onnx-gpfq", "gpfq", r["bits"])
        if not _ran(ours):
            continue
        delta = gain(r, ours)
        cost = (f"{r['cpu_s'] / ours['cpu_s']:.0f}x our CPU seconds ({r['cpu_s']:.1f} s against {ours['cpu_s']:.2f} s)"
                if r.get("cpu_s") and ours.get("cpu_s") else "time not measured")
        what = f"{r['model']} {r['bits']}: {r['quantizer']} {r['method']}"
        if delta > 0:
            better.append(f"- {what} is {_delta_text(r, delta)} better ({_metric(r)} against our {_metric(ours)}), "
                          f"at {cost}.")
        elif delta < 0:
            worse.append(f"- {what} is {_delta_text(r, -delta)} worse ({_metric(r)} against our {_metric(ours)}), "
                         f"at {cost}.")
    lines = ["Where a peer is more accurate than onnx-gpfq at the same bits (task metric):", ""]
    lines += better or ["- nowhere in the rows above."]
    lines += ["", "Where onnx-gpfq is more accurate (ties are left out), and what the peer spends:", ""]
    lines += worse or ["- nowhere in the rows above."]
    return lines


def section(doc: dict) -> str:
    m = doc["machine"]
    vnni = ", ".join(f for f in ("avx512_vnni", "avx_vnni") if m.get(f)) or "no VNNI flag"
    versions = {}
    for r in doc["rows"]:
        for k, v in (r.get("versions") or {}).items():
            versions.setdefault(k, v)
    acc = doc["acceptance"]
    lines = [BEGIN, "## Peers", "",
             f"`{doc['command']}` on {m.get('cpu') or 'an unknown CPU'} ({vnni}; {m.get('cpus') or '?'} CPUs). "
             "Each quantization in its own child process with the peer's own virtual environment; wall / CPU "
             "seconds: the child's clock around the quantization (float ONNX on disk to quantized ONNX written, "
             "imports not counted); peak RSS: the child's ru_maxrss. Every result is evaluated the same way: "
             "onnxruntime, default session options (as deployed); SQNR of the outputs against the float model; "
             "integer kernels: the ops onnxruntime's optimiser writes (QLinear*/QGemm/MatMulInteger* against "
             "float Conv/Gemm/MatMul left). The same calibration batches for every quantizer (32 samples each, or "
             "the model's fixed batch).",
             "", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".", ""]
    lines += table(doc["rows"])
    lines += [""] + prose(doc["rows"])
    if acc:
        lines += ["", "Acceptance (issue: at least as accurate as AIMET SeqMSE at W4A8 where it runs; at least 20x "
                  "faster than AIMET AdaRound at its defaults):", ""]
        for model, e in acc.items():
            parts = []
            if "as_accurate_as_seqmse" in e:
                ours = _find(doc["rows"], model, "onnx-gpfq", "gpfq", "W4A8")
                sign = "+" if e["vs_seqmse_metric_delta"] >= 0 else "-"
                parts.append(f"vs SeqMSE {sign}{_delta_text(ours, abs(e['vs_seqmse_metric_delta']))} "
                             f"({'met' if e['as_accurate_as_seqmse'] else '**not met**'})")
            if "adaround_cpu_speedup" in e:
                parts.append(f"{e['adaround_cpu_speedup']:.0f}x fewer CPU seconds than AdaRound "
                             f"({_f(e.get('adaround_wall_speedup'), '.0f')}x wall) "
                             f"({'met' if e['faster_20x_than_adaround'] else '**not met**'})")
            if "adaround_cpu_speedup_at_least" in e:
                parts.append(f"at least {e['adaround_cpu_speedup_at_least']:.0f}x fewer CPU seconds than AdaRound, "
                             f"which had not finished when stopped "
                             f"({'met' if e['faster_20x_than_adaround'] else '**not met**'})")
            lines.append(f"- {model}: " + "; ".join(parts))
    notes = doc.get("notes") or []
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    lines.append(END)
    return "\n".join(lines) + "\n"


def replace_section(text: str, new_section: str) -> str:
    """``text`` with the section between the markers replaced (markers kept), or inserted before the
    single-layer error-decay section (or at the end) when there are no markers yet."""
    if not new_section.startswith(BEGIN) or not new_section.rstrip().endswith(END):
        raise ValueError("the section must start and end with the markers")
    start = text.find(BEGIN)
    if start >= 0:
        stop = text.find(END, start)
        if stop < 0:
            raise ValueError("BENCHMARKS.md has the begin marker but no end marker")
        old = text[start:stop]
        if NOTES in old and NOTES not in new_section:  # carry the hand-written notes over
            body = new_section.rstrip()[:-len(END)].rstrip("\n")
            new_section = body + "\n\n" + old[old.index(NOTES):].rstrip("\n") + "\n" + END + "\n"
        stop += len(END)
        if text[stop:stop + 1] == "\n":
            stop += 1
        return text[:start] + new_section + text[stop:]
    at = text.find(INSERT_BEFORE)
    if at < 0:
        return text.rstrip("\n") + "\n\n" + new_section
    return text[:at] + new_section + "\n" + text[at:]
