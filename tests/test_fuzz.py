"""Seeded fuzzing of the command line with hypothesis: mutated ONNX protobufs of the shipped models
(fields, dims, types, names, graph edges, bytes) and mutated calibration .npz files.

Whatever the input, quantize ends with rc 0 or 2, never a traceback or an internal error (rc 1),
leaves no file behind but its outputs, and when it succeeds the output passes onnx's full checker
and loads in onnxruntime. derandomize=True: the same cases on every run and machine (CI is
reproducible); the CLI runs in-process so that a few hundred cases fit in CI time.
"""

import contextlib
import io
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnx_gpfq.cli import main

MODELS = Path(__file__).resolve().parent.parent / "models"
CALIB = np.load(MODELS / "digits_calib.npz")["input"][:8]
PROTOS = {name: onnx.load(MODELS / f"{name}.onnx") for name in ("digits_mlp", "digits_cnn")}
FAST = ["--quiet", "--max-patches", "2", "--max-rows", "32", "--scale-rule", "fixed", "--batch-size", "4"]
SETTINGS = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MODEL_MUTATIONS = ["op_type", "attribute", "drop_attribute", "init_dims", "init_type", "input_dims", "input_type",
                   "rename_input", "rename_output", "swap_inputs", "drop_node", "drop_initializer", "raw_data",
                   "output_name", "opset", "bytes", "truncate"]
OPS = ["Relu", "Conv", "Gemm", "MatMul", "Add", "Identity", "Reshape", "Flatten", "Softmax", "NoSuchOp", ""]
TYPES = [onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64,
         onnx.TensorProto.INT8, onnx.TensorProto.BOOL, onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED, 999]
NAMES = ["", "input", "logits", "x", "W", "nosuch"]
NUMBERS = [-1, 0, 1, 2, 3, 7, 8, 64, 2**31, -(2**40)]


def mutate_model(proto: onnx.ModelProto, steps) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    data = None
    for kind, a, b in steps:
        node = g.node[a % len(g.node)] if len(g.node) else None
        init = g.initializer[a % len(g.initializer)] if len(g.initializer) else None
        number = NUMBERS[b % len(NUMBERS)]
        if kind == "op_type" and node is not None:
            node.op_type = OPS[b % len(OPS)]
        elif kind == "attribute" and node is not None and node.attribute:
            attr = node.attribute[b % len(node.attribute)]
            if attr.type == onnx.AttributeProto.INT:
                attr.i = number
            elif attr.type == onnx.AttributeProto.INTS and attr.ints:
                attr.ints[b % len(attr.ints)] = number
            elif attr.type == onnx.AttributeProto.FLOAT:
                attr.f = float(["nan", "inf", "0", "-1"][b % 4])
        elif kind == "drop_attribute" and node is not None and node.attribute:
            del node.attribute[b % len(node.attribute)]
        elif kind == "init_dims" and init is not None and init.dims:
            init.dims[b % len(init.dims)] = number
        elif kind == "init_type" and init is not None:
            init.data_type = TYPES[b % len(TYPES)]
        elif kind == "input_dims" and g.input[0].type.tensor_type.shape.dim:
            dims = g.input[0].type.tensor_type.shape.dim
            dims[b % len(dims)].dim_value = max(number, 0)
        elif kind == "input_type":
            g.input[0].type.tensor_type.elem_type = TYPES[b % len(TYPES)]
        elif kind == "rename_input" and node is not None and node.input:
            node.input[b % len(node.input)] = NAMES[a % len(NAMES)]
        elif kind == "rename_output" and node is not None and node.output:
            node.output[0] = NAMES[b % len(NAMES)] if b % 3 else g.node[b % len(g.node)].output[0]
        elif kind == "swap_inputs" and node is not None and len(node.input) > 1:
            node.input[0], node.input[1] = node.input[1], node.input[0]
        elif kind == "drop_node" and node is not None:
            g.node.remove(node)
        elif kind == "drop_initializer" and init is not None:
            g.initializer.remove(init)
        elif kind == "raw_data" and init is not None and init.raw_data:
            raw = bytearray(init.raw_data)
            if b % 2:
                raw = raw[: b % len(raw)]
            else:
                raw[b % len(raw)] = 0xFF  # 0xFF... in the exponent byte: NaN or a huge float
                raw[(b + 1) % len(raw)] = 0xFF
            init.raw_data = bytes(raw)
        elif kind == "output_name":
            g.output[0].name = NAMES[b % len(NAMES)]
        elif kind == "opset":
            m.opset_import[0].version = [1, 7, 11, 13, 21, 30][b % 6]
        elif kind in ("bytes", "truncate"):
            data = bytearray(m.SerializeToString() if data is None else data)
            if not data:
                continue
            if kind == "bytes":
                for i in range(1 + b % 4):
                    data[(a + 7919 * i) % len(data)] ^= 1 << (b % 8)
            else:
                data = data[: a % len(data)]
            continue
    return bytes(data) if data is not None else m.SerializeToString()


