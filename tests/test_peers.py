"""The pure pieces of tools/peers.py: rows, the JSON document, the table, the prose, the section's
regeneration and the torch check of pip's plan. No peer is installed or run here."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
try:
    import peers
    from _peers import report
finally:
    sys.path.pop(0)


def _row(model="digits_cnn", quantizer="onnx-gpfq", method="gpfq", bits="W4A8", **res):
    return report.make_row(model, quantizer, method, bits, res, "accuracy")


def _rows():
    return [
        _row(quantizer="float", method="-", bits="float", metric=0.994),
        _row(metric=0.99, sqnr_db=24.0, wall_s=0.5, cpu_s=0.4, peak_rss_mb=274.0, integer_ops=6, float_compute_ops=0),
        _row(quantizer="aimet-onnx", method="seqmse", metric=0.994, sqnr_db=15.4, wall_s=20.0, cpu_s=12.0,
             integer_ops=0, float_compute_ops=6),
        _row(quantizer="aimet-onnx", method="adaround", metric=0.98, sqnr_db=14.0, wall_s=300.0, cpu_s=200.0,
             integer_ops=0, float_compute_ops=6),
        _row(quantizer="amd-quark", method="adaround", unsupported="no int4 spec", wall_s=3.0, cpu_s=2.0),
        _row(quantizer="brevitas", method="gpfq", error="RuntimeError: boom | bang"),
    ]


def test_make_row_has_every_key_and_the_reason():
    ok, cannot, failed = _rows()[1], _rows()[4], _rows()[5]
    for r in (ok, cannot, failed):
        assert list(r) == list(report.ROW_KEYS)
    assert ok["integer_kernels"] is True and ok["reason"] is None
    assert _rows()[2]["integer_kernels"] is False  # integer ops counted: none
    assert cannot["reason"] == "cannot run: no int4 spec" and cannot["metric"] is None
    assert cannot["wall_s"] is None and cannot["cpu_s"] is None  # it quantized nothing: no time in the table
    assert failed["reason"].startswith("failed: RuntimeError") and failed["integer_kernels"] is None


def test_sqnr_db():
    ref = [np.array([[3.0, 4.0]])]
    assert report.sqnr_db(ref, [np.array([[3.0, 4.0]])]) == math.inf
    assert report.sqnr_db(ref, [np.array([[3.0, 3.0]])]) == pytest.approx(10 * math.log10(25.0))
    with pytest.raises(ValueError):
        report.sqnr_db(ref, [np.array([1.0])])


def test_load_rows_keeps_the_last_row_per_key(tmp_path):
    path = tmp_path / "rows.jsonl"
    a, b = _row(metric=0.5), _row(metric=0.9)
    c = _row(bits="W8A8", metric=0.7)
    path.write_text("\n".join(json.dumps(r) for r in (a, c, b)) + "\n\n")
    rows = report.load_rows(str(path))
    assert [(r["bits"], r["metric"]) for r in rows] == [("W4A8", 0.9), ("W8A8", 0.7)]


def test_machine_from_lscpu():
    text = "Architecture: x86_64\nCPU(s):   2\nModel name:   Intel(R) Xeon(R) Processor\nFlags: fpu avx2 avx512_vnni\n"
    assert report.machine_from_lscpu(text) == {"cpu": "Intel(R) Xeon(R) Processor", "avx512_vnni": True,
                                               "avx_vnni": False, "cpus": 2}
    assert report.machine_from_lscpu("") == {"cpu": None, "avx512_vnni": False, "avx_vnni": False, "cpus": None}


def test_document_schema_and_acceptance():
    doc = report.document(_rows(), {"cpu": "x", "avx512_vnni": False, "avx_vnni": True, "cpus": 2}, "python tools/peers.py")
    assert set(doc) == {"schema", "command", "machine", "rows", "acceptance"}
    assert doc["schema"] == report.SCHEMA
    json.dumps(doc)  # serialisable as printed
    acc = doc["acceptance"]["digits_cnn"]
    assert acc["vs_seqmse_metric_delta"] == pytest.approx(0.99 - 0.994)
    assert acc["as_accurate_as_seqmse"] is False
    assert acc["adaround_cpu_speedup"] == pytest.approx(500.0) and acc["faster_20x_than_adaround"] is True
    assert acc["adaround_wall_speedup"] == pytest.approx(600.0)
    # a model where SeqMSE did not run has no accuracy verdict
    rows = [r for r in _rows() if r["method"] != "seqmse"]
    assert "as_accurate_as_seqmse" not in report.acceptance(rows)["digits_cnn"]


def test_table_formats_every_row():
    lines = report.table(_rows())
    assert lines[0].startswith("| model | quantizer |") and lines[1].startswith("|---")
    assert len(lines) == 2 + len(_rows())
    ncols = lines[0].count("|")
    assert all(line.count("|") == ncols for line in lines)  # a '|' in a reason is escaped
    assert "| accuracy 99.0 | 24.0 | 0.50 / 0.40 | 274 | yes (6 / 0) |" in lines[3]
    assert "| float | - | float | accuracy 99.4 |" in lines[2]
    assert "no (0 / 6)" in lines[4]
    assert "cannot run: no int4 spec" in lines[6] and "| - | - / - |" in lines[6]


def test_prose_says_who_is_more_accurate_by_how_much_and_at_what_cost():
    text = "\n".join(report.prose(_rows()))
    better, worse = text.split("Where onnx-gpfq is more accurate")
    assert "aimet-onnx seqmse is 0.4 points better (99.4 against our 99.0), at 30x our CPU seconds" in better
    assert "aimet-onnx adaround is 1.0 points worse (98.0 against our 99.0), at 500x our CPU seconds" in worse
    assert "amd-quark" not in text and "brevitas" not in text  # rows that did not run are not compared
    assert "nowhere" in "\n".join(report.prose(_rows()[:2]))


def test_a_lower_is_better_metric_is_compared_the_right_way():
    cer = lambda q, m, v: report.make_row("ocr", q, m, "W4A8", {"metric": v, "cpu_s": 1.0}, "cer", False)  # noqa: E731
    rows = [cer("onnx-gpfq", "gpfq", 0.05), cer("aimet-onnx", "seqmse", 0.08)]
    assert report.gain(rows[0], rows[1]) == pytest.approx(0.03)
    acc = report.acceptance(rows)["ocr"]
    assert acc["as_accurate_as_seqmse"] is True and acc["vs_seqmse_metric_delta"] == pytest.approx(0.03)
    text = "\n".join(report.prose(rows))
    assert "aimet-onnx seqmse is 0.030 cer worse (0.080 against our 0.050)" in text
    doc = report.document(rows, {}, "c")
    assert "vs SeqMSE +0.030 cer (met)" in report.section(doc)


def test_section_is_regenerated_between_the_markers():
    doc = report.document(_rows(), {"cpu": "Intel(R) Xeon(R) Processor", "avx512_vnni": True, "avx_vnni": True,
                                    "cpus": 2}, "python tools/peers.py --json")
    sec = report.section(doc)
    assert sec.startswith(report.BEGIN) and sec.rstrip().endswith(report.END)
    assert "## Peers" in sec and "`python tools/peers.py --json`" in sec
    assert "avx512_vnni, avx_vnni" in sec
    text = "# Benchmarks\n\n## A\n\nabc\n\n## Single-layer error decay (the paper's experiment)\n\nxyz\n"
    once = report.replace_section(text, sec)
    assert once.index("## Peers") < once.index("## Single-layer error decay") and once.count(report.BEGIN) == 1
    assert once.startswith("# Benchmarks\n\n## A\n\nabc\n\n")
    # regenerated: the old section replaced, the text around it untouched, idempotent
    doc2 = report.document(_rows()[:2], doc["machine"], "python tools/peers.py --models digits_cnn")
    twice = report.replace_section(once, report.section(doc2))
    assert twice.count(report.BEGIN) == 1 and "seqmse" not in twice and "--models digits_cnn" in twice
    assert twice.endswith("## Single-layer error decay (the paper's experiment)\n\nxyz\n")
    assert report.replace_section(twice, report.section(doc2)) == twice
    # without the anchor heading it goes at the end
    assert report.replace_section("# B\n", sec) == "# B\n\n" + sec
    with pytest.raises(ValueError):
        report.replace_section(text, "## Peers\n")
    with pytest.raises(ValueError):
        report.replace_section(report.BEGIN + "\nhalf", sec)


def test_runs_cover_each_peer_and_both_bit_widths():
    assert {(q, b) for q, _, b, _ in report.RUNS} == {(q, b) for q in ("onnx-gpfq", "aimet-onnx", "amd-quark", "brevitas")
                                                      for b in (4, 8)}
    assert len(set(report.RUNS)) == len(report.RUNS)


def _plan(*items):
    return {"install": [{"metadata": {"name": n, "version": v}, "download_info": {"url": u}} for n, v, u in items]}


def test_check_torch_plan():
    local = ("torch", "2.13.0+cpu", "file:///opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
    assert peers.check_torch_plan(_plan(local, ("numpy", "2.4.6", "https://x/numpy.whl"))) is None
    assert peers.check_torch_plan(_plan(("numpy", "2.4.6", "file:///n.whl"))) is None  # no torch at all
    assert "needs torch 2.14.1" in peers.check_torch_plan(_plan(("torch", "2.14.1", "file:///t.whl")))
    assert "download" in peers.check_torch_plan(_plan(("torch", "2.13.0", "https://files.example/torch.whl")))
    assert "CUDA" in peers.check_torch_plan(_plan(local, ("nvidia-cublas", "13.1", "file:///c.whl")))


def test_requirements_pin_onnxruntime_and_torch(monkeypatch):
    monkeypatch.setattr(peers, "_ort_version", lambda: "1.2.3")
    assert peers.requirements("amd-quark", None)[-2:] == ["onnxruntime==1.2.3", "torch==2.13.0"]
    assert peers.requirements("brevitas", "/w/torch.whl")[-1] == "/w/torch.whl"
    assert all(not r.startswith("torch") for r in peers.requirements("aimet-onnx", None)[:-1])


def test_document_orders_rows_and_makes_missing_float_rows():
    rows = [_row(quantizer="aimet-onnx", method="seqmse", metric=0.99, float_metric=0.994),
            _row(model="digits_mlp", metric=0.9, float_metric=0.95),
            _row(metric=0.98, float_metric=0.994)]
    doc = report.document(rows, {}, "c")
    got = [(r["model"], r["quantizer"], r["metric"]) for r in doc["rows"]]
    assert got == [("digits_cnn", "float", 0.994), ("digits_cnn", "onnx-gpfq", 0.98), ("digits_cnn", "aimet-onnx", 0.99),
                   ("digits_mlp", "float", 0.95), ("digits_mlp", "onnx-gpfq", 0.9)]
    saved = [_row(quantizer="float", method="-", bits="float", metric=0.5)] + rows[:1]
    assert [r["metric"] for r in report.document(saved, {}, "c")["rows"]] == [0.5, 0.99]  # a saved float row wins


def test_acceptance_bounds_the_speedup_when_adaround_timed_out():
    rows = [_row(metric=0.99, cpu_s=1.5, wall_s=7.0),
            _row(quantizer="aimet-onnx", method="adaround", error="timed out after 1500 s", process_cpu_s=300.0)]
    acc = report.acceptance(rows)["digits_cnn"]
    assert acc["adaround_cpu_speedup_at_least"] == pytest.approx(200.0) and acc["faster_20x_than_adaround"] is True
    assert "adaround_cpu_speedup" not in acc
    assert "at least 200x fewer CPU seconds than AdaRound" in report.section(report.document(rows, {}, "c"))
    rows[1]["reason"] = "failed: RuntimeError"  # a crash bounds nothing
    assert "digits_cnn" not in report.acceptance(rows)


def test_regeneration_keeps_the_hand_written_notes_and_benchmark_py_can_carry_the_section():
    import re

    doc = report.document(_rows(), {}, "c1")
    first = report.replace_section("# B\n", report.section(doc))
    noted = first.replace(report.END, report.NOTES + "\n\n- a note\n" + report.END)
    again = report.replace_section(noted, report.section(report.document(_rows()[:2], {}, "c2")))
    assert "`c2`" in again and "`c1`" not in again and again.count(report.NOTES) == 1
    assert again.index("- a note") < again.index(report.END)
    # tools/benchmark.py carries over sections of this form when it rewrites BENCHMARKS.md
    assert re.search(r"<!-- ([a-z0-9-]+):begin -->\n.*?<!-- \1:end -->\n", again, re.S)
