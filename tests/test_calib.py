"""Calibration sources, batch axes, validation, and the spill path."""

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gpfq import quantize
from onnx_gpfq.calib import ImageOptions, InputSpec, load_batches
from onnx_gpfq.cli import main
from onnx_gpfq.errors import UserError
from onnx_gpfq.capture import Spill, inputs
from onnx_gpfq.npyfile import FileArray

MODELS = Path(__file__).resolve().parent.parent / "models"
CALIB = MODELS / "digits_calib.npz"
DIGITS = np.load(CALIB)["input"]
SPEC = [InputSpec("input", np.dtype(np.float32), (None, 1, 8, 8))]


def stacked(batches, name="input"):
    return np.concatenate([b[name] for b in batches])


def test_npz_is_split_into_batches():
    batches = load_batches(str(CALIB), SPEC, 100)
    assert [b["input"].shape[0] for b in batches] == [100, 100, 56]
    np.testing.assert_array_equal(stacked(batches), DIGITS)


def test_uncompressed_npz_stays_in_its_file_until_each_batch_is_read(tmp_path):
    """lazy=True: an np.savez file gives FileArray batches into the file (nothing read but the
    NaN check), equal to the data; np.savez_compressed gives arrays; a NaN is still refused."""
    lazy = load_batches(str(CALIB), SPEC, 100, lazy=True)
    assert all(isinstance(b["input"], FileArray) for b in lazy)
    assert [b["input"].shape for b in lazy] == [(100, 1, 8, 8), (100, 1, 8, 8), (56, 1, 8, 8)]
    np.testing.assert_array_equal(np.concatenate([b["input"].read() for b in lazy]), DIGITS)
    np.savez_compressed(tmp_path / "z.npz", input=DIGITS)
    packed = load_batches(str(tmp_path / "z.npz"), SPEC, 100, lazy=True)
    assert all(type(b["input"]) is np.ndarray for b in packed)
    np.testing.assert_array_equal(stacked(packed), DIGITS)
    bad = DIGITS.copy()
    bad[130, 0, 3, 3] = np.nan
    np.savez(tmp_path / "nan.npz", input=bad)
    with pytest.raises(UserError, match="NaN or Inf"):
        load_batches(str(tmp_path / "nan.npz"), SPEC, 100, lazy=True)


def test_quantize_from_a_file_left_on_disk_matches_arrays_in_memory(tmp_path):
    """The same model, byte for byte, whether the calibration set is read from its .npz batch by
    batch or given as arrays; the batches left in the file count nothing against the budget,
    and the file is not changed."""
    before = CALIB.read_bytes()
    from_file, r1 = quantize(MODELS / "digits_cnn.onnx", str(CALIB), quiet=True)
    from_memory, r2 = quantize(MODELS / "digits_cnn.onnx", {"input": DIGITS}, quiet=True)
    assert from_file.SerializeToString() == from_memory.SerializeToString()
    assert CALIB.read_bytes() == before
    spill = Spill(budget=1 << 30, folder=str(tmp_path))
    held = inputs(load_batches(str(CALIB), SPEC, 100, lazy=True), spill)
    assert spill.in_memory == 0 and not list(tmp_path.iterdir())  # neither counted nor copied
    np.testing.assert_array_equal(np.concatenate(list(held["input"])), DIGITS)
    spill.release_all(held["input"])
    assert CALIB.exists() and CALIB.read_bytes() == before  # released: the user's file stays


def test_folder_of_npz_files_reads_in_name_order(tmp_path):
    np.savez(tmp_path / "b.npz", input=DIGITS[100:])
    np.savez(tmp_path / "a.npz", input=DIGITS[:100])
    np.testing.assert_array_equal(stacked(load_batches(tmp_path, SPEC, 64)), DIGITS)


def test_folder_of_npy_samples(tmp_path):
    for i in range(10):
        np.save(tmp_path / f"{i:03d}.npy", DIGITS[i])  # one sample per file, no batch axis
    np.testing.assert_array_equal(stacked(load_batches(tmp_path, SPEC, 4)), DIGITS[:10])


def test_folder_of_images_with_preprocessing(tmp_path):
    Image = pytest.importorskip("PIL.Image")  # Pillow is in the test extra; this guards plain installs
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 12, 16, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(tmp_path / f"img{i}.png")
    spec = [InputSpec("image", np.dtype(np.float32), (None, 3, 12, 16))]
    opts = ImageOptions(resize="stretch", scale=1 / 255, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), channels="BGR")
    got = stacked(load_batches(tmp_path, spec, 2, images=opts), "image")
    expected = ((pixels[..., ::-1] / 255 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.3])).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    nhwc = [InputSpec("image", np.dtype(np.float32), (None, 8, 8, 3))]
    crop = stacked(load_batches(tmp_path, nhwc, 3, images=ImageOptions(layout="NHWC")), "image")
    assert crop.shape == (3, 8, 8, 3) and 0 <= crop.min() and crop.max() <= 1


