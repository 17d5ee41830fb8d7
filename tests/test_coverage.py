"""Coverage of real graphs: LSTM / GRU / RNN weights quantized, every weight-carrying op left in
float listed, the fraction of weight bytes quantized, and ``fix_inputs`` specialising an If."""

from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP, helper as h, numpy_helper as nh

import onnx_gpfq
from onnx_gpfq.graph import GraphIndex
from onnx_gpfq.ops import find_targets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_gpfq as ref  # noqa: E402

T, I, H = 12, 16, 24
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_nodes(op, bidir, rng, prefix="", x="x", lens="", init_h=False, y=""):
    """Initializers and nodes of one recurrent layer reading ``x`` (T, N, I); Y_h is ``{prefix}Y_h``."""
    g, d = GATES[op], 2 if bidir else 1
    inits = [nh.from_array((rng.standard_normal((d, g * H, I)) / np.sqrt(I)).astype(np.float32), f"{prefix}W"),
             nh.from_array((rng.standard_normal((d, g * H, H)) / np.sqrt(H)).astype(np.float32), f"{prefix}R"),
             nh.from_array((rng.standard_normal((d, 2 * g * H)) * 0.1).astype(np.float32), f"{prefix}B")]
    nodes, h0 = [], ""
    if init_h:  # a learnt (D, 1, H) state expanded to the batch, as exports do
        h0 = f"{prefix}h0"
        inits += [nh.from_array((rng.standard_normal((d, 1, H)) * 0.5).astype(np.float32), f"{prefix}h0_small"),
                  nh.from_array(np.array([1], np.int64), f"{prefix}one"),
                  nh.from_array(np.array([d], np.int64), f"{prefix}d"), nh.from_array(np.array([H], np.int64), f"{prefix}h")]
        nodes += [h.make_node("Shape", [x], [f"{prefix}xs"], name=f"{prefix}shape"),
                  h.make_node("Gather", [f"{prefix}xs", f"{prefix}one"], [f"{prefix}n"], name=f"{prefix}gather", axis=0),
                  h.make_node("Concat", [f"{prefix}d", f"{prefix}n", f"{prefix}h"], [f"{prefix}hshape"], name=f"{prefix}cat", axis=0),
                  h.make_node("Expand", [f"{prefix}h0_small", f"{prefix}hshape"], [h0], name=f"{prefix}expand")]
    outs = [y, f"{prefix}Y_h"] + ([""] if op == "LSTM" else [])
    nodes.append(h.make_node(op, [x, f"{prefix}W", f"{prefix}R", f"{prefix}B", lens, h0], outs, name=f"{prefix}rnn",
                             hidden_size=H, direction="bidirectional" if bidir else "forward"))
    return inits, nodes


