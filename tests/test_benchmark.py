"""The benchmark tools run end to end and print what they promise (tools/benchmark.py, tools/bench_quantize.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_BITS = ("4", "ternary")


def _run(args: list[str], timeout: int = 300) -> dict:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no JSON on stdout:\n{proc.stdout[-2000:]}"
    return json.loads(lines[-1])


KEPT = "<!-- peers:begin -->\n## Peers\nrows\n<!-- peers:end -->\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    out.write_text("# old\n" + KEPT)  # a section another tool wrote: the run must carry it over
    result = _run(["tools/benchmark.py", "--quick", "--json", "--models", "digits_mlp", "--out", str(out)])
    return result, out


def _row(rows, method, bits, act="W+A8"):
    found = [r for r in rows if r["method"] == method and r["bits"] == bits and r["act"] == act]
    assert len(found) == 1, f"expected one {method} w{bits} {act} row, got {found}"
    return found[0]


def test_quick_benchmark_rows(quick):
    result, out = quick
    rows = result["rows"]
    assert {r["model"] for r in rows} == {"digits_mlp"}
    fl = _row(rows, "float", "32", "float")
    assert 0.0 <= fl["accuracy"] <= 1.0 and fl["latency_ms"] > 0
    for bits in QUICK_BITS:
        for method in ("gpfq", "rtn"):
            r = _row(rows, method, bits)
            assert 0.0 <= r["accuracy"] <= 1.0, r
            assert 0.0 <= r["agreement"] <= 1.0, r
            assert r["size_bytes"] < fl["size_bytes"], r
            assert r["latency_ms"] > 0 and r["speedup"] > 0, r
            assert r["quant_seconds"] > 0, r
            assert r["sqnr_db"] is None or r["sqnr_db"] > 0, r
    assert _row(rows, "gpfq", "ternary")["accuracy"] >= _row(rows, "rtn", "ternary")["accuracy"]
    # onnxruntime: a measured int4 row, an explicit n/a for ternary
    assert 0.0 <= _row(rows, "ort", "4")["accuracy"] <= 1.0
    tern = _row(rows, "ort", "ternary")
    assert tern["accuracy"] is None and tern["note"].startswith("n/a")
    assert result["summary"] and all(s["gpfq_accuracy"] is not None for s in result["summary"])


def test_quick_benchmark_writes_markdown_only_where_told(quick):
    result, out = quick
    text = out.read_text()
    assert "## digits_mlp" in text and "GPFQ vs onnxruntime" in text
    assert result["machine"]["onnxruntime"] in text
    assert result.get("plot") is None  # --quick without --plot: no matplotlib needed
    assert KEPT in text and "# old" not in text  # the run read the old file before truncating it


def test_bench_quantize_keys():
    res = _run(["tools/bench_quantize.py", "models/digits_mlp.onnx", "--calib", "models/digits_calib.npz", "--json"])
    for key in ("ratio_incl_ort_preprocessing", "gpfq_seconds", "ort_seconds", "ratio", "gpfq_peak_rss_mb",
                "ort_peak_rss_mb", "samples", "ort_preprocessing", "ort_preprocess_seconds", "ratio_target_met"):
        assert key in res, key
    # the headline comes first (after the model's name), the old ratio beside it
    assert list(res)[:3] == ["model", "ratio_incl_ort_preprocessing", "ratio"]
    assert res["samples"] == 256
    assert res["gpfq_seconds"] > 0 and res["ort_seconds"] > 0 and res["ort_preprocess_seconds"] > 0
    assert res["ratio"] == pytest.approx(res["gpfq_seconds"] / res["ort_seconds"])
    headline = res["gpfq_seconds"] / (res["ort_seconds"] + res["ort_preprocess_seconds"])
    assert res["ratio_incl_ort_preprocessing"] == pytest.approx(headline)
    assert res["ratio_incl_ort_preprocessing"] < res["ratio"]
    assert res["ratio_target_met"] is (headline <= 3.0)  # the target checks the headline
    assert res["gpfq_peak_rss_mb"] > 0 and res["ort_peak_rss_mb"] > 0
    assert res["ort_preprocessing"]["quant_pre_process"] is True
    assert not os.path.exists(os.path.join(REPO, "sym_shape_infer_temp.onnx"))  # ORT's temporaries stay in its folder
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    slow = dict(res, model="slow", ratio_incl_ort_preprocessing=3.5)
    grown = dict(res, samples_multiplier=4, samples=1024, gpfq_rss_growth=1.2, gpfq_peak_rss_mb_1x=100.0,
                 gpfq_peak_rss_mb=120.0, command="python tools/bench_quantize.py x --samples-multiplier 4")
    fast = dict(res, ratio_incl_ort_preprocessing=1.5)  # not this run's figure: the row's marks are the point
    rows = [ln for ln in benchmark._cost_lines([fast, slow, grown]) if ln.startswith("| ")][1:]
    assert len(rows) == 2 and rows[0].startswith("| models/digits_mlp.onnx | 256 |") and rows[1].startswith("| slow |")
    cells = rows[0].split("|")
    assert "1.200 (**not met**) (100 -> 120 MiB at 256 -> 1024; `python tools/bench_quantize.py x" in cells[9]
    assert cells[5].strip() == "1.50 (met)"
    assert "3.50 (**not met**)" in rows[1].split("|")[5] and rows[1].split("|")[9].strip() == "-"


def test_bench_quantize_repeat_reports_the_median_pair():
    sys.path.insert(0, os.path.join(REPO, "tools"))
    try:
        import bench_quantize
    finally:
        sys.path.pop(0)
    runs = [({"seconds": 10.0}, {"seconds": 2.0}), ({"seconds": 9.0}, {"seconds": 3.0}), ({"seconds": 12.0}, {"seconds": 3.0}),
            ({"seconds": 8.0}, {"seconds": 1.0})]
    g, o, ratios = bench_quantize._median_pair(runs)
    assert ratios == [5.0, 3.0, 4.0, 8.0]
    assert (g["seconds"], o["seconds"]) == (12.0, 3.0)  # ratios sorted 3, 4, 5, 8: the lower middle one
    g, o, _ = bench_quantize._median_pair(runs[:3])
    assert (g["seconds"], o["seconds"]) == (12.0, 3.0)
    # the median is of the headline ratio: ORT's preprocessing counts on its side
    pre = [({"seconds": 10.0}, {"seconds": 2.0, "preprocessing": {"preprocess_seconds": 3.0}}),  # 2.0
           ({"seconds": 9.0}, {"seconds": 3.0}),  # 3.0
           ({"seconds": 12.0}, {"seconds": 3.0, "preprocessing": {"preprocess_seconds": 9.0}})]  # 1.0
    g, o, ratios = bench_quantize._median_pair(pre)
    assert ratios == [2.0, 3.0, 1.0] and g["seconds"] == 10.0
    g, o, ratios = bench_quantize._median_pair([({"error": "x"}, {"seconds": 1.0})])  # a failed child
    assert ratios == [float("inf")] and "error" in g
    proc = subprocess.run([sys.executable, "tools/bench_quantize.py", "models/digits_mlp.onnx", "--calib",
                           "models/digits_calib.npz", "--repeat", "0"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "--repeat must be >= 1" in proc.stderr


def test_regenerating_keeps_the_sections_other_tools_write(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "tools"))
    import benchmark

    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\nold table\n<!-- real-models:begin -->\n## Real models\nrows\n<!-- real-models:end -->\n")
    text = benchmark.keep_sections("# Benchmarks\nnew table\n", str(out))
    assert text.startswith("# Benchmarks\nnew table\n") and "old table" not in text
    assert "<!-- real-models:begin -->\n## Real models\nrows\n<!-- real-models:end -->\n" in text
    assert benchmark.keep_sections("# new\n", str(tmp_path / "missing.md")) == "# new\n"


def test_target_check_section_is_replaced_in_place(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "tools"))
    import target_check

    row = {"model": "m", "variant": "W8A8 any", "seed": 0, "bounded_layers": 2, "saturating_layers": 0, "int8_layers": 2,
           "sqnr_reference_db": 30.0, "sqnr_deployed_db": 29.9, "sqnr_avx2_db": 29.8, "sqnr_reference_qemu_samples_db": 30.1}
    free = dict(row, variant="W8A8 reference", bounded_layers=0, saturating_layers=2, sqnr_reference_db=30.2)
    seed1 = [{"model": "m", "variant": "W8A8 any", "seed": 1, "bounded_layers": 2, "sqnr_reference_db": 29.0},
             {"model": "m", "variant": "W8A8 reference", "seed": 1, "bounded_layers": 0, "sqnr_reference_db": 29.6}]
    rows = [row, free, *seed1]
    result = {"machine": {"cpu": "cpu", "int8_path_text": "path", "onnxruntime": "1", "commit": "c"},
              "command": "python tools/target_check.py", "evaluation_samples": 8, "seeds": [0, 1],
              "bound_cost_db": target_check.bound_cost(rows), "rows": rows}
    assert result["bound_cost_db"] == {"m": {0: pytest.approx(-0.2), 1: pytest.approx(-0.6)}}
    text = target_check.markdown(result)
    assert text.startswith(target_check.BEGIN) and "| m | W8A8 any | 30.00 | 29.90 | 29.80 | 30.10 | 0 / 2 |" in text
    assert "| m | -0.20 | -0.60 | -0.40 |" in text and text.count("| m | W8A8 any |") == 1  # seed 1 only in the cost
    out = tmp_path / "B.md"
    out.write_text(f"# B\n{target_check.BEGIN}\nold\n{target_check.END}\ntail\n")
    target_check.update_benchmarks(text, str(out))
    new = out.read_text()
    assert "old" not in new and new.startswith("# B\n") and new.endswith("tail\n") and new.count(target_check.BEGIN) == 1
