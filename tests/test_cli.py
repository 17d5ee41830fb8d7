"""The command line as a user and a CI pipeline see it: one-line errors with exit status 2 and no
output file, CI-gate thresholds, atomic output, byte-identical reruns, clean interrupts."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnx_gpfq.cli import main

MODELS = Path(__file__).resolve().parent.parent / "models"
MLP = str(MODELS / "digits_mlp.onnx")
CALIB = str(MODELS / "digits_calib.npz")
TEST = str(MODELS / "digits_test.npz")


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(argv, capsys, fragment, output=None):
    code, _, err = run(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnx-gpfq: error:") and fragment in lines[0], lines[0]
    assert "Traceback" not in err
    if output is not None:
        assert not Path(output).exists()
        assert not [p for p in Path(output).parent.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out.onnx"


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


# --- bad input ------------------------------------------------------------------------------

def test_missing_model(capsys, out, tmp_path):
    assert_user_error(["quantize", tmp_path / "nope.onnx", "-o", out, "--calib", CALIB], capsys, "model file not found", out)


def test_model_path_is_a_folder(capsys, out, tmp_path):
    assert_user_error(["quantize", tmp_path, "-o", out, "--calib", CALIB], capsys, "not a file", out)


def test_not_onnx(capsys, out, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xffthis is not a protobuf" * 50)
    assert_user_error(["quantize", bad, "-o", out, "--calib", CALIB], capsys, "not a valid ONNX model", out)


def test_truncated_model(capsys, out, tmp_path):
    data = Path(MLP).read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    assert_user_error(["quantize", bad, "-o", out, "--calib", CALIB], capsys, "not a valid ONNX model", out)


def test_nothing_to_quantize(capsys, out, tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["y"])], "g",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert_user_error(["quantize", path, "-o", out, "--calib", CALIB], capsys, "nothing to quantize", out)


@pytest.mark.parametrize("arrays, fragment", [
    ({"wrong_name": np.zeros((4, 1, 8, 8), np.float32)}, "no array for model input 'input'"),
    ({"input": np.zeros((4, 1, 7, 8), np.float32)}, "has shape (4, 1, 7, 8)"),
    ({"input": np.zeros((4, 64), np.float32)}, "has rank 2"),
    ({"input": np.zeros((4, 1, 8, 8), np.int64)}, "has dtype int64"),
    ({"input": np.zeros((0, 1, 8, 8), np.float32)}, "holds no samples"),
    ({"input": np.full((4, 1, 8, 8), np.nan, np.float32)}, "NaN or Inf"),
])
def test_bad_calibration_data(capsys, out, tmp_path, arrays, fragment):
    calib = write_npz(tmp_path / "calib.npz", **arrays)
    assert_user_error(["quantize", MLP, "-o", out, "--calib", calib], capsys, fragment, out)


def test_missing_and_garbage_calibration_file(capsys, out, tmp_path):
    assert_user_error(["quantize", MLP, "-o", out, "--calib", tmp_path / "none.npz"], capsys, "calibration data not found", out)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    assert_user_error(["quantize", MLP, "-o", out, "--calib", garbage], capsys, "cannot read calibration file", out)


def test_output_equal_to_input_is_refused_and_input_untouched(capsys, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(Path(MLP).read_bytes())
    before = model.read_bytes()
    assert_user_error(["quantize", model, "-o", model, "--calib", CALIB], capsys, "same file as")
    assert model.read_bytes() == before


def test_output_folder_missing_or_not_writable(capsys, tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "out.onnx"
    assert_user_error(["quantize", MLP, "-o", missing, "--calib", CALIB], capsys, "does not exist")
    assert_user_error(["quantize", MLP, "-o", "/proc/sys/out.onnx", "--calib", CALIB], capsys, "not writable")


@pytest.mark.parametrize("option, fragment", [
    (["--weight-bits", "9"], "--weight-bits must be one of"),
    (["--act-bits", "4"], "--act-bits must be 8, 16, auto or none"),
    (["--smooth", "2"], "--smooth must be auto, off or a number in (0, 1]"),
    (["--act16-budget", "150%"], "--act16-budget must be a fraction in [0, 1]"),
    (["--method", "magic"], "--method must be one of gpfq, rtn"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--max-patches", "-3"], "--max-patches must be a positive integer"),
    (["--max-rows", "0"], "--max-rows must be a positive integer"),
    (["--threads", "-1"], "--threads must be a non-negative integer"),
    (["--sparsity", "medium:1"], "--sparsity must look like"),
    (["--seed", "abc"], "invalid int value"),
    (["--c", "0"], "C must be > 0"),
    (["--recurrent-format", "int3"], "--recurrent-format"),
    (["--act-placement", "all"], "--act-placement"),
])
def test_invalid_option_values(capsys, out, option, fragment):
    assert_user_error(["quantize", MLP, "-o", out, "--calib", CALIB] + option, capsys, fragment, out)


def test_external_data_outside_model_folder_is_refused(capsys, out, tmp_path):
    model = onnx.load(MLP)
    inner = tmp_path / "model"
    inner.mkdir()
    onnx.save(model, inner / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    loaded = onnx.load(inner / "m.onnx", load_external_data=False)
    for t in loaded.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    (tmp_path / "weights.bin").write_bytes((inner / "weights.bin").read_bytes())
    onnx.save(loaded, inner / "evil.onnx")
    assert_user_error(["quantize", inner / "evil.onnx", "-o", out, "--calib", CALIB], capsys, "outside the model's folder", out)


def test_usage_errors_are_one_line(capsys):
    assert_user_error(["quantize"], capsys, "required")
    assert_user_error(["frobnicate"], capsys, "invalid choice")


def test_help_explains_every_option(capsys):
    for sub in (["--help"], ["quantize", "--help"], ["evaluate", "--help"], ["inspect", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(sub)
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "usage: onnx-gpfq" in text
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    for option in ("--calib", "--weight-bits", "--act-bits", "--method", "--seed", "--sparsity", "--bias-correction",
                   "--scale-rule", "--granularity", "--report", "--exclude"):
        assert option in text


# --- outputs --------------------------------------------------------------------------------

def test_quantize_is_deterministic_and_writes_report(capsys, tmp_path):
    a, b, report = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "report.json"
    assert run(["quantize", MLP, "-o", a, "--calib", CALIB, "--seed", "3", "--report", report], capsys)[0] == 0
    err = capsys.readouterr().err
    assert run(["quantize", MLP, "-o", b, "--calib", CALIB, "--seed", "3", "--quiet"], capsys)[0] == 0
    assert a.read_bytes() == b.read_bytes()
    data = json.loads(report.read_text())
    assert len(data["layers"]) == 3
    assert all(0 <= layer["rel_error"] < 1 for layer in data["layers"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    del err


def test_failed_write_leaves_nothing(monkeypatch, tmp_path):
    from onnx_gpfq import graph

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(graph.os, "fsync", full_disk)
    target = tmp_path / "out.onnx"
    with pytest.raises(Exception):
        graph.save_model(onnx.load(MLP), target)
    assert list(tmp_path.iterdir()) == []


def test_interrupt_leaves_no_output_and_no_temp_files(capsys, monkeypatch, tmp_path, sigint_raises):
    """Ctrl-C (a real SIGINT) while layers are being quantized. The signal is sent by a hook at that
    stage, in the process itself, so the run cannot end before it arrives (no timing)."""
    import importlib
    import tempfile

    pipeline = importlib.import_module("onnx_gpfq.quantize")
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    real, calls = pipeline.core.quantize_layer, []

    def ctrl_c_at_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.core, "quantize_layer", ctrl_c_at_second_layer)
    out = tmp_path / "out.onnx"
    code, _, err = run(["quantize", MODELS / "digits_vit.onnx", "-o", out, "--calib", CALIB, "--memory-budget", "0"], capsys)
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert len(calls) == 2  # it stopped at the layer it was in
    assert list(work.iterdir()) == [] and [p.name for p in tmp_path.iterdir()] == ["tmp"]


# --- evaluate as a CI gate ------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized_mlp(tmp_path_factory):
    path = tmp_path_factory.mktemp("gate") / "mlp.w4.onnx"
    assert main(["quantize", MLP, "-o", str(path), "--calib", CALIB, "--quiet"]) == 0
    return str(path)


def test_evaluate_json(capsys, quantized_mlp):
    code, out, _ = run(["evaluate", MLP, quantized_mlp, "--data", TEST, "--json"], capsys)
    assert code == 0
    models = json.loads(out)["models"]
    assert [m["path"] for m in models] == [MLP, quantized_mlp]
    assert models[0]["agreement"] == 1.0 and models[0]["sqnr_db"] is None
    assert models[1]["accuracy"] > 0.95 and models[1]["sqnr_db"] > 10 and models[1]["latency_ms"] > 0
    assert models[1]["size_bytes"] < models[0]["size_bytes"] / 2


@pytest.mark.parametrize("option, passing, failing", [
    ("--min-accuracy", "0.5", "0.9999"),
    ("--max-accuracy-drop", "50", "-1"),
    ("--min-agreement", "0.5", "1"),
    ("--min-sqnr", "1", "200"),
])
def test_ci_gate_thresholds_both_ways(capsys, quantized_mlp, option, passing, failing):
    assert run(["evaluate", MLP, quantized_mlp, "--data", TEST, option, passing], capsys)[0] == 0
    code, _, err = run(["evaluate", MLP, quantized_mlp, "--data", TEST, option, failing], capsys)
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and option in err


def test_evaluate_bad_data(capsys, tmp_path):
    assert_user_error(["evaluate", MLP, "--data", tmp_path / "none.npz"], capsys, "data file not found")


def test_bias_correction_is_on_by_default_and_can_be_turned_off(capsys, tmp_path):
    """--bias-correction is GPFQ's default (b' = b + mu_X^T W - mu_X~^T Q); --no-bias-correction turns it
    off. Corrected, the quantized model's mean output shift against float, over the calibration
    samples, is smaller. With --method rtn it is off unless asked for."""
    import onnxruntime as ort

    paths = {flag: tmp_path / f"{flag or 'default'}.onnx" for flag in ("", "--bias-correction", "--no-bias-correction")}
    for flag, path in paths.items():
        argv = ["quantize", MLP, "-o", path, "--calib", CALIB, "--weight-bits", "3", "--quiet"] + ([flag] if flag else [])
        assert run(argv, capsys)[0] == 0
    on, off = paths[""].read_bytes(), paths["--no-bias-correction"].read_bytes()
    assert on == paths["--bias-correction"].read_bytes() and on != off
    x = np.load(CALIB)["input"]
    y = ort.InferenceSession(MLP).run(None, {"input": x})[0]
    shift = {flag: np.abs((ort.InferenceSession(str(p)).run(None, {"input": x})[0] - y).mean(axis=0)).mean()
             for flag, p in paths.items()}
    assert shift[""] < 0.5 * shift["--no-bias-correction"], shift
    rtn = {flag: tmp_path / f"rtn{flag or 'default'}.onnx" for flag in ("", "--bias-correction", "--no-bias-correction")}
    for flag, path in rtn.items():
        argv = ["quantize", MLP, "-o", path, "--calib", CALIB, "--weight-bits", "3", "--method", "rtn", "--quiet"]
        assert run(argv + ([flag] if flag else []), capsys)[0] == 0
    assert rtn[""].read_bytes() == rtn["--no-bias-correction"].read_bytes() != rtn["--bias-correction"].read_bytes()


def test_damp_auto_chooses_each_layers_ridge_on_held_out_rows(capsys, tmp_path):
    """--damp auto: per layer a ridge of core.DAMP_CANDIDATES, chosen by fits on 7/8 of the rows (the
    rest held out), then fitted on all of them; reported per layer; deterministic; a bad --damp is one line."""
    from onnx_gpfq.core import DAMP_CANDIDATES

    out, again, report, plain = (tmp_path / n for n in ("a.onnx", "b.onnx", "r.json", "p.json"))
    assert run(["quantize", MLP, "-o", out, "--calib", CALIB, "--damp", "auto", "--report", report, "--quiet"], capsys)[0] == 0
    assert run(["quantize", MLP, "-o", again, "--calib", CALIB, "--damp", "auto", "--quiet"], capsys)[0] == 0
    assert out.read_bytes() == again.read_bytes()
    assert run(["quantize", MLP, "-o", tmp_path / "p.onnx", "--calib", CALIB, "--report", plain, "--quiet"], capsys)[0] == 0
    layers, plain_layers = json.loads(report.read_text())["layers"], json.loads(plain.read_text())["layers"]
    assert all(layer["damp"] in DAMP_CANDIDATES for layer in layers)
    assert [a["rows"] for a in layers] == [b["rows"] for b in plain_layers]  # the final fit uses every row
    for bad in ("-1", "often"):
        assert_user_error(["quantize", MLP, "-o", tmp_path / "x.onnx", "--calib", CALIB, "--damp", bad], capsys, "--damp")


def test_damp_rows_ridges_exactly_the_layers_with_fewer_rows_than_inputs(capsys, tmp_path):
    """--damp rows (the default): core.FEW_ROWS_DAMP on the layers fitted on fewer calibration rows than they
    have inputs (100 samples: digits_mlp's fc2 (256 inputs) and fc3 (128), not fc1 (64)), 0 on the others;
    said in one report line where some are; with every layer well determined it changes nothing."""
    from onnx_gpfq.core import FEW_ROWS_DAMP

    few = tmp_path / "few.npz"
    np.savez(few, input=np.load(CALIB)["input"][:100])
    outs = {}
    for calib, flag in ((few, "rows"), (few, "0"), (Path(CALIB), "rows"), (Path(CALIB), "0")):
        path, report = tmp_path / f"{calib.stem}-{flag}.onnx", tmp_path / f"{calib.stem}-{flag}.json"
        code, out, err = run(["quantize", MLP, "-o", path, "--calib", calib, "--damp", flag, "--report", report], capsys)
        assert code == 0
        layers = json.loads(report.read_text())["layers"]
        outs[calib.stem, flag] = path.read_bytes()
        if flag == "rows":
            fan_in = [layer["weight_shape"][1] for layer in layers]  # Gemm (transB): (outputs, inputs)
            assert [layer["damp"] for layer in layers] == [FEW_ROWS_DAMP if layer["rows"] < n else 0.0
                                                          for layer, n in zip(layers, fan_in)]
            ridged = sum(layer["rows"] < n for layer, n in zip(layers, fan_in))
            assert ridged == (2 if calib == few else 0)
            line = f"--damp rows: {ridged} of {len(layers)} layers had fewer calibration rows than inputs"
            assert (line in out + err) == (ridged > 0)
    assert outs["few", "rows"] != outs["few", "0"]
    assert outs[Path(CALIB).stem, "rows"] == outs[Path(CALIB).stem, "0"]


def test_upstream_share_fixed_or_chosen_per_layer_on_held_out_rows(capsys, tmp_path):
    """--upstream 1 is the default (byte-identical output), 0 changes the codes; auto picks per layer one of
    core.UPSTREAM_CANDIDATES on held-out rows (with --damp auto, a pair), reported per layer and in one line;
    deterministic; every row fitted in the end; a bad --upstream is one line."""
    from onnx_gpfq.core import DAMP_CANDIDATES, UPSTREAM_CANDIDATES

    p = {n: tmp_path / f"{n}.onnx" for n in ("default", "one", "zero", "auto", "again", "both")}
    r = {n: tmp_path / f"{n}.json" for n in p}
    flags = {"default": [], "one": ["--upstream", "1"], "zero": ["--upstream", "0"], "auto": ["--upstream", "auto"],
             "again": ["--upstream", "auto"], "both": ["--upstream", "auto", "--damp", "auto"]}
    printed = {}
    for n, f in flags.items():
        code, out, err = run(["quantize", MLP, "-o", p[n], "--calib", CALIB, "--report", r[n], *f], capsys)
        assert code == 0, n
        printed[n] = out + err
    assert p["one"].read_bytes() == p["default"].read_bytes()
    assert p["zero"].read_bytes() != p["default"].read_bytes()
    assert p["auto"].read_bytes() == p["again"].read_bytes()
    layers = {n: json.loads(r[n].read_text())["layers"] for n in p}
    assert {layer["upstream"] for layer in layers["default"]} == {1.0}
    assert {layer["upstream"] for layer in layers["zero"]} == {0.0}
    assert all(layer["upstream"] in UPSTREAM_CANDIDATES for layer in layers["auto"])
    assert all(layer["upstream"] in UPSTREAM_CANDIDATES and layer["damp"] in DAMP_CANDIDATES for layer in layers["both"])
    assert [a["rows"] for a in layers["auto"]] == [b["rows"] for b in layers["default"]]  # the final fit uses every row
    assert "--upstream auto: layers taking back" in printed["auto"] and "--upstream auto" not in printed["default"]
    for bad in ("-0.5", "2", "some"):
        assert_user_error(["quantize", MLP, "-o", tmp_path / "x.onnx", "--calib", CALIB, "--upstream", bad], capsys,
                          "--upstream")