def recurrent_model(op="LSTM", bidir=False, init_h=False, seq_lens=False, head=True, seed=0):
    rng = np.random.default_rng(seed)
    d = 2 if bidir else 1
    inputs = [h.make_tensor_value_info("x", TP.FLOAT, ["T", "N", I])]
    if seq_lens:
        inputs.append(h.make_tensor_value_info("lens", TP.INT32, ["N"]))
    inits, nodes = recurrent_nodes(op, bidir, rng, lens="lens" if seq_lens else "", init_h=init_h)
    outputs = [h.make_tensor_value_info("Y_h", TP.FLOAT, None)]
    if head:  # Y_h (D, N, H) -> (N, D*H) -> MatMul
        inits += [nh.from_array(np.array([-1, d * H], np.int64), "flat"),
                  nh.from_array((rng.standard_normal((d * H, 10)) / np.sqrt(d * H)).astype(np.float32), "fcW")]
        nodes += [h.make_node("Transpose", ["Y_h"], ["yt"], name="tr", perm=[1, 0, 2]),
                  h.make_node("Reshape", ["yt", "flat"], ["feat"], name="reshape"),
                  h.make_node("MatMul", ["feat", "fcW"], ["out"], name="fc")]
        outputs = [h.make_tensor_value_info("out", TP.FLOAT, ["N", 10])]
    g = h.make_graph(nodes, "recurrent", inputs, outputs, initializer=inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def data(seq_lens=False, n=64, seed=1):
    rng = np.random.default_rng(seed)
    d = {"x": rng.standard_normal((T, n, I)).astype(np.float32)}
    if seq_lens:
        d["lens"] = rng.integers(4, T + 1, n).astype(np.int32)
    return d


def run(model, feed, outputs=None):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(outputs, feed)


def sqnr(model, quant, feed):
    a, b = run(model, feed)[0], run(quant, feed)[0]
    return 10 * np.log10((a ** 2).sum() / ((a - b) ** 2).sum())


def dequantized_inputs(model, node_op):
    """For each node of ``node_op``: its W and R inputs traced back to (codes dtype, DQ node)."""
    index = GraphIndex(model.graph)
    found = []
    for node in (n for n in model.graph.node if n.op_type == node_op):
        for slot in (1, 2):
            src = index.producer[node.input[slot]]
            if src.op_type == "Reshape":
                src = index.producer[src.input[0]]
            assert src.op_type == "DequantizeLinear"
            found.append(index.initializers[src.input[0]].data_type)
    return found


@pytest.mark.parametrize("op,bidir,init_h,seq_lens", [
    ("LSTM", False, False, False), ("LSTM", True, True, True), ("LSTM", True, False, True), ("LSTM", False, True, False),
    ("GRU", False, False, True), ("GRU", True, True, False), ("RNN", True, True, True)])
def test_recurrent_weights_quantized(op, bidir, init_h, seq_lens):
    model = recurrent_model(op, bidir, init_h, seq_lens)
    quant, report = onnx_gpfq.quantize(model, [data(seq_lens)], weight_bits=4, quiet=True)
    onnx.checker.check_model(quant, full_check=True)
    out = run(quant, data(seq_lens, seed=2))[0]
    assert np.isfinite(out).all()
    assert dequantized_inputs(quant, op) == [TP.INT8, TP.INT8]
    rows = {r.node: r for r in report.layers}
    assert {"rnn:W", "rnn:R", "fc"} <= set(rows)
    assert rows["rnn:R"].weight_shape == (2 if bidir else 1, GATES[op] * H, H)
    assert report.weight_fraction == 1.0 and not report.skipped
    # weight-only: no QuantizeLinear in front of the recurrent node
    rnn = next(n for n in quant.graph.node if n.op_type == op)
    assert rnn.input[0] == "x"


def test_rows_rebuild_the_rnn_output():
    """For a tanh RNN, Y_t = tanh(x_t W^T + h_{t-1} R^T + Wb + Rb): the W rows and the R rows the
    layer builds must reproduce Y at every real step, in both directions, with initial_h and
    sequence lengths; padding steps are zero rows."""
    model = recurrent_model("RNN", bidir=True, init_h=True, seq_lens=True, head=False)
    model.graph.node[-1].output[0] = "Y"
    model.graph.output.append(h.make_tensor_value_info("Y", TP.FLOAT, None))
    model.graph.output.append(h.make_tensor_value_info("h0", TP.FLOAT, None))
    feed = data(True, n=8)
    y, h0 = run(model, feed, ["Y", "h0"])
    targets, _ = find_targets(model.graph)
    tw, tr = targets
    xw = tw.rows(feed["x"], None, feed["lens"])  # (D, N*T, I), samples first
    xr = tr.rows(y, None, feed["lens"], h0)
    index = GraphIndex(model.graph)
    W, R, B = (index.array(n) for n in ("W", "R", "B"))
    real = (np.arange(T)[None, :] < feed["lens"][:, None]).reshape(-1)
    for d in range(2):
        pred = np.tanh(xw[d] @ W[d].T + xr[d] @ R[d].T + B[d, :H] + B[d, H:])
        want = y[:, d].transpose(1, 0, 2).reshape(-1, H)
        np.testing.assert_allclose(pred[real], want[real], atol=2e-5)
        assert not xw[d][~real].any() and not xr[d][~real].any()


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_output_sqnr_like_a_conv(op):
    """Weight-only, same bits: the recurrent model's output SQNR is within 3 dB of a Conv's of
    the same fan-in quantized the same way, and 8 bits buys at least 15 dB over 4."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((GATES[op] * H, I, 3)) / np.sqrt(3 * I)).astype(np.float32)
    conv = h.make_model(h.make_graph(
        [h.make_node("Conv", ["x", "w"], ["out"], name="conv", pads=[1, 1])], "c",
        [h.make_tensor_value_info("x", TP.FLOAT, ["N", I, T])], [h.make_tensor_value_info("out", TP.FLOAT, None)],
        [nh.from_array(w, "w")]), opset_imports=[h.make_opsetid("", 17)])
    model = recurrent_model(op, bidir=True, init_h=True, head=False)
    cal, test = data(), data(seed=2)
    conv_cal, conv_test = ({"x": d["x"].transpose(1, 2, 0).copy()} for d in (cal, test))
    got = {}
    for bits in (8, 4):
        q, _ = onnx_gpfq.quantize(model, [cal], weight_bits=bits, act_bits=None, quiet=True)
        qc, _ = onnx_gpfq.quantize(conv, [conv_cal], weight_bits=bits, act_bits=None, quiet=True)
        got[bits] = sqnr(model, q, test), sqnr(conv, qc, conv_test)
        assert abs(got[bits][0] - got[bits][1]) < 3.0, got
    assert got[8][0] > got[4][0] + 15, got


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_gpfq_below_rtn_at_4_bits(op):
    _, report = onnx_gpfq.quantize(recurrent_model(op, bidir=True, init_h=True, seq_lens=True), [data(True)],
                                   weight_bits=4, quiet=True)
    rows = {r.node: r for r in report.layers}
    for key in ("rnn:W", "rnn:R"):
        assert rows[key].rel_error < rows[key].rel_error_rtn, rows[key]


def test_recurrent_codes_match_the_reference():
    """The R codes in the output are the reference residual loop's on the rows X (float Y shifted)
    and X~ (Y of the network with W quantized, shifted), with the output's steps."""
    model = recurrent_model("LSTM", bidir=True, init_h=False, seq_lens=True, head=False)
    feed = data(True, n=32)
    quant, _ = onnx_gpfq.quantize(model, [feed], weight_bits=4, act_bits=None, scale_rule="fixed", c=1.0, quiet=True)
    qi = {t.name: nh.to_array(t) for t in quant.graph.initializer}
    w_deq = (qi["W_quantized"].astype(np.float64) * qi["W_scale"][:, None]).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.node[-1].output[0] = "Y"
    probe.graph.output.append(h.make_tensor_value_info("Y", TP.FLOAT, None))
    y = run(probe, feed, ["Y"])[0]
    w_init = next(t for t in probe.graph.initializer if t.name == "W")
    w_init.CopyFrom(nh.from_array(w_deq.reshape(2, 4 * H, I), "W"))
    y_tilde = run(probe, feed, ["Y"])[0]
    tr = find_targets(model.graph)[0][1]
    X, Xt = (tr.rows(a, None, feed["lens"]).astype(np.float64) for a in (y, y_tilde))
    R = tr.to_matrix(GraphIndex(model.graph).array("R").astype(np.float64))
    scale = qi["R_scale"].astype(np.float64).reshape(2, 1, 4 * H)
    np.testing.assert_allclose(scale, np.abs(R).max(axis=1, keepdims=True) / 7, rtol=1e-6)
    codes, _ = ref.gpfq_layer(X, Xt, R, np.broadcast_to(scale, R.shape), -7, 7)
    np.testing.assert_array_equal(tr.from_matrix(codes), qi["R_quantized"])


def test_layout_1_is_listed_with_its_reason():
    model = recurrent_model("LSTM")
    model.graph.node[-4].attribute.append(h.make_attribute("layout", 1))
    _, skipped = find_targets(model.graph)
    assert [(s.op_type, "layout=1" in s.reason) for s in skipped] == [("LSTM", True)]


def test_left_in_float_and_weight_fraction():
    """Einsum and com.microsoft Attention carrying weights are listed one line each, and the
    fraction of weight bytes counts them: Conv weight / (Conv + Einsum + Attention weights)."""
    rng = np.random.default_rng(0)
    f = lambda name, *s: nh.from_array(rng.standard_normal(s).astype(np.float32), name)  # noqa: E731
    conv_w, conv_b, ein_w = f("conv_w", 8, 4, 3, 3), f("conv_b", 8), f("ein_w", 8, 8)
    att_w, att_b = f("att_w", 8, 24), f("att_b", 24)
    nodes = [h.make_node("Conv", ["x", conv_w.name, conv_b.name], ["c"], name="conv", pads=[1, 1, 1, 1]),
             h.make_node("Reshape", ["c", "tok_shape"], ["flat"], name="flat"),
             h.make_node("Transpose", ["flat"], ["tok"], name="tr", perm=[0, 2, 1]),
             h.make_node("Einsum", ["tok", ein_w.name], ["e"], name="einsum", equation="btc,cd->btd"),
             h.make_node("Attention", ["e", att_w.name, att_b.name], ["out"], name="attention", domain="com.microsoft",
                         num_heads=2)]
    g = h.make_graph(nodes, "m", [h.make_tensor_value_info("x", TP.FLOAT, ["N", 4, 4, 4])],
                     [h.make_tensor_value_info("out", TP.FLOAT, ["N", 16, 8])], [conv_w, conv_b, ein_w, att_w, att_b, nh.from_array(np.array([0, 8, -1], np.int64), "tok_shape")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)])
    feed = {"x": rng.standard_normal((16, 4, 4, 4)).astype(np.float32)}
    quant, report = onnx_gpfq.quantize(model, [feed], weight_bits=4, quiet=True)
    assert [(s.node, s.op_type) for s in report.skipped] == [("einsum", "Einsum"), ("attention", "Attention")]
    total = 4 * (8 * 4 * 9 + 8 * 8 + 8 * 24)
    d = report.to_dict()
    assert d["model_weight_bytes"] == total
    assert d["weight_fraction_quantized"] == pytest.approx(4 * 8 * 4 * 9 / total)
    last = report.table().splitlines()[-1]
    assert f"{4 * 8 * 4 * 9 / total:.1%} of the model's weight bytes quantized" in last
    assert sum("left in float:" in line for line in report.table().splitlines()) == 2


