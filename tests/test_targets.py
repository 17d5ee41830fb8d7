"""The matrix view of each target op: rows(x) @ W must reproduce what onnxruntime computes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gpfq.ops import OPS, find_targets


def _run(node, x, inits, opset=17):
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_value_info("y", onnx.TypeProto())],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return model, y


CONV_CASES = [
    dict(x=(2, 4, 9, 9), w=(6, 4, 3, 3), attrs={}),
    dict(x=(2, 4, 9, 9), w=(6, 4, 3, 3), attrs={"pads": [1, 0, 2, 1], "strides": [2, 1]}),
    dict(x=(2, 4, 10, 7), w=(8, 2, 3, 2), attrs={"group": 2, "dilations": [2, 1], "pads": [1, 1, 1, 1]}),
    dict(x=(3, 6, 8, 8), w=(6, 1, 3, 3), attrs={"group": 6, "pads": [1, 1, 1, 1]}),  # depthwise
    dict(x=(2, 4, 9, 8), w=(5, 4, 3, 3), attrs={"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    dict(x=(2, 4, 9, 8), w=(5, 4, 2, 2), attrs={"auto_pad": "SAME_LOWER", "strides": [1, 1]}),
    dict(x=(2, 3, 11), w=(4, 3, 3), attrs={"strides": [2], "pads": [1, 1]}),  # 1-D
    dict(x=(1, 2, 5, 6, 4), w=(3, 2, 2, 3, 2), attrs={"pads": [0, 1, 0, 1, 1, 1]}),  # 3-D
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_rows_times_weight_matches_onnxruntime(case):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(case["x"]).astype(np.float32)
    w = rng.standard_normal(case["w"]).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **case["attrs"])
    model, y = _run(node, x, {"w": w})
    (t,), skipped = find_targets(model.graph)
    assert not skipped
    W = t.to_matrix(w)
    np.testing.assert_array_equal(t.from_matrix(W), w)
    rows = t.rows(x, None)  # (g, N*L, N0)
    g, n1g = t.groups, w.shape[0] // t.groups
    expected = y.reshape(y.shape[0], t.groups, n1g, -1).transpose(1, 0, 3, 2).reshape(g, -1, n1g)
    np.testing.assert_allclose(rows @ W, expected, rtol=1e-4, atol=1e-4)


def test_conv_subsampled_rows_are_a_subset_with_same_positions():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    model, _ = _run(helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), x, {"w": w})
    (t,), _ = find_targets(model.graph)
    pos = t.positions(x.shape, 5, np.random.default_rng(0))
    assert pos.shape == (3, 5)
    full = t.rows(x, None).reshape(1, 3, 36, -1)
    sub = t.rows(x, pos).reshape(1, 3, 5, -1)
    for n in range(3):
        np.testing.assert_array_equal(sub[0, n], full[0, n, pos[n]])


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm_view(trans_a, trans_b):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((5, 7) if not trans_a else (7, 5)).astype(np.float32)
    b = rng.standard_normal((7, 3) if not trans_b else (3, 7)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "b"], ["y"], transA=trans_a, transB=trans_b)
    model, y = _run(node, a, {"b": b})
    (t,), _ = find_targets(model.graph)
    assert t.channel_axis == (0 if trans_b else 1)
    np.testing.assert_allclose(t.rows(a, None)[0] @ t.to_matrix(b)[0], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(t.from_matrix(t.to_matrix(b)), b)


def test_matmul_nd_view_and_token_subsampling():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 8)).astype(np.float32)
    w = rng.standard_normal((8, 4)).astype(np.float32)
    model, y = _run(helper.make_node("MatMul", ["x", "w"], ["y"]), x, {"w": w})
    (t,), _ = find_targets(model.graph)
    np.testing.assert_allclose(t.rows(x, None)[0] @ t.to_matrix(w)[0], y.reshape(-1, 4), rtol=1e-5, atol=1e-5)
    pos = t.positions(x.shape, 3, np.random.default_rng(0))
    assert t.rows(x, pos).shape == (1, 6, 8)


def test_activation_only_matmul_is_reported_not_targeted():
    nodes = [helper.make_node("MatMul", ["x", "x2"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2]),
                                           helper.make_tensor_value_info("x2", TensorProto.FLOAT, [2, 2])],
                              [helper.make_value_info("y", onnx.TypeProto())])
    targets, skipped = find_targets(graph)
    assert targets == [] and skipped[0].node == "mm" and "activations" in skipped[0].reason


CONV_T_CASES = [
    dict(x=(2, 3, 5, 5), w=(3, 4, 3, 3), attrs={}),
    dict(x=(2, 3, 5, 4), w=(3, 4, 3, 3), attrs={"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 0]}),
    dict(x=(1, 2, 4, 4), w=(2, 3, 2, 3), attrs={"strides": [2, 1], "dilations": [1, 2], "pads": [0, 1, 1, 0]}),
    dict(x=(2, 2, 6), w=(2, 5, 4), attrs={"strides": [3], "pads": [2, 1]}),  # 1-D
    dict(x=(1, 2, 4, 4), w=(2, 3, 3, 3), attrs={"strides": [2, 2], "output_shape": [8, 8]}),
    dict(x=(1, 2, 4, 4), w=(2, 3, 3, 3), attrs={"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
]


@pytest.mark.parametrize("case", CONV_T_CASES)
def test_conv_transpose_rows_times_weight_matches_onnxruntime(case):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(case["x"]).astype(np.float32)
    w = rng.standard_normal(case["w"]).astype(np.float32)
    model, y = _run(helper.make_node("ConvTranspose", ["x", "w"], ["y"], **case["attrs"]), x, {"w": w})
    (t,), skipped = find_targets(model.graph)
    assert t.channel_axis == 1
    W = t.to_matrix(w)
    np.testing.assert_array_equal(t.from_matrix(W), w)
    rows = t.rows(x, None)
    expected = y.reshape(y.shape[0], y.shape[1], -1).transpose(0, 2, 1).reshape(1, -1, y.shape[1])
    np.testing.assert_allclose(rows @ W, expected, rtol=1e-4, atol=1e-4)
    pos = t.positions(x.shape, 3, np.random.default_rng(0))
    assert t.rows(x, pos).shape == (1, x.shape[0] * 3, W.shape[1])


def test_grouped_conv_transpose_is_reported():
    x = np.zeros((1, 4, 3, 3), np.float32)
    w = np.zeros((4, 1, 3, 3), np.float32)
    model, _ = _run(helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="ct", group=4), x, {"w": w})
    targets, skipped = find_targets(model.graph)
    assert not targets and "grouped ConvTranspose" in skipped[0].reason


def _targets(nodes, inits, x_shape=(2, 4, 6, 6)):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_value_info(nodes[-1].output[0], onnx.TypeProto())],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    return find_targets(graph)


ONE_OF_EACH = {  # op type -> (node, weight shape, input shape)
    "Conv": (helper.make_node("Conv", ["x", "w"], ["y"], name="n", group=2), (6, 2, 3, 3), (2, 4, 6, 6)),
    "ConvTranspose": (helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="n"), (4, 3, 2, 2), (2, 4, 6, 6)),
    "Gemm": (helper.make_node("Gemm", ["x", "w"], ["y"], name="n", transB=1), (5, 4), (3, 4)),
    "MatMul": (helper.make_node("MatMul", ["x", "w"], ["y"], name="n"), (4, 5), (2, 3, 4)),
}


RECURRENT = {"LSTM", "GRU", "RNN"}  # two targets per node (W and R): tests/test_coverage.py


def test_every_registered_op_is_covered_here():
    assert set(ONE_OF_EACH) | RECURRENT == set(OPS)


@pytest.mark.parametrize("op", sorted(ONE_OF_EACH))
def test_each_op_parses_into_its_registered_class_with_a_consistent_view(op):
    node, w_shape, x_shape = ONE_OF_EACH[op]
    rng = np.random.default_rng(5)
    w = rng.standard_normal(w_shape).astype(np.float32)
    (t,), skipped = _targets([node], {"w": w}, x_shape)
    assert type(t) is OPS[op] and t.op_type == op and not skipped
    W = t.to_matrix(w)
    np.testing.assert_array_equal(t.from_matrix(W), w)
    assert t.n_out == W.shape[0] * W.shape[2]  # output channels: groups x columns per group
    rows = t.rows(rng.standard_normal(x_shape).astype(np.float32), None)
    assert rows.shape[0] == W.shape[0] and rows.shape[2] == W.shape[1]
    assert rows.shape[1] == t.samples(x_shape) * t.rows_per_sample(x_shape)
    assert t.fan_in == W.shape[1]
    order = t.kernel_order()  # the int8 kernel's fan-in order: a permutation of the N0 rows
    np.testing.assert_array_equal(np.sort(order), np.arange(W.shape[1]))


def test_bias_rules_follow_the_op():
    rng = np.random.default_rng(6)
    w, b = rng.standard_normal((4, 5)).astype(np.float32), np.ones(5, np.float32)
    delta = np.arange(5.0)
    (gemm,), _ = _targets([helper.make_node("Gemm", ["x", "w", "b"], ["y"], alpha=2.0, beta=0.5)], {"w": w, "b": b}, (3, 4))
    assert gemm.b == "b" and not gemm.integer_bias  # an int32 bias would skip the alpha/beta scaling
    np.testing.assert_allclose(gemm.bias_correction(delta), delta * 4.0)
    (plain,), _ = _targets([helper.make_node("Gemm", ["x", "w", "b"], ["y"])], {"w": w, "b": b}, (3, 4))
    assert plain.integer_bias
    np.testing.assert_array_equal(plain.bias_correction(delta), delta)
    nodes = [helper.make_node("Relu", ["x"], ["c"]), helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g")]
    (locked,), _ = _targets(nodes, {"w": np.ones((4, 4), np.float32)}, (3, 4))
    assert locked.bias_locked and locked.b is None and locked.bias_correction(delta[:4]) is None
    (mm,), _ = _targets([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": w}, (3, 4))
    assert mm.bias_correction(delta) is None and not mm.integer_bias
    (conv,), _ = _targets([helper.make_node("Conv", ["x", "w"], ["y"])], {"w": np.ones((3, 4, 1, 1), np.float32)})
    assert conv.integer_bias and conv.QUANTIZE_OUTPUT and not mm.QUANTIZE_OUTPUT


def test_conv_rows_of_a_few_positions_are_gathered_exactly_as_from_the_padded_input():
    """Conv rows for a subset of positions come from ops.conv.gathered_patches (no padding of the
    whole input): byte for byte the rows of the padded unfold, over 1-3 spatial dims, strides,
    dilations, asymmetric pads (taps in the padding are +0.0), groups and depthwise."""
    from onnx_gpfq.ops.conv import gathered_patches, patches

    rng = np.random.default_rng(0)
    checked = 0
    for nd in (1, 2, 3):
        for _ in range(30):
            k, s, d = (tuple(int(v) for v in rng.integers(lo, hi, nd)) for lo, hi in ((1, 4), (1, 3), (1, 3)))
            begin, end = [int(v) for v in rng.integers(0, 3, nd)], [int(v) for v in rng.integers(0, 3, nd)]
            g, per_group = int(rng.choice([1, 2, 3])), int(rng.choice([1, 2]))  # per_group 1: depthwise
            size = [int(v) for v in rng.integers(4, 9, nd)]
            x = -np.abs(rng.standard_normal((3, g * per_group, *size))).astype(np.float32)  # a -0.0 would show
            out = [(size[i] + begin[i] + end[i] - (d[i] * (k[i] - 1) + 1)) // s[i] + 1 for i in range(nd)]
            if min(out) < 1:
                continue
            p = int(np.prod(out))
            pos = np.stack([np.sort(rng.choice(p, min(p, 5), replace=False)) for _ in range(3)])
            padded = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
            want = patches(padded, k, s, d, g, pos)
            got = gathered_patches(x, k, s, d, begin, out, g, pos)
            assert got.shape == want.shape and got.flags.c_contiguous and got.tobytes() == want.tobytes()
            checked += 1
    assert checked > 60