def test_random_data_needs_shapes_for_symbolic_dims():
    spec = [InputSpec("x", np.dtype(np.float32), (None, 3, None, None)), InputSpec("ids", np.dtype(np.int64), (None, 5))]
    with pytest.raises(UserError, match=r"--input-shape x:1x3x1x1"):
        load_batches("random:4", spec, 2)
    batches = load_batches("random:5", spec, 2, input_shapes={"x": (1, 3, 16, 16)}, seed=1)
    assert [b["x"].shape for b in batches] == [(2, 3, 16, 16), (2, 3, 16, 16), (1, 3, 16, 16)]
    assert batches[0]["ids"].dtype == np.int64 and batches[0]["ids"].max() < 10
    again = load_batches("random:5", spec, 2, input_shapes={"x": (1, 3, 16, 16)}, seed=1)
    np.testing.assert_array_equal(batches[0]["x"], again[0]["x"])  # seeded


def test_python_iterables_and_ort_data_readers():
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": DIGITS[i:i + 16]} for i in range(0, 64, 16)])

        def get_next(self):
            return next(self.items, None)

    from_reader = load_batches(Reader(), SPEC, 999)
    from_list = load_batches([{"input": DIGITS[i:i + 16]} for i in range(0, 64, 16)], SPEC, 999)
    assert len(from_reader) == len(from_list) == 4
    np.testing.assert_array_equal(stacked(from_reader), DIGITS[:64])
    model, report = quantize(MODELS / "digits_mlp.onnx", Reader(), quiet=True)
    assert report.calibration_samples == 64


def _stateful_model():
    """y = (x W + sum over layers of state) * sample_rate: a scalar input and a (layers, batch, 4) state."""
    w = (np.random.default_rng(0).standard_normal((8, 4)) * 0.5).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Transpose", ["state"], ["st"], perm=[1, 0, 2]),
        helper.make_node("ReduceSum", ["st", "axes"], ["s"], keepdims=0),
        helper.make_node("Add", ["h", "s"], ["a"]),
        helper.make_node("Mul", ["a", "sr"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "stateful",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 4]),
         helper.make_tensor_value_info("sr", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1], np.int64), "axes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_inputs_without_a_leading_batch_axis(tmp_path):
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((40, 8)).astype(np.float32),
            "state": rng.standard_normal((2, 40, 4)).astype(np.float32),
            "sr": np.array(16000.0, np.float32)}
    model = _stateful_model()
    specs = [InputSpec("x", np.dtype(np.float32), (None, 8)), InputSpec("state", np.dtype(np.float32), (2, None, 4)),
             InputSpec("sr", np.dtype(np.float32), ())]
    batches = load_batches(data, specs, 16, batch_axes={"state": 1})
    assert [b["state"].shape for b in batches] == [(2, 16, 4), (2, 16, 4), (2, 8, 4)]
    assert all(b["sr"].shape == () for b in batches)
    np.testing.assert_array_equal(np.concatenate([b["state"] for b in batches], axis=1), data["state"])
    with pytest.raises(UserError, match="different sample counts"):
        load_batches(data, specs, 16)  # axis 0 is the fixed layers axis: wrong without --batch-axis
    # The same through the command line.
    np.savez(tmp_path / "calib.npz", **data)
    onnx.save(model, tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(tmp_path / "m.onnx"), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                 "--batch-axis", "state:1", "--batch-axis", "sr:none", "--weight-bits", "8", "--quiet"]) == 0
    assert out.exists()


def test_spill_to_disk_gives_identical_model_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    in_memory, r1 = quantize(MODELS / "digits_cnn.onnx", str(CALIB), quiet=True, memory_budget=None)
    spilled, r2 = quantize(MODELS / "digits_cnn.onnx", str(CALIB), quiet=True, memory_budget=64 * 1024)
    assert r1.spilled_bytes == 0 and r2.spilled_bytes > 1_000_000
    assert in_memory.SerializeToString() == spilled.SerializeToString()
    assert list(tmp_path.iterdir()) == []  # the spill folder is always removed


def test_random_calibration_from_the_cli(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "--calib", "random:8", "--quiet"]) == 0
    assert onnx.load(out).graph.node
    code = main(["quantize", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "--calib", "random:0"])
    assert code == 2 and "positive sample count" in capsys.readouterr().err
