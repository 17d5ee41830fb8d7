"""Graph forms that exporters produce, one hand-built model each: every output passes the full
checker, runs in onnxruntime, has its layers quantized (or reported), and stays close to float."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gpfq import quantize, save_model
from onnx_gpfq.inspection import quantized_layers

RNG = np.random.default_rng(0)


def arr(*shape, scale=0.3, dtype=np.float32):
    return (RNG.standard_normal(shape) * scale).astype(dtype)


def make(nodes, inputs, outputs, inits=(), opset=17, ir=None):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=[numpy_helper.from_array(v, k) for k, v in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir:
        model.ir_version = ir
    return model


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def run(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def check(model, feeds, min_sqnr=25.0, n_layers=None, **options):
    """Quantize W8A8 on the feeds, then check validity, layer count and closeness to float."""
    q, report = quantize(model, feeds, weight_bits=8, quiet=True, **options)
    onnx.checker.check_model(q, full_check=True)
    y, y_q = run(model, feeds).astype(np.float64), run(q, feeds).astype(np.float64)
    assert y.shape == y_q.shape
    sqnr = 10 * np.log10(np.sum(y ** 2) / max(np.sum((y - y_q) ** 2), 1e-30))
    assert sqnr > min_sqnr, sqnr
    if n_layers is not None:
        assert len(report.layers) == n_layers, report.layers
        assert len(quantized_layers(q)) == n_layers
    return q, report


def test_opset11_with_constant_node_weights():
    w = arr(4, 3, 3, 3)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    model = make(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 4, 6, 6])], opset=11, ir=6)
    q, _ = check(model, {"x": arr(16, 3, 6, 6, scale=1)}, n_layers=1)
    assert q.opset_import[0].version >= 13
    assert not [n for n in q.graph.node if n.op_type == "Constant"]


def test_weights_from_a_constant_subgraph_are_folded():
    wt = arr(5, 8)  # stored transposed: Transpose(wt) feeds MatMul
    nodes = [helper.make_node("Transpose", ["wt"], ["w"], perm=[1, 0]),
             helper.make_node("Identity", ["w"], ["w2"]),
             helper.make_node("MatMul", ["x", "w2"], ["y"])]
    model = make(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 5])], inits=[("wt", wt)])
    check(model, {"x": arr(32, 8, scale=1)}, n_layers=1)


def test_float16_model_keeps_float16_interface():
    w1, w2 = arr(6, 2, 3, 3, dtype=np.float16), arr(6 * 16, 4, dtype=np.float16)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("MatMul", ["f", "w2"], ["y"])]
    model = make(nodes, [vi("x", ["N", 2, 6, 6], TensorProto.FLOAT16)], [vi("y", ["N", 4], TensorProto.FLOAT16)],
                 inits=[("w1", w1), ("w2", w2)])
    q, _ = check(model, {"x": arr(16, 2, 6, 6, scale=1, dtype=np.float16)}, min_sqnr=20, n_layers=2)
    assert q.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert q.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert not [t for t in q.graph.initializer if t.data_type == TensorProto.FLOAT16]


def test_fixed_batch_of_one_is_fed_sample_by_sample():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2])]
    model = make(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 3, 3])], inits=[("w", arr(4, 3, 3, 3))])
    x = arr(10, 3, 8, 8, scale=1)
    q, report = quantize(model, {"x": x}, weight_bits=8, quiet=True)
    assert report.calibration_samples == 10
    for i in range(3):
        y, y_q = run(model, {"x": x[i:i + 1]}), run(q, {"x": x[i:i + 1]})
        assert np.sum((y - y_q) ** 2) < 1e-2 * np.sum(y ** 2)


def test_conv_transpose():
    nodes = [helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1],
                              output_padding=[1, 1])]
    model = make(nodes, [vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 3, 10, 10])],
                 inits=[("w", arr(4, 3, 3, 3)), ("b", arr(3))])
    check(model, {"x": arr(16, 4, 5, 5, scale=1)}, n_layers=1)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_trans_b_alpha_beta(trans_b):
    w = arr(6, 10) if trans_b else arr(10, 6)
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=trans_b, alpha=0.5, beta=2.0)]
    model = make(nodes, [vi("x", ["N", 10])], [vi("y", ["N", 6])], inits=[("w", w), ("c", arr(6))])
    check(model, {"x": arr(64, 10, scale=1)}, n_layers=1, bias_correction=True)


def test_matmul_with_3d_input():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    model = make(nodes, [vi("x", ["N", 7, 12])], [vi("y", ["N", 7, 5])], inits=[("w", arr(12, 5)), ("b", arr(5))])
    check(model, {"x": arr(16, 7, 12, scale=1)}, n_layers=1, max_patches=3)


def test_weight_shared_by_two_nodes_is_quantized_once():
    w = arr(8, 8)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="second")]
    model = make(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 8])], inits=[("w", w)])
    q, report = check(model, {"x": arr(64, 8, scale=1)}, min_sqnr=20)
    assert [r.node for r in report.layers] == ["first", "second"]
    assert report.layers[1].form.startswith("shared with first")
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w_quantized"]
    assert len(dq) == 1


def test_if_node_with_conv_in_branch_runs_and_is_reported():
    then_graph = helper.make_graph(
        [helper.make_node("Conv", ["c1", "w_inner"], ["t_out"], name="inner_conv", pads=[1, 1, 1, 1])], "then", [],
        [vi("t_out", ["N", 4, 6, 6])], initializer=[numpy_helper.from_array(arr(4, 4, 3, 3), "w_inner")])
    else_graph = helper.make_graph([helper.make_node("Identity", ["c1"], ["e_out"])], "else", [],
                                   [vi("e_out", ["N", 4, 6, 6])])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], name="outer_conv", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph),
    ]
    model = make(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 4, 6, 6])],
                 inits=[("w", arr(4, 3, 3, 3)), ("zero", np.array(0, np.float32))])
    x = arr(8, 3, 6, 6, scale=1)
    q, report = check(model, {"x": x}, n_layers=1)
    assert [(s.node, s.op_type) for s in report.skipped] == [("inner_conv", "Conv")]
    assert "control-flow" in report.skipped[0].reason
    assert np.allclose(run(q, {"x": -np.abs(x)}), run(model, {"x": -np.abs(x)}), atol=0.1)  # else branch


def test_external_data_in_and_out(tmp_path):
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
    model = make(nodes, [vi("x", ["N", 64])], [vi("y", ["N", 32])], inits=[("w", arr(32, 64)), ("b", arr(32))])
    (tmp_path / "in").mkdir()
    src = tmp_path / "in" / "model.onnx"
    onnx.save(onnx.ModelProto.FromString(model.SerializeToString()), src, save_as_external_data=True, all_tensors_to_one_file=True, location="model.bin",
              size_threshold=0)
    feeds = {"x": arr(64, 64, scale=1)}
    q, _ = quantize(str(src), feeds, weight_bits=8, quiet=True)
    out = tmp_path / "q.onnx"
    save_model(q, out, external_data=True)
    assert (tmp_path / "q.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "q.onnx", "q.onnx.data"]
    onnx.checker.check_model(str(out), full_check=True)
    y, y_q = run(model, feeds), run(str(out), feeds)
    assert np.sum((y - y_q) ** 2) < 1e-3 * np.sum(y ** 2)


def test_models_over_the_protobuf_limit_take_the_external_data_path(tmp_path, monkeypatch):
    """Models too large for one protobuf go through onnxruntime's optimiser, the validation and
    save_model as files with external data; the result is the same model (onnxruntime writes
    default attributes out on that path: same weights, same outputs)."""
    from onnx_gpfq import graph as graph_mod

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Flatten", ["r"], ["f"]), helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    model = make(nodes, [vi("x", ["N", 3, 6, 6])], [vi("y", ["N", 10])], [("w", arr(16, 3, 3, 3)), ("g", arr(10, 16 * 36))])
    feeds = {"x": arr(16, 3, 6, 6, scale=1)}
    small, _ = quantize(model, feeds, weight_bits=4, quiet=True)
    assert graph_mod.serialize(small) == small.SerializeToString()
    monkeypatch.setattr(graph_mod, "PROTOBUF_LIMIT", 2000)  # every model here is now "too large"
    assert graph_mod.serialize(model) is None
    large, _ = quantize(model, feeds, weight_bits=4, quiet=True)
    assert [t.SerializeToString() for t in large.graph.initializer] == [t.SerializeToString() for t in small.graph.initializer]
    assert [n.op_type for n in large.graph.node] == [n.op_type for n in small.graph.node]
    out = tmp_path / "q.onnx"
    save_model(large, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.data"]
    assert np.array_equal(run(str(out), feeds), run(small, feeds))


@pytest.mark.parametrize("which", ["handmade", "squeezenet"])
def test_opset_upgrade_and_shape_inference_around_the_weights_change_nothing(which, monkeypatch):
    """normalise sends large initializers around onnx's version converter and shape inference
    (their data is restored afterwards): the result is byte-identical to passing them through."""
    from onnx_gpfq import graph as graph_mod

    if which == "squeezenet":
        import light_models

        model = light_models.prepared("squeezenet")  # opset 9, IR 3, 1.2 M weights
    else:
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
                 helper.make_node("Clip", ["c"], ["r"], min=0.0, max=6.0),  # attributes -> inputs at opset 11
                 helper.make_node("Reshape", ["r", "shape"], ["f"]),
                 helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
        model = make(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", [2, 10])],
                     [("w", arr(16, 3, 3, 3)), ("shape", np.array([2, -1], np.int64)), ("g", arr(10, 16 * 36))],
                     opset=9, ir=4)
    assert any(t.ByteSize() > graph_mod.STRIP_BYTES for t in model.graph.initializer)
    around = graph_mod.normalise(model)
    monkeypatch.setattr(graph_mod, "STRIP_BYTES", 1 << 62)  # everything through the converter
    through = graph_mod.normalise(model)
    assert around.SerializeToString() == through.SerializeToString()
    assert graph_mod.opset_version(around) >= 13


def test_weights_go_through_when_a_transform_changes_them():
    """If a large initializer does not come out under its name with its dims and type, the
    transform runs again on the whole model (data included)."""
    from onnx_gpfq import graph as graph_mod

    model = make([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [4])], [vi("y", [4])], [("big", arr(64, 64))])
    seen = []

    def rename(m):
        seen.append(len(m.graph.initializer[0].raw_data))
        out = onnx.ModelProto()
        out.CopyFrom(m)
        out.graph.initializer[0].name = "renamed"
        return out

    result = graph_mod._without_weights(model, rename)
    assert seen == [0, 64 * 64 * 4]  # stripped first, then the plain way
    np.testing.assert_array_equal(numpy_helper.to_array(result.graph.initializer[0]),
                                  numpy_helper.to_array(model.graph.initializer[0]))
