"""Nothing lost, nothing silently wrong: one test (or one parametrised family) per class of hostile
input. Each failure is exit status 2 with one line on stderr, no traceback, no file written and no
input modified; rc 1 stays for bugs."""

import errno
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gpfq import Options, quantize
from onnx_gpfq.cli import main
from onnx_gpfq.errors import UserError

MODELS = Path(__file__).resolve().parent.parent / "models"
MLP = str(MODELS / "digits_mlp.onnx")
CALIB = str(MODELS / "digits_calib.npz")
TEST = str(MODELS / "digits_test.npz")
FAST = ["--quiet", "--max-patches", "4", "--max-rows", "64", "--scale-rule", "fixed"]


def run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def listing(folder):
    return sorted((p.name, p.stat().st_size) for p in Path(folder).iterdir())


def assert_refused(argv, capsys, fragment, folder=None):
    """rc 2, one line naming the problem, no traceback; ``folder`` (where outputs go) unchanged."""
    before = listing(folder) if folder else None
    code, _, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("onnx-gpfq: error:") and fragment in lines[0], err
    if folder:
        assert listing(folder) == before
    return lines[0]


@pytest.fixture(scope="module")
def small_calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "small.npz"
    np.savez(path, input=np.load(CALIB)["input"][:16])
    return str(path)


def mlp_with_external_data(folder, location="weights.bin"):
    model = onnx.load(MLP)
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)
    return folder / "m.onnx"


# --- 1. an output never lands on an input or on another output -------------------------------

@pytest.mark.parametrize("case", ["external_data_of_input", "output_data_is_input_data", "config", "report_is_output",
                                  "symlink_to_input", "hard_link_to_input", "report_is_calibration", "calib_in_folder"])
def test_outputs_never_overwrite_inputs(capsys, tmp_path, small_calib, case):
    config = tmp_path / "config.json"
    config.write_text('{"exclude": []}')
    calib_dir = tmp_path / "calib"
    calib_dir.mkdir()
    np.savez(calib_dir / "a.npz", input=np.load(small_calib)["input"])
    if case == "output_data_is_input_data":  # the input keeps its weights in b.onnx.data
        model = mlp_with_external_data(tmp_path, "b.onnx.data")
    else:
        model = mlp_with_external_data(tmp_path)
    argv = ["quantize", model, "--calib", small_calib, "--config", config] + FAST
    out = tmp_path / "out.onnx"
    extra = {
        "external_data_of_input": ["-o", tmp_path / "weights.bin"],
        "output_data_is_input_data": ["-o", tmp_path / "b.onnx", "--external-data"],
        "config": ["-o", out, "--report", config],
        "report_is_output": ["-o", out, "--report", out],
        "symlink_to_input": ["-o", tmp_path / "link.onnx"],
        "hard_link_to_input": ["-o", tmp_path / "hard.onnx"],
        "report_is_calibration": ["-o", out, "--report", small_calib],
        "calib_in_folder": ["-o", calib_dir / "a.npz"],
    }[case]
    if case == "calib_in_folder":
        argv[argv.index("--calib") + 1] = calib_dir
    if case == "symlink_to_input":
        os.symlink(model, tmp_path / "link.onnx")
    if case == "hard_link_to_input":
        os.link(tmp_path / "weights.bin", tmp_path / "hard.onnx")
    inputs = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert_refused(argv + extra, capsys, "same file as", tmp_path)
    assert {p: p.read_bytes() for p in inputs} == inputs


# --- 2. numbers: finite and in range; computed steps finite and > 0 ---------------------------

