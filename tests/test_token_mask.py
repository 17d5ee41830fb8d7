"""--token-mask: the rows of X a MatMul forms at padded tokens (an attention mask's zeros) are left out
of GPFQ and bias correction; the model's output at real tokens is what they would otherwise be traded
against."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gpfq import quantize, save_model
from onnx_gpfq.calib import InputSpec, token_masks
from onnx_gpfq.cli import main
from onnx_gpfq.errors import UserError
from onnx_gpfq.ops.matmul import MatMul
from onnx_gpfq.options import Options
from onnx_gpfq.quantize import _row_plan

N, L, K, M = 48, 10, 16, 8


def padded_model():
    """y = (x @ w + b) * mask[..., None]: a linear layer whose output at padded tokens the model drops."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((K, M)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal(M) * 0.1).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([2], np.int64), "axes")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="linear"), helper.make_node("Add", ["h", "b"], ["hb"]),
             helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["mf", "axes"], ["mu"]), helper.make_node("Mul", ["hb", "mu"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", L, K]),
                                           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", L])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", L, M])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def padded_data(seed=4):
    """Sentences of 2..L real tokens; the padding rows are nearly one vector, as a transformer's
    hidden states at [PAD] tokens are: fitted to them too, GPFQ spends its error feedback on them."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, L + 1, N)
    mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int64)
    real = rng.standard_normal((N, L, K)) + 0.3
    pad = rng.standard_normal(K) * 3 + 0.2 * rng.standard_normal((N, L, K))
    return {"x": np.where(mask[..., None] == 1, real, pad).astype(np.float32), "attention_mask": mask}


def test_gpfq_fits_the_real_tokens_rows_only():
    import onnxruntime as ort

    model, data = padded_model(), padded_data()
    y = ort.InferenceSession(model.SerializeToString()).run(None, data)[0]
    error = {}
    for choice in ("auto", "none"):
        q, report = quantize(model, data, weight_bits=3, quiet=True, token_mask=choice)
        (layer,) = report.layers
        if choice == "auto":
            assert report.token_mask == "attention_mask"
            assert report.padded_fraction == pytest.approx(1 - data["attention_mask"].mean())
            assert layer.rows == data["attention_mask"].sum()  # every real token's row, no padded one
            assert "token mask attention_mask" in report.table() and report.to_dict()["token_mask"] == "attention_mask"
        else:
            assert report.token_mask is None and layer.rows == N * L
        y_q = ort.InferenceSession(q.SerializeToString()).run(None, data)[0]
        error[choice] = np.sum((y_q - y) ** 2) / np.sum(y ** 2)  # at real tokens only: the model zeroes the rest
    assert error["auto"] < 0.8 * error["none"], error  # 0.47-0.68 over data seeds 0-5 (3 bits)


def test_row_plan_keeps_exactly_the_sampled_rows_at_real_tokens():
    """Layer.row_tokens against the rows Layer.rows really yields (each row carries its token's id),
    and the plan: with masks, the rows at real tokens among those sampled, all of them under max_rows;
    without, every row (the plan before masks)."""
    t = MatMul(node="n", x="x", w="w", w_shape=(K, M))
    rng = np.random.default_rng(0)
    shapes = [(5, L, K), (3, L, K)]
    masks = [rng.random(shape[:2]) < 0.4 for shape in shapes]
    for max_patches in (4, 256):  # a few sampled tokens per sample, and all of them
        options = Options(max_patches=max_patches)
        positions, keep = _row_plan(t, shapes, options, 0, masks)
        plain_positions, plain_keep = _row_plan(t, shapes, options, 0)
        for b, shape in enumerate(shapes):
            ids = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape[:2])
            x = np.repeat(ids[..., None], K, axis=2)
            tokens = t.row_tokens(shape, positions[b])
            np.testing.assert_array_equal(t.rows(x, positions[b])[0, :, 0], tokens)
            np.testing.assert_array_equal(keep[b], np.flatnonzero(masks[b].reshape(-1)[tokens]))
            np.testing.assert_array_equal(plain_positions[b], positions[b])
            np.testing.assert_array_equal(plain_keep[b], np.arange(tokens.size))
    masks = [rng.random(shape[:2]) < 0.9 for shape in shapes]
    options = Options(max_rows=3)  # one token per sample, more real ones than max_rows: a seeded subset of them
    positions, keep = _row_plan(t, shapes, options, 0, masks)
    assert sum(k.size for k in keep) == 3
    for b, shape in enumerate(shapes):
        assert masks[b].reshape(-1)[t.row_tokens(shape, positions[b])[keep[b]]].all()


def test_which_input_marks_the_padding():
    data = padded_data()
    inputs = [InputSpec("x", np.dtype(np.float32), (None, L, K)), InputSpec("attention_mask", np.dtype(np.int64), (None, L))]
    name, masks = token_masks("auto", [data], inputs)
    assert name == "attention_mask" and masks[0].dtype == bool
    np.testing.assert_array_equal(masks[0], data["attention_mask"] == 1)
    assert token_masks("none", [data], inputs) == (None, None)
    assert token_masks("auto", [{"x": data["x"]}], inputs[:1]) == (None, None)  # no attention_mask: every row
    counts = dict(data, attention_mask=data["attention_mask"] * 2)  # not a 0/1 mask: auto leaves it alone
    assert token_masks("auto", [counts], inputs) == (None, None)
    assert token_masks("auto", [dict(data, attention_mask=0 * data["attention_mask"])], inputs) == (None, None)
    assert token_masks("auto", [data], inputs, {"attention_mask": 1}) == (None, None)
    with pytest.raises(UserError, match="not a model input"):
        token_masks("mask", [data], inputs)
    with pytest.raises(UserError, match="not all 0 or 1"):
        token_masks("attention_mask", [counts], inputs)
    with pytest.raises(UserError, match=r"not \(samples, tokens\)"):
        token_masks("x", [data], inputs)
    with pytest.raises(UserError, match="0 \\(padding\\) at every token"):  # e.g. token_type_ids of single sentences
        token_masks("attention_mask", [dict(data, attention_mask=0 * data["attention_mask"])], inputs)


def test_bad_token_mask_is_one_line_error(capsys, tmp_path):
    model, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "q.onnx"
    save_model(padded_model(), str(model))
    np.savez(calib, **padded_data())
    for value, fragment in (("nosuch", "not a model input"), ("x", "cannot mark padded tokens"), ("", "--token-mask")):
        code = main(["quantize", str(model), "-o", str(out), "--calib", str(calib), "--quiet", "--token-mask", value])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err, err
        assert not out.exists()