def test_matmul_with_the_constant_first():
    """Y = W X, W constant: quantized as Y^T = X^T W^T; the codes equal the reference's on the
    columns of X (weight-only: X~ = X), with the output's steps."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 24)) / 5).astype(np.float32)
    model = h.make_model(h.make_graph(
        [h.make_node("MatMul", ["w", "x"], ["y"], name="mm")], "m",
        [h.make_tensor_value_info("x", TP.FLOAT, ["N", 24, 10])], [h.make_tensor_value_info("y", TP.FLOAT, ["N", 32, 10])],
        [nh.from_array(w, "w")]), opset_imports=[h.make_opsetid("", 17)])
    feed = {"x": rng.standard_normal((16, 24, 10)).astype(np.float32)}
    quant, report = onnx_gpfq.quantize(model, [feed], weight_bits=4, scale_rule="fixed", c=1.0, quiet=True)
    onnx.checker.check_model(quant, full_check=True)
    assert [(r.node, r.weight_shape) for r in report.layers] == [("mm", (32, 24))] and not report.skipped
    qi = {t.name: nh.to_array(t) for t in quant.graph.initializer}
    X = feed["x"].transpose(0, 2, 1).reshape(1, -1, 24).astype(np.float64)
    scale = np.broadcast_to(qi["w_scale"].astype(np.float64)[None, None, :], (1, 24, 32))
    codes, _ = ref.gpfq_layer(X, X, w.T[None].astype(np.float64), scale, -7, 7)
    np.testing.assert_array_equal(codes[0].T, qi["w_quantized"])
    assert 10 * np.log10(1 / report.layers[0].rel_error) > 15
    y, yq = run(model, feed)[0], run(quant, feed)[0]
    np.testing.assert_allclose(10 * np.log10((y ** 2).sum() / ((y - yq) ** 2).sum()),
                               10 * np.log10(1 / report.layers[0].rel_error), atol=0.05)