@pytest.mark.parametrize("option, fragment", [
    (["--scale-rule", "fixed", "--c", "1e-300"], "C must be > 0"),
    (["--c", "nan"], "C must be > 0"), (["--c", "inf"], "C must be > 0"),
    (["--percentile", "nan"], "--percentile"), (["--memory-budget", "nan"], "--memory-budget"),
    (["--memory-budget", "inf"], "--memory-budget"), (["--memory-budget", "12Q"], "size like 512M or 2G"),
    (["--memory-budget=-1M"], "must not be negative"), (["--memory-budget", "1.5.G"], "size like 512M or 2G"),
    (["--sparsity", "soft:nan"], "--sparsity"),
    (["--image-scale", "nan"], "image scale"), (["--block-size", "99999999999"], "--block-size"),
])
def test_numeric_options_finite_and_in_range(capsys, tmp_path, option, fragment):
    assert_refused(["quantize", MLP, "-o", tmp_path / "o.onnx", "--calib", CALIB] + option, capsys, fragment, tmp_path)


@pytest.mark.parametrize("option", [["--min-accuracy", "nan"], ["--min-sqnr", "nan"], ["--max-accuracy-drop", "nan"],
                                    ["--min-agreement", "-0.5"], ["--min-accuracy", "2"], ["--min-sqnr", "inf"]])
def test_evaluate_thresholds_finite_and_in_range(capsys, option):
    assert_refused(["evaluate", MLP, MLP, "--data", TEST] + option, capsys, option[0])


def tiny_gemm(tmp_path, W, B=None, name="gemm.onnx", dtype=TensorProto.FLOAT):
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    inits = [numpy_helper.from_array(W.astype(np_type), "W")]
    if B is not None:
        inits.append(numpy_helper.from_array(B.astype(np_type), "B"))
    node = helper.make_node("Gemm", ["x", "W"] + (["B"] if B is not None else []), ["y"], name="gemm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", dtype, ["N", W.shape[0]])],
                              [helper.make_tensor_value_info("y", dtype, ["N", W.shape[1]])], inits)
    path = tmp_path / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_computed_steps_that_underflow_are_refused(capsys, tmp_path):
    W = np.full((6, 3), 1e-39, np.float32)  # C * max|w| / K underflows float32 at C = 1e-6
    model = tiny_gemm(tmp_path, W)
    np.savez(tmp_path / "x.npz", x=np.ones((8, 6), np.float32))
    assert_refused(["quantize", model, "-o", tmp_path / "o.onnx", "--calib", tmp_path / "x.npz", "--scale-rule", "fixed",
                    "--c", "1e-6", "--quiet"], capsys, "weight step is 0.0", tmp_path)


# --- 3. config types checked exactly ----------------------------------------------------------

@pytest.mark.parametrize("entry, fragment", [
    ({"match": "*", "exclude": "false"}, "layers[0].exclude must be true/false"),
    ({"match": "*", "block_size": True}, "layers[0].block_size must be an integer"),
    ({"match": "*", "weight_bits": True}, "layers[0].weight_bits"),
    ({"match": "*", "c": "1"}, "layers[0].c must be"),
    ({"match": 3}, "string 'match'"),
])
def test_config_types_exact(capsys, tmp_path, entry, fragment):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"layers": [entry]}))
    assert_refused(["quantize", MLP, "-o", tmp_path / "o.onnx", "--calib", CALIB, "--config", config], capsys, fragment, tmp_path)


def test_config_nested_too_deeply_and_api_types(capsys, tmp_path):
    config = tmp_path / "c.json"
    config.write_text("[" * 200000 + "]" * 200000)
    assert_refused(["quantize", MLP, "-o", tmp_path / "o.onnx", "--calib", CALIB, "--config", config], capsys, "nested too deeply")
    for bad in ({"block_size": True}, {"batch_size": 2.0}, {"bias_correction": "false"}, {"c": float("nan")}):
        with pytest.raises(UserError):
            Options(**bad)


# --- 4. evaluate on mismatched inputs -----------------------------------------------------------

