"""The pure pieces of the real-model suite (tools/real_models.py): metrics, decoding, the weight
count, data splits, the BENCHMARKS.md section. The suite itself downloads wheels, so it is no test."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

from _real_models import data, metrics, report, specs, weights  # noqa: E402


# ---------------------------------------------------------------- text

def test_ctc_greedy_collapses_repeats_then_drops_blank():
    assert metrics.ctc_greedy([0, 3, 3, 0, 3, 5, 5, 5, 0, 0, 2]) == [3, 3, 5, 2]
    assert metrics.ctc_greedy([]) == []
    assert metrics.ctc_greedy(np.array([0, 0])) == []


def test_edit_distance_and_cer():
    assert metrics.edit_distance("kitten", "sitting") == 3
    assert metrics.edit_distance("", "abc") == 3
    assert metrics.edit_distance("abc", "abc") == 0
    # 1 substitution in 4 chars + 1 deletion in 2 chars -> 2 / 6
    assert metrics.cer(["abxd", "e"], ["abcd", "ef"]) == pytest.approx(2 / 6)
    assert metrics.line_accuracy(["a", "b", "c"], ["a", "x", "c"]) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- boxes

def test_iou_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    np.testing.assert_allclose(metrics.iou(a, b)[0], [50 / 150, 0.0, 1.0])


def test_nms_keeps_best_and_drops_overlaps():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 1, 10, 11]])
    scores = np.array([0.6, 0.9, 0.5, 0.3])
    assert metrics.nms(boxes, scores, 0.5) == [1, 2]
    assert metrics.nms(boxes, scores, 0.95) == [1, 0, 2, 3]
    assert metrics.nms(boxes, scores, 0.5, top_k=1) == [1]


def _det(boxes, scores, labels):
    return {"boxes": np.array(boxes, dtype=float).reshape(-1, 4), "scores": np.array(scores, dtype=float),
            "labels": np.array(labels)}


def test_box_f1_counts_matches_by_iou_and_label():
    ref = [_det([[0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8], [0, 1])]
    same = metrics.box_f1(ref, ref)
    assert same["f1"] == 1.0 and same["tp"] == 2
    # one box shifted below IoU 0.5, one with the wrong label, one extra
    pred = [_det([[6, 0, 16, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [0.9, 0.8, 0.7], [0, 0, 1])]
    got = metrics.box_f1(pred, ref)
    assert (got["tp"], got["fp"], got["fn"]) == (0, 3, 2)
    assert got["f1"] == 0.0
    pred = [_det([[0, 0, 10, 10], [40, 40, 50, 50]], [0.9, 0.7], [0, 1])]
    got = metrics.box_f1(pred, ref)
    assert (got["tp"], got["fp"], got["fn"]) == (1, 1, 1)
    assert got["f1"] == pytest.approx(0.5)


def test_average_precision_orders_by_score():
    ref = [_det([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 1], [0, 0])]
    assert metrics.average_precision(ref, ref) == pytest.approx(1.0)
    # a false positive ranked first: precisions 0, 1/2, 2/3 at recalls 0, 1/2, 1; the interpolated
    # (monotone) envelope is 2/3 at both recall steps
    pred = [_det([[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])]
    assert metrics.average_precision(pred, ref) == pytest.approx(2 / 3)
    # a false positive between the two hits: 1 at recall 1/2, 2/3 at recall 1
    pred = [_det([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])]
    assert metrics.average_precision(pred, ref) == pytest.approx(0.5 * 1 + 0.5 * (2 / 3))
    # ranked last it costs nothing
    pred = [_det([[50, 50, 60, 60], [0, 0, 10, 10], [20, 20, 30, 30]], [0.1, 0.8, 0.7], [0, 0, 0])]
    assert metrics.average_precision(pred, ref) == pytest.approx(1.0)


# ---------------------------------------------------------------- tensors and embeddings

def test_sqnr_and_embeddings():
    ref = [np.ones(100, dtype=np.float32)]
    assert metrics.sqnr_db(ref, ref) == float("inf")
    assert metrics.sqnr_db(ref, [np.full(100, 1.1, dtype=np.float32)]) == pytest.approx(20.0, abs=1e-4)
    a = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    np.testing.assert_allclose(metrics.cosine_rows(a, 2 * a), 1.0)
    assert list(metrics.nearest_neighbours(a)) == [2, 2, 0]
    b = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 0.9]])  # row 2 now nearest to row 1
    assert list(metrics.nearest_neighbours(b)) == [2, 2, 1]
    assert metrics.nn_agreement(a, b) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- decoders (package post-processing)

def test_yolov8_decode_thresholds_and_nms():
    out = np.zeros((1, 22, 3), dtype=np.float32)  # 3 anchors, 18 classes
    out[0, :4, 0] = [100, 100, 40, 40]
    out[0, 4 + 5, 0] = 0.9
    out[0, :4, 1] = [102, 100, 40, 40]  # overlaps anchor 0: suppressed
    out[0, 4 + 5, 1] = 0.8
    out[0, :4, 2] = [200, 200, 20, 20]
    out[0, 4 + 3, 2] = 0.22  # above 0.2 but below NMSBoxes' 0.25: dropped
    det = specs._yolov8(out)
    np.testing.assert_allclose(det["boxes"], [[80, 80, 120, 120]])
    assert list(det["labels"]) == [5]


def test_yolox_decode_grid_and_strides():
    out = np.zeros((1, 3549, 6), dtype=np.float32)
    out[0, :, 4] = -1.0  # objectness x class below 0.1 everywhere ...
    out[0, 0] = [0.5, 0.5, np.log(2.0), np.log(4.0), 0.9, 0.9]  # ... except cell (0, 0) at stride 8
    det = specs._yolox(out)
    # centre (0.5 + 0) * 8 = 4, width 2 * 8 = 16, height 4 * 8 = 32
    np.testing.assert_allclose(det["boxes"], [[-4, -12, 12, 20]])
    assert det["scores"][0] == pytest.approx(0.81)


def test_ctc_decode_of_the_recogniser_output(tmp_path, monkeypatch):
    spec = specs.SPECS["ocr"]
    monkeypatch.setitem(spec.extra, "charset", ["", "a", "b", "c"])
    logits = np.zeros((6, 1, 4), dtype=np.float32)
    for t, k in enumerate([1, 1, 0, 1, 3, 3]):
        logits[t, 0, k] = 5
    assert specs.decode(spec, [logits], cache=str(tmp_path)) == "aac"
    assert os.listdir(tmp_path) == []  # the charset given, no wheel fetched


# ---------------------------------------------------------------- weight fraction

def _model_with_lstm_and_qdq():
    w_codes = numpy_helper.from_array(np.ones((4, 3, 1, 1), dtype=np.int8), "w_q")
    w_scale = numpy_helper.from_array(np.full(4, 0.1, dtype=np.float32), "w_s")
    lstm_w = numpy_helper.from_array(np.zeros((2, 8, 4), dtype=np.float32), "lw")  # 64 elements
    lstm_r = numpy_helper.from_array(np.zeros((2, 8, 2), dtype=np.float32), "lr")  # 32 elements
    gemm_w = numpy_helper.from_array(np.zeros((2, 5), dtype=np.float32), "gw")  # 10 elements, float
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=0),
             helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("LSTM", ["seq", "lw", "lr"], ["h"], hidden_size=2, direction="bidirectional"),
             helper.make_node("Gemm", ["g", "gw"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "seq", "g")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c", "h", "y")],
                              [w_codes, w_scale, lstm_w, lstm_r, gemm_w])
    quant = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    float_graph = helper.make_graph(nodes[1:], "f", graph.input, graph.output,
                                    [numpy_helper.from_array(np.ones((4, 3, 1, 1), dtype=np.float32), "w"),
                                     lstm_w, lstm_r, gemm_w])
    return helper.make_model(float_graph, opset_imports=[helper.make_opsetid("", 13)]), quant


def test_weight_fraction_counts_lstm_and_dequantized_weights():
    float_model, quant = _model_with_lstm_and_qdq()
    total, per_op = weights.float_weights(float_model)
    assert total == 12 + 64 + 32 + 10
    assert dict(per_op) == {"Conv": 12, "LSTM": 96, "Gemm": 10}
    frac = weights.fraction(float_model, quant)
    assert frac["quantized_fraction"] == pytest.approx(12 / 118)
    assert frac["left_float_bytes"] == {"Gemm": 40, "LSTM": 384}


# ---------------------------------------------------------------- data splits

def test_text_strings_are_seeded_disjoint_and_have_no_doubled_characters():
    calib = data.text_strings(50, seed=3, split=0)
    evals = data.text_strings(80, seed=3, split=1, exclude=set(calib))
    assert calib == data.text_strings(50, seed=3, split=0)
    assert not set(calib) & set(evals)
    assert len(set(evals)) == 80
    assert all(a != b for s in calib + evals for a, b in zip(s, s[1:]))
    assert all(4 <= len(s) <= 8 and set(s) <= set(data.ALNUM) for s in evals)


def test_sentences_split_disjoint():
    a = data.sentence_pick(40, 0, seed=1)
    b = data.sentence_pick(60, 1, seed=1)
    assert len(a) == 40 and len(b) == 60 and not set(a) & set(b)
    assert a == data.sentence_pick(40, 0, seed=1)
    with pytest.raises(RuntimeError):
        data.sentence_pick(10**6, 0, seed=1)


# ---------------------------------------------------------------- the section

def test_update_section_replaces_only_the_block():
    text = "# B\n\nintro\n\n" + report.BEGIN + "\nold\n" + report.END + "\n\n## after\n"
    new = report.update_section(text, "## Real models\nnew")
    assert new == "# B\n\nintro\n\n" + report.BEGIN + "\n## Real models\nnew\n" + report.END + "\n\n## after\n"
    assert report.update_section(new, "## Real models\nnew") == new
    appended = report.update_section("# B\n", "body")
    assert appended == "# B\n\n" + report.BEGIN + "\nbody\n" + report.END + "\n"


def _row(variant, metric, **kw):
    base = {"variant": variant, "f1": metric, "sqnr_deployed": 30.0, "sqnr_reference": 31.0, "seconds": 1.0,
            "peak_rss_mb": 100.0, "file_bytes": 1000, "ms_per_sample": 1.0, "quantized_fraction": 1.0}
    return base | kw


def test_losses_list_every_worse_figure_against_the_best_peer():
    m = {"name": "det", "metric": "f1", "higher_is_better": True, "rows": [
        _row("gpfq W8A8", 0.95, seconds=5.0),
        _row("ort MinMax W8A8", 0.90), _row("ort Entropy W8A8", 0.97, seconds=9.0),
        {"variant": "ort Percentile W8A8", "error": "crashed"},
        {"variant": "gpfq W4A8", "error": "boom"}, _row("ort MinMax W4A8 (QInt4)", 0.5)]}
    lines = report.losses(m)
    assert any("gpfq W8A8: f1 0.9500 vs 0.9700 (ort Entropy W8A8)" in ln for ln in lines)
    assert any("gpfq W8A8: quantize seconds 5.00 vs 1.00 (ort MinMax W8A8)" in ln for ln in lines)
    assert any("gpfq W4A8: failed (boom)" in ln for ln in lines)
    assert not any("SQNR" in ln or "latency" in ln for ln in lines)  # equal figures are not losses
    m["rows"][0] = _row("gpfq W8A8", 0.99, seconds=0.5)
    assert [ln for ln in report.losses(m) if "W8A8" in ln] == []


def test_section_has_cpu_command_tables_and_where_we_lose():
    results = {"command": "python tools/real_models.py --models det", "seconds": 60, "seed": 0,
               "machine": {"lscpu_model": "Test CPU", "avx512_vnni": True, "avx_vnni": False, "cores": 2,
                           "onnxruntime": "1.x", "onnx": "1.y", "commit": "abc"},
               "models": [{"name": "det", "what": "detector", "package": "p==1", "member": "m.onnx", "metric": "f1",
                           "higher_is_better": True, "calibration_samples": 4, "evaluation_samples": 8,
                           "reference_samples": 2, "weight_bytes": 4096, "file_bytes": 8192,
                           "rows": [_row("gpfq W8A8", 0.8) | {"map50": 0.7}, _row("ort MinMax W8A8", 0.9) | {"map50": 0.9},
                                    {"variant": "ort Entropy W8A8", "error": "crashed here"}]}]}
    text = report.section(results)
    assert text.startswith("## Real models")
    assert "`python tools/real_models.py --models det`" in text and "Test CPU" in text and "avx512_vnni" in text
    assert "| gpfq W8A8 | 0.800 | 0.700 |" in text
    assert "**failed**: crashed here" in text
    lose = text[text.index("### Where we lose"):]
    assert "det gpfq W8A8: f1 0.8000 vs 0.9000 (ort MinMax W8A8)" in lose
    assert "det ort Entropy W8A8: crashed here" in text[text.index("### Quantizer failures"):]


# ---------------------------------------------------------------- command line

@pytest.mark.parametrize("args, needle", [(["--models", "nosuch"], "unknown nosuch"),
                                          (["--eval", "0"], "--eval must be at least 1"),
                                          (["--variants", "gpfq W9"], "--variants")])
def test_bad_input_is_one_line_and_exit_2(args, needle, tmp_path):
    before = open(os.path.join(REPO, "BENCHMARKS.md")).read()
    proc = subprocess.run([sys.executable, "tools/real_models.py", *args, "--cache", str(tmp_path), "--update-benchmarks"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
    assert open(os.path.join(REPO, "BENCHMARKS.md")).read() == before
    assert os.listdir(tmp_path) == []  # nothing fetched


def test_findings_name_unlisted_float_weights_and_inert_calibrations():
    m = {"name": "ocr", "rows": [
        _row("gpfq W8A8", 1.0, left_float_bytes={"LSTM": 4096, "Gemm": 8}, left_in_float_reported=[{"op_type": "Gemm"}]),
        _row("ort MinMax W8A8", 1.0), _row("ort Entropy W8A8", 1.0), _row("ort Percentile W8A8", 1.0, sqnr_deployed=29.0)]}
    lines = report.findings(m)
    assert any("ocr gpfq W8A8: LSTM weights stayed float" in ln for ln in lines)
    assert any("ort Entropy W8A8 gives exactly the outputs of ort MinMax" in ln for ln in lines)
    assert not any("Percentile" in ln or "Gemm" in ln or "RTN" in ln for ln in lines)
    m = {"name": "enc", "metric": "f1", "higher_is_better": True, "rows": [_row("gpfq W8A8", 0.97), _row("rtn W8A8", 0.99)]}
    assert any("enc W8A8: GPFQ's f1 0.9700 is worse than RTN's 0.9900" in ln for ln in report.findings(m))


def test_render_prints_the_section_of_a_saved_run_and_rejects_a_bad_file(tmp_path):
    import json  # noqa: PLC0415

    saved = {"command": "python tools/real_models.py --models det", "seconds": 30, "seed": 0, "partial": None,
             "machine": {"lscpu_model": "Saved CPU", "avx512_vnni": False, "avx_vnni": False, "cores": 2},
             "models": [{"name": "det", "error": "pip download det==1 gave no wheel", "rows": []}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(saved))
    proc = subprocess.run([sys.executable, "tools/real_models.py", "--render", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("## Real models") and "Saved CPU" in proc.stdout and "no VNNI" in proc.stdout
    assert "Not run: pip download det==1 gave no wheel" in proc.stdout
    (tmp_path / "bad.json").write_text("{not json")
    proc = subprocess.run([sys.executable, "tools/real_models.py", "--render", str(tmp_path / "bad.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_metric_floor_perturbs_layer_weights_in_initializers_and_constants():
    import metric_floor  # noqa: PLC0415  (tools/metric_floor.py)

    rng = np.random.default_rng(0)
    w_init = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w_const = rng.normal(size=(4, 5)).astype(np.float32)
    bias = np.full(4, 0.1, np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("Constant", [], ["m"], value=numpy_helper.from_array(w_const, "m")),
             helper.make_node("ReduceMean", ["y"], ["r"], axes=[2, 3], keepdims=0),
             helper.make_node("MatMul", ["m", "r2"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
                                           helper.make_tensor_value_info("r2", TensorProto.FLOAT, [5, 1])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 1])],
                              [numpy_helper.from_array(w_init, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph)
    assert sorted(tuple(t.dims) for t in metric_floor.layer_weights(model)) == [(4, 3, 3, 3), (4, 5)]  # not the bias

    half = metric_floor.perturbed(model, "fp16", None, 0)
    got = {tuple(t.dims): numpy_helper.to_array(t) for t in metric_floor.layer_weights(half)}
    np.testing.assert_array_equal(got[(4, 3, 3, 3)], w_init.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got[(4, 5)], w_const.astype(np.float16).astype(np.float32))
    assert not np.array_equal(got[(4, 5)], w_const)
    np.testing.assert_array_equal(numpy_helper.to_array(half.graph.initializer[1]), bias)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), w_init)  # the input untouched

    big = rng.normal(size=(64, 256)).astype(np.float32)
    noisy = metric_floor.perturbed(helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], [numpy_helper.from_array(big, "w")])),
        "noise", 30.0, 1)
    err = numpy_helper.to_array(noisy.graph.initializer[0]).astype(np.float64) - big
    assert 10 * np.log10(np.sum(big.astype(np.float64) ** 2) / np.sum(err ** 2)) == pytest.approx(30.0, abs=0.3)