CALIB_MUTATIONS = ["dtype", "shape", "nan", "rename", "extra", "empty", "flip", "truncate", "scalar", "object"]


def mutate_calib(path: Path, steps) -> None:
    arrays = {"input": CALIB.copy()}
    raw = None
    for kind, a, b in steps:
        x = arrays.get("input")
        if kind == "dtype" and x is not None:
            with np.errstate(invalid="ignore"):
                arrays["input"] = x.astype([np.float64, np.float16, np.int64, np.uint8, np.bool_, np.complex64][b % 6])
        elif kind == "shape" and x is not None and x.ndim:
            shape = [(-1, 64), (-1, 2, 8, 8), (-1, 1, 64, 1), (-1,), (-1, 1, 8, 8, 1)][b % 5]
            if x.size % abs(int(np.prod(shape))) == 0:
                arrays["input"] = x.reshape(shape)
        elif kind == "nan" and x is not None and x.dtype.kind == "f" and x.ndim and x.size:
            x.reshape(-1)[a % x.size] = [np.nan, np.inf, -np.inf, 1e38][b % 4]
        elif kind == "rename" and x is not None:
            arrays[["labels", "x", "input.npy", ""][b % 4]] = arrays.pop("input")
        elif kind == "extra" and b % 3 != 2:
            arrays[f"extra{b % 3}"] = np.zeros((b % 5, 3), np.float32)
        elif kind == "empty" and x is not None and x.ndim:
            arrays["input"] = x[: b % 2]
        elif kind == "scalar":
            arrays["input"] = np.float32(b)
        elif kind == "object" and x is not None and x.ndim:
            arrays["input"] = x.astype(object)
    buf = io.BytesIO()
    if any(v.dtype == object for v in map(np.asarray, arrays.values())):  # written by hand: np.savez pickles
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("input.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (8,), }"
                        + b" " * 45 + b"\n" + b"\x80\x04" * 8)
    else:
        (np.savez_compressed if any(k == "flip" for k, _, _ in steps) else np.savez)(buf, **arrays)
    raw = bytearray(buf.getvalue())
    for kind, a, b in steps:
        if not raw:
            break
        if kind == "flip":
            for i in range(1 + b % 8):
                raw[(a + 104729 * i) % len(raw)] ^= 0x55
        elif kind == "truncate":
            raw = raw[: a % len(raw)]
    path.write_bytes(bytes(raw))


def check_run(argv: list[str], work: Path, expected_outputs: set[str]) -> None:
    before = {p.name for p in work.iterdir()}
    err = io.StringIO()
    old_tmp = tempfile.tempdir
    spare = work / "tmp"
    spare.mkdir()
    tempfile.tempdir = str(spare)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        tempfile.tempdir = old_tmp
    text = err.getvalue()
    assert code in (0, 2), text
    assert "Traceback" not in text and "internal error" not in text, text
    assert list(spare.iterdir()) == [], "temporary files left behind"
    spare.rmdir()
    after = {p.name for p in work.iterdir()}
    if code == 2:
        assert after == before, f"rc 2 but files changed: {after ^ before}"
        assert len(text.strip().splitlines()) == 1 or text.count("onnx-gpfq: error:") == 1, text
    else:
        assert after - before <= expected_outputs and "out.onnx" in after, after - before
        onnx.checker.check_model(str(work / "out.onnx"), full_check=True)
        ort.InferenceSession(str(work / "out.onnx"), providers=["CPUExecutionProvider"])


steps_model = st.lists(st.tuples(st.sampled_from(MODEL_MUTATIONS), st.integers(0, 10**6), st.integers(0, 10**6)),
                       min_size=1, max_size=3)
steps_calib = st.lists(st.tuples(st.sampled_from(CALIB_MUTATIONS), st.integers(0, 10**6), st.integers(0, 10**6)),
                       min_size=1, max_size=3)


@settings(SETTINGS, max_examples=200)
@given(name=st.sampled_from(sorted(PROTOS)), steps=steps_model)
def test_fuzz_mutated_models(name, steps):
    with tempfile.TemporaryDirectory(prefix="fuzz_") as tmp:
        work = Path(tmp)
        (work / "model.onnx").write_bytes(mutate_model(PROTOS[name], steps))
        np.savez(work / "calib.npz", input=CALIB)
        check_run(["quantize", str(work / "model.onnx"), "-o", str(work / "out.onnx"), "--calib", str(work / "calib.npz"),
                   "--report", str(work / "r.json")] + FAST, work, {"out.onnx", "r.json"})


@settings(SETTINGS, max_examples=120)
@given(steps=steps_calib)
def test_fuzz_mutated_calibration(steps):
    with tempfile.TemporaryDirectory(prefix="fuzz_") as tmp:
        work = Path(tmp)
        mutate_calib(work / "calib.npz", steps)
        check_run(["quantize", str(MODELS / "digits_mlp.onnx"), "-o", str(work / "out.onnx"), "--calib",
                   str(work / "calib.npz")] + FAST, work, {"out.onnx"})