def test_evaluate_one_hot_labels_are_argmaxed(capsys, tmp_path):
    data = np.load(TEST)
    onehot = np.eye(10, dtype=np.float32)[data["labels"]]
    np.savez(tmp_path / "onehot.npz", input=data["input"], labels=onehot)
    code, out_idx, _ = run(["evaluate", MLP, "--data", TEST, "--json"], capsys)
    code2, out_hot, _ = run(["evaluate", MLP, "--data", tmp_path / "onehot.npz", "--json"], capsys)
    assert code == code2 == 0
    assert json.loads(out_idx)["models"][0]["accuracy"] == json.loads(out_hot)["models"][0]["accuracy"] > 0.9
    np.savez(tmp_path / "soft.npz", input=data["input"], labels=onehot * 0.5)
    assert_refused(["evaluate", MLP, "--data", tmp_path / "soft.npz"], capsys, "not one-hot")


def test_evaluate_mismatches_are_refused(capsys, tmp_path):
    data = np.load(TEST)
    np.savez(tmp_path / "short.npz", input=data["input"], labels=data["labels"][:10])
    assert_refused(["evaluate", MLP, "--data", tmp_path / "short.npz"], capsys, "holds 10 entries for 500 samples")
    np.savez(tmp_path / "missing.npz", other=data["input"])
    assert_refused(["evaluate", MLP, "--data", tmp_path / "missing.npz"], capsys, "no array for model input 'input'")
    assert_refused(["evaluate", MLP, "--data", TEST, "--batch-size", "0"], capsys, "--batch-size")
    flat = helper.make_graph([helper.make_node("Flatten", ["input"], ["y"])], "g",
                             [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])])
    onnx.save(helper.make_model(flat, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "flat.onnx")
    assert_refused(["evaluate", MLP, tmp_path / "flat.onnx", "--data", TEST], capsys, "do not compute the same thing")
    renamed = onnx.load(MLP)
    old = renamed.graph.input[0].name
    renamed.graph.input[0].name = "pixels"
    for node in renamed.graph.node:
        node.input[:] = ["pixels" if n == old else n for n in node.input]
    onnx.save(renamed, tmp_path / "renamed.onnx")
    assert_refused(["evaluate", MLP, tmp_path / "renamed.onnx", "--data", TEST], capsys, "takes inputs ['pixels']")


# --- 5. exact zeros ------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity, all_zero", [("channel", False), ("channel", True), ("tensor", True)])
def test_zero_channels_reproduce_their_bias_exactly(granularity, all_zero):
    rng = np.random.default_rng(1)
    W = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    W[1] = 0
    if all_zero:
        W[:] = 0
    B = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])],
                              [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((16, 2, 6, 6)).astype(np.float32)
    q, _ = quantize(model, {"x": x}, Options(quiet=True, granularity=granularity))
    assert any(n.op_type == "DequantizeLinear" and n.input[0].endswith("B_quantized") for n in q.graph.node)  # int32 bias
    q.graph.output.append(helper.make_tensor_value_info("y_float", TensorProto.FLOAT, None))  # before the output's QDQ
    y = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y_float"], {"x": x})[0]
    zero = [1] if not all_zero else [0, 1, 2, 3]
    for j in zero:
        assert np.array_equal(y[:, j], np.full_like(y[:, j], B[j])), (j, np.abs(y[:, j] - B[j]).max())


# --- 6. resource bombs --------------------------------------------------------------------------

def npy_header_claiming(shape, dtype="<f4"):
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def test_unused_npz_members_are_never_read_and_claims_are_checked(capsys, tmp_path, small_calib):
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w") as zf:
        zf.writestr("input.npy", (lambda a: (lambda b: (np.save(b, a), b.getvalue())[1])(__import__("io").BytesIO()))(
            np.load(small_calib)["input"]))
        zf.writestr("unused.npy", npy_header_claiming((10**7, 10**7)))  # 400 TB if anyone read it
    out = tmp_path / "o.onnx"
    assert run(["quantize", MLP, "-o", out, "--calib", bomb] + FAST, capsys)[0] == 0
    huge = tmp_path / "huge.npz"  # compressed: it would be read into memory, so the claim is checked first
    with zipfile.ZipFile(huge, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("input.npy", npy_header_claiming((10**7, 1, 10**4, 10**4)))
    assert_refused(["quantize", MLP, "-o", tmp_path / "o2.onnx", "--calib", huge], capsys, "of memory available")
    stored = tmp_path / "stored.npz"  # uncompressed: read batch by batch from the file, which must hold it all
    with zipfile.ZipFile(stored, "w") as zf:
        zf.writestr("input.npy", npy_header_claiming((10**7, 1, 10**4, 10**4)))
    assert_refused(["quantize", MLP, "-o", tmp_path / "o2.onnx", "--calib", stored], capsys, "is truncated")
    assert_refused(["quantize", MLP, "-o", tmp_path / "o2.onnx", "--calib", "random:1000000000000"], capsys,
                   "of memory available")


# --- 7. expected conditions exit 2, not 1 -------------------------------------------------------

def _fifo(tmp_path):
    path = tmp_path / "fifo.npz"
    os.mkfifo(path)
    return path


def _npy_folder(tmp_path, content):
    folder = tmp_path / "npy"
    folder.mkdir()
    (folder / "a.npy").write_bytes(content)
    return folder


def _corrupt_deflate(tmp_path, small_calib):
    path = tmp_path / "corrupt.npz"
    np.savez_compressed(path, input=np.load(small_calib)["input"])
    data = bytearray(path.read_bytes())
    for i in range(200, 400):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("case, fragment", [
    ("object_npy", "Python objects"), ("corrupt_npy", "cannot read"), ("corrupt_deflate", "cannot read calibration file"),
    ("fifo", "neither a regular file nor a folder"),
])
def test_bad_calibration_files_exit_2(capsys, tmp_path, small_calib, case, fragment):
    calib = {
        "object_npy": lambda: _npy_folder(tmp_path, npy_header_claiming((2,), "|O") + b"\x80" * 16),
        "corrupt_npy": lambda: _npy_folder(tmp_path, b"\x93NUMPY\x01\x00garbage"),
        "corrupt_deflate": lambda: _corrupt_deflate(tmp_path, small_calib),
        "fifo": lambda: _fifo(tmp_path),
    }[case]()
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(["quantize", MLP, "-o", out / "o.onnx", "--calib", calib] + FAST, capsys, fragment, out)


@pytest.mark.parametrize("offset, length, fragment", [(-8, None, "do not fit"), (0, 10**9, "do not fit"), (0, 8, "need")])
def test_bad_external_data_offsets_exit_2(capsys, tmp_path, small_calib, offset, length, fragment):
    model = mlp_with_external_data(tmp_path)
    proto = onnx.load(model, load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.external_data)
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(offset)
        if entry.key == "length" and length is not None:
            entry.value = str(length)
    onnx.save(proto, model)
    out = tmp_path / "out"
    out.mkdir()
    assert_refused(["quantize", model, "-o", out / "o.onnx", "--calib", small_calib] + FAST, capsys, fragment, out)


def test_model_without_inputs_and_nan_weights_exit_2(capsys, tmp_path, small_calib):
    W = np.ones((4, 3), np.float32)
    const = helper.make_node("Constant", [], ["x"], value=numpy_helper.from_array(np.ones((2, 4), np.float32)))
    graph = helper.make_graph([const, helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [numpy_helper.from_array(W, "W")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "noin.onnx")
    assert_refused(["quantize", tmp_path / "noin.onnx", "-o", tmp_path / "o.onnx", "--calib", "random:4"], capsys, "no inputs")
    W = np.ones((6, 3), np.float32)
    W[2, 1] = np.nan
    model = tiny_gemm(tmp_path, W)
    np.savez(tmp_path / "x.npz", x=np.ones((8, 6), np.float32))
    assert_refused(["quantize", model, "-o", tmp_path / "o.onnx", "--calib", tmp_path / "x.npz"], capsys, "NaN or Inf")


def test_float64_model_is_quantized_with_its_interface_kept(capsys, tmp_path):
    rng = np.random.default_rng(0)
    model = tiny_gemm(tmp_path, rng.standard_normal((6, 3)), rng.standard_normal(3), dtype=TensorProto.DOUBLE)
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((16, 6)))
    out = tmp_path / "o.onnx"
    assert run(["quantize", model, "-o", out, "--calib", tmp_path / "x.npz", "--quiet"], capsys)[0] == 0
    onnx.checker.check_model(str(out), full_check=True)
    x = rng.standard_normal((4, 6))
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert y.dtype == np.float64 and np.abs(y - ref).max() < 0.2 * np.abs(ref).max()


def test_longest_legal_file_name_works(capsys, tmp_path, small_calib):
    out = tmp_path / ("m" * 245 + ".onnx")  # 250 bytes
    assert run(["quantize", MLP, "-o", out, "--calib", small_calib, "--external-data"] + FAST, capsys)[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, out.name + ".data"])


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
@pytest.mark.parametrize("where", ["fsync", "mkstemp"])  # a full disk while writing; no inode left to create a file
def test_full_disk_or_quota_exits_2_and_leaves_nothing(capsys, monkeypatch, tmp_path, small_calib, code, where):
    from onnx_gpfq import outputs as graph

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(graph.os if where == "fsync" else graph.tempfile, where, fail)
    assert_refused(["quantize", MLP, "-o", tmp_path / "o.onnx", "--calib", small_calib, "--report", tmp_path / "r.json"]
                   + FAST, capsys, os.strerror(code), tmp_path)


def test_inspect_on_unloadable_model_and_constant_scales(capsys, tmp_path, small_calib):
    bad = onnx.load(MLP)
    bad.graph.node[0].op_type = "NoSuchOp"
    onnx.save(bad, tmp_path / "bad.onnx")
    line = assert_refused(["inspect", tmp_path / "bad.onnx"], capsys, "onnxruntime cannot load")
    assert "onnx_gpfq_" not in line and str(tmp_path / "bad.onnx") in line
    q = tmp_path / "q.onnx"
    assert run(["quantize", MLP, "-o", q, "--calib", small_calib] + FAST, capsys)[0] == 0
    code, plain, _ = run(["inspect", q, "--json"], capsys)
    model = onnx.load(q)  # move every DequantizeLinear scale into a Constant node
    scales = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    inits = [t for t in model.graph.initializer if t.name in scales]
    for t in inits:
        model.graph.initializer.remove(t)
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in inits]
    nodes = consts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, tmp_path / "const.onnx")
    code2, moved, _ = run(["inspect", tmp_path / "const.onnx", "--json"], capsys)
    assert code == code2 == 0
    assert json.loads(plain)["layers"] == json.loads(moved)["layers"]


# --- 8. endings: signals clean up; outputs all or none -----------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_clean_up_like_ctrl_c(capsys, monkeypatch, tmp_path, small_calib, signum, sigint_raises):
    """The signal is sent from inside the run, at a known stage (the first layer's GPFQ, with the
    activations spilled to disk): no timing involved."""
    import tempfile

    import importlib

    pipeline = importlib.import_module("onnx_gpfq.quantize")

    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    real = pipeline.core.quantize_layer
    seen = []

    def hook(*args, **kwargs):
        seen.append(sorted(p.name for p in work.iterdir()))
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.core, "quantize_layer", hook)
    out = tmp_path / "o.onnx"
    code, _, err = run(["quantize", MLP, "-o", out, "--calib", small_calib, "--memory-budget", "0"] + FAST, capsys)
    assert code == 128 + signum, err
    assert "interrupted" in err and "Traceback" not in err
    assert seen and any(name.startswith("onnx_gpfq_spill_") for name in seen[0])  # the spill folder existed
    assert list(work.iterdir()) == [] and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]


def test_sigterm_in_a_real_process_cleans_up(tmp_path, small_calib):
    """The handlers main installs, in a process of its own; the signal comes from a hook at a known stage."""
    script = (
        "import os, signal, sys\n"
        "import importlib\n"
        "q = importlib.import_module('onnx_gpfq.quantize')\n"
        "real = q.core.quantize_layer\n"
        "def hook(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*a, **k)\n"
        "q.core.quantize_layer = hook\n"
        "from onnx_gpfq.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    work, out = tmp_path / "tmp", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    env = dict(os.environ, TMPDIR=str(work))
    proc = subprocess.run([sys.executable, "-c", script, "quantize", MLP, "-o", str(out / "o.onnx"), "--calib",
                           small_calib, "--memory-budget", "0"] + FAST, capture_output=True, env=env, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert b"Traceback" not in proc.stderr
    assert not [p for p in work.iterdir() if p.name.startswith("onnx_gpfq")] and list(out.iterdir()) == []


def test_outputs_are_committed_together(capsys, monkeypatch, tmp_path, small_calib):
    from onnx_gpfq import outputs as graph

    real = graph._stage_bytes

    def report_fails(out, data, staged):
        if out.name == "r.json":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(out, data, staged)

    monkeypatch.setattr(graph, "_stage_bytes", report_fails)
    assert_refused(["quantize", MLP, "-o", tmp_path / "o.onnx", "--calib", small_calib, "--report", tmp_path / "r.json"]
                   + FAST, capsys, "cannot write", tmp_path)

    monkeypatch.undo()
    calls = []

    def interrupted(src, dst):  # Ctrl-C after every temporary file is written, at the first rename
        calls.append(dst)
        raise KeyboardInterrupt

    monkeypatch.setattr(graph.os, "replace", interrupted)
    code, _, _ = run(["quantize", MLP, "-o", tmp_path / "o.onnx", "--calib", small_calib, "--report", tmp_path / "r.json"]
                     + FAST, capsys)
    assert code == 130 and len(calls) == 1 and list(tmp_path.iterdir()) == []


# --- 9. never a silent drop -------------------------------------------------------------------

def test_mixed_folder_is_refused_and_dropped_samples_are_said(capsys, tmp_path, small_calib):
    folder = tmp_path / "mixed"
    folder.mkdir()
    data = np.load(small_calib)["input"]
    np.savez(folder / "a.npz", input=data)
    np.save(folder / "b.npy", data)
    assert_refused(["quantize", MLP, "-o", tmp_path / "o.onnx", "--calib", folder], capsys, ".npz and .npy")
    fixed = onnx.load(MLP)
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(fixed, tmp_path / "fixed.onnx")
    np.savez(tmp_path / "six.npz", input=data[:6])
    code, _, err = run(["quantize", tmp_path / "fixed.onnx", "-o", tmp_path / "o.onnx", "--calib", tmp_path / "six.npz"]
                       + FAST, capsys)
    assert code == 0
    assert err.strip().splitlines() == ["onnx-gpfq: warning: " + f"{tmp_path / 'six.npz'}: the model takes batches of "
                                        "exactly 4: using 4 of the 6 samples"]


# --- 10. messages name the user's file ----------------------------------------------------------

def test_onnxruntime_errors_name_the_users_file(capsys, tmp_path, small_calib):
    bad = onnx.load(MLP)
    bad.graph.node[-1].op_type = "NoSuchOp"
    onnx.save(bad, tmp_path / "bad.onnx")
    line = assert_refused(["quantize", tmp_path / "bad.onnx", "-o", tmp_path / "o.onnx", "--calib", small_calib],
                          capsys, "onnxruntime cannot load")
    assert str(tmp_path / "bad.onnx") in line and "onnx_gpfq_" not in line and "in.onnx" not in line
