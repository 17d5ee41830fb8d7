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
from onnx_gpfq import cpu
from onnx_gpfq.errors import UserError
from onnx_gpfq.graph import GraphIndex
from onnx_gpfq.ops import find_targets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from onnx_gpfq.core import reference as ref  # noqa: E402

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
    quant, report = onnx_gpfq.quantize(model, [data(seq_lens)], weight_bits=4, recurrent_format="qdq", quiet=True)
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


def _weights(model, node_op):
    """W and R of the ``node_op`` node as the float values it reads: float initializers (float32
    format) or DequantizeLinear of int8 codes per row, reshaped (qdq format)."""
    index = GraphIndex(model.graph)
    node = next(n for n in model.graph.node if n.op_type == node_op)
    out = []
    for slot in (1, 2):
        name = node.input[slot]
        if name in index.initializers:
            out.append(index.array(name))
            continue
        shape = index.array(index.producer[name].input[1])
        dq = index.producer[index.producer[name].input[0]]
        codes, scale = index.array(dq.input[0]).astype(np.float32), index.array(dq.input[1])
        out.append((codes * scale[:, None]).astype(np.float32).reshape(shape))
    return out


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_format_choice(op):
    """--recurrent-format auto: an LSTM as DynamicQuantizeLSTM (int8 W and R, the same codes and
    per-row steps as the qdq format's, transposed to (D, fan-in, G*H)), GRU and RNN as float32 values
    equal, bit for bit, to what DequantizeLinear computes from the qdq format's codes, so the
    float32 model's output is the qdq model's; no DequantizeLinear on a recurrent weight. (On a VNNI
    target: for --target any, DynamicQuantizeLSTM's u8s8 products are pair-bounded, the qdq LSTM's
    float ones are not.)"""
    model = recurrent_model(op, True, True, True)
    feed = data(True, seed=2)
    opts = dict(weight_bits=8, target="x86-vnni", quiet=True)
    qdq, _ = onnx_gpfq.quantize(model, [data(True)], recurrent_format="qdq", **opts)
    auto, report = onnx_gpfq.quantize(model, [data(True)], **opts)
    onnx.checker.check_model(auto, full_check=True)
    index = GraphIndex(auto.graph)
    if op == "LSTM":
        node = next(n for n in auto.graph.node if n.op_type == "DynamicQuantizeLSTM")
        assert node.domain == "com.microsoft" and not any(n.op_type == "LSTM" for n in auto.graph.node)
        for slot, scale_slot, want in zip((1, 2), (8, 10), _weights(qdq, "LSTM")):
            codes = index.array(node.input[slot])
            assert codes.dtype == np.int8
            got = codes.astype(np.float32) * index.array(node.input[scale_slot])[:, None, :]
            np.testing.assert_array_equal(got.transpose(0, 2, 1), want)
        # the run-time uint8 quantization of input and hidden state costs little against the qdq model; measured
        # on the models for --target any, which no CPU's u8s8 products saturate (x86-vnni's do on AVX2)
        qdq_any, auto_any = (onnx_gpfq.quantize(model, [data(True)], weight_bits=8, quiet=True, **more)[0]
                             for more in ({"recurrent_format": "qdq"}, {}))
        a, b, f = run(qdq_any, feed)[0], run(auto_any, feed)[0], run(model, feed)[0]
        assert 10 * np.log10((f ** 2).sum() / ((f - b) ** 2).sum()) > 10 * np.log10((f ** 2).sum() / ((f - a) ** 2).sum()) - 3
        assert report.quant_weight_bytes < report.float_weight_bytes / 3  # int8: the size column stays honest
    else:
        for got, want in zip(_weights(auto, op), _weights(qdq, op)):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(run(auto, feed)[0], run(qdq, feed)[0])
        rnn = {r.node: r for r in report.layers}
        w_bytes = sum(int(np.prod(r.weight_shape)) for k, r in rnn.items() if k.startswith("rnn:"))
        fc = next(r for k, r in rnn.items() if k == "fc")
        assert report.quant_weight_bytes == 4 * w_bytes + int(np.prod(fc.weight_shape))  # float32: 4 bytes a weight
    assert not any(n.op_type == "DequantizeLinear" and n.output[0] in {i for m in auto.graph.node if m.op_type in (
        op, "DynamicQuantizeLSTM") for i in m.input} for n in auto.graph.node)


def test_dynamic_lstm_codes_keep_the_pair_bound():
    """DynamicQuantizeLSTM multiplies uint8 activations by the int8 codes on onnxruntime's u8s8 GEMM, which
    saturates on x86 without VNNI: under --target any the codes of W and R keep the pair bound along the
    fan-in (the GEMM's K), as the int8 Conv/Gemm codes do."""
    model = recurrent_model("LSTM", True, True, True)
    quant, report = onnx_gpfq.quantize(model, [data(True)], weight_bits=8, quiet=True)
    index = GraphIndex(quant.graph)
    node = next(n for n in quant.graph.node if n.op_type == "DynamicQuantizeLSTM")
    for slot in (1, 2):
        codes = index.array(node.input[slot])  # (D, fan-in, G*H)
        assert all(cpu.pair_reach(codes[d]).max() <= cpu.PAIR_BOUND for d in range(codes.shape[0]))
    assert report.bounded_layers == 3  # W, R and the head's MatMul


def test_recurrent_format_is_validated():
    with pytest.raises(UserError, match="--recurrent-format must be one of auto, dynamic, float32, qdq"):
        onnx_gpfq.Options(recurrent_format="int3")


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
    quant, _ = onnx_gpfq.quantize(model, [feed], weight_bits=4, act_bits=None, scale_rule="fixed", c=1.0,
                                  recurrent_format="qdq", quiet=True)
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


def silero_like(seed=0, L=64):
    """An If on a scalar ``sr`` (16 kHz / 8 kHz) choosing between two branches, each with a Conv,
    an LSTM and a Gemm; then a second If on a shape test (the input's length is static)."""
    rng = np.random.default_rng(seed)
    f = lambda name, *s: nh.from_array((rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32), name)  # noqa: E731

    def branch(tag, stride):
        inits = [f(f"{tag}_conv_w", 8, 1, 3), f(f"{tag}_W", 1, 64, 8), f(f"{tag}_R", 1, 64, 16), f(f"{tag}_B", 1, 128),
                 f(f"{tag}_fc_w", 16, 4), nh.from_array(np.array([0], np.int64), f"{tag}_axes")]
        nodes = [h.make_node("Conv", ["x", f"{tag}_conv_w"], [f"{tag}_c"], name=f"{tag}_conv", pads=[1, 1], strides=[stride]),
                 h.make_node("Relu", [f"{tag}_c"], [f"{tag}_r"], name=f"{tag}_relu"),
                 h.make_node("Transpose", [f"{tag}_r"], [f"{tag}_seq"], name=f"{tag}_tr", perm=[2, 0, 1]),
                 h.make_node("LSTM", [f"{tag}_seq", f"{tag}_W", f"{tag}_R", f"{tag}_B"], ["", f"{tag}_h"],
                             name=f"{tag}_lstm", hidden_size=16),
                 h.make_node("Squeeze", [f"{tag}_h", f"{tag}_axes"], [f"{tag}_feat"], name=f"{tag}_sq"),
                 h.make_node("Gemm", [f"{tag}_feat", f"{tag}_fc_w"], [f"{tag}_out"], name=f"{tag}_fc")]
        return h.make_graph(nodes, tag, [], [h.make_tensor_value_info(f"{tag}_out", TP.FLOAT, None)], initializer=inits)

    inits = [nh.from_array(np.array(16000, np.int64), "k16"), nh.from_array(np.array([2], np.int64), "two"),
             nh.from_array(np.array([L], np.int64), "len"), nh.from_array(np.float32(1.5), "scale")]
    nodes = [h.make_node("Equal", ["sr", "k16"], ["is16"], name="eq"),
             h.make_node("If", ["is16"], ["y"], name="sr_if", then_branch=branch("b16", 1), else_branch=branch("b8", 2)),
             h.make_node("Shape", ["x"], ["xs"], name="shape"),
             h.make_node("Gather", ["xs", "two"], ["xl"], name="gather", axis=0),
             h.make_node("Equal", ["xl", "len"], ["full"], name="eq_len"),
             h.make_node("Squeeze", ["full"], ["full_s"], name="sq"),
             h.make_node("If", ["full_s"], ["out"], name="len_if",
                         then_branch=h.make_graph([h.make_node("Mul", ["y", "scale"], ["t"], name="mul")], "t", [],
                                                  [h.make_tensor_value_info("t", TP.FLOAT, None)]),
                         else_branch=h.make_graph([h.make_node("Identity", ["y"], ["e"], name="id")], "e", [],
                                                  [h.make_tensor_value_info("e", TP.FLOAT, None)]))]
    g = h.make_graph(nodes, "silero_like", [h.make_tensor_value_info("x", TP.FLOAT, ["N", 1, L]),
                                            h.make_tensor_value_info("sr", TP.INT64, [])],
                     [h.make_tensor_value_info("out", TP.FLOAT, ["N", 4])], initializer=inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def test_fix_input_inlines_the_branch_taken():
    model = silero_like()
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 1, 64)).astype(np.float32)
    with pytest.raises(onnx_gpfq.errors.UserError, match="nothing to quantize"):
        onnx_gpfq.quantize(model, [{"x": x, "sr": np.array(16000)}], quiet=True)
    quant, report = onnx_gpfq.quantize(model, [{"x": x}], fix_inputs={"sr": 16000}, weight_bits=4, quiet=True)
    onnx.checker.check_model(quant, full_check=True)
    assert [i.name for i in quant.graph.input] == ["x"]
    assert not any(n.op_type == "If" for n in quant.graph.node)
    assert sorted(r.node for r in report.layers) == ["sr_if/b16_conv", "sr_if/b16_fc", "sr_if/b16_lstm:R",
                                                     "sr_if/b16_lstm:W"]
    assert report.weight_fraction == 1.0 and not report.skipped
    assert report.fixed_inputs == {"sr": 16000} and report.inlined_ifs == ["sr_if", "len_if"]
    assert "inputs fixed: sr=16000" in report.table()
    want = run(model, {"x": x, "sr": np.array(16000)})[0]
    got = run(quant, {"x": x})[0]
    assert 10 * np.log10((want ** 2).sum() / ((want - got) ** 2).sum()) > 15
    # the other rate takes the other branch
    _, report8 = onnx_gpfq.quantize(model, [{"x": x}], fix_inputs={"sr": 8000}, weight_bits=4, quiet=True)
    assert sorted(r.node for r in report8.layers)[0] == "sr_if/b8_conv"


def test_without_fix_input_branch_layers_are_listed():
    _, skipped = find_targets(silero_like().graph)
    assert sorted(s.node for s in skipped) == sorted(f"{t}_{k}" for t in ("b16", "b8") for k in ("conv", "lstm", "fc"))
    assert all("--fix-input" in s.reason for s in skipped)


def test_fix_input_errors(tmp_path, capsys):
    from onnx_gpfq.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(silero_like(), str(path))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((4, 1, 64)).astype(np.float32))
    for bad, message in (("sr", "must look like NAME=VALUE"), ("nope=1", "not a model input"), ("sr=abc", "must look like"),
                         ("sr=1,2", "the input is a scalar")):
        argv = ["quantize", str(path), "-o", str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "c.npz"), "--fix-input", bad]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "o.onnx").exists()
    assert main(["quantize", str(path), "-o", str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "c.npz"), "--fix-input",
                 "sr=16000", "--quiet"]) == 0
    assert [i.name for i in onnx.load(str(tmp_path / "o.onnx")).graph.input] == ["x"]


def test_fix_input_from_the_config(tmp_path):
    from onnx_gpfq.cli import main

    path = tmp_path / "m.onnx"
    onnx.save(silero_like(), str(path))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).standard_normal((4, 1, 64)).astype(np.float32))
    (tmp_path / "cfg.toml").write_text("fix_inputs = {sr = 8000}\n")
    argv = ["quantize", str(path), "-o", str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "c.npz"), "--quiet",
            "--config", str(tmp_path / "cfg.toml"), "--report", str(tmp_path / "r.json")]
    assert main(argv) == 0
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fixed_inputs"] == {"sr": 8000} and report["weight_fraction_quantized"] == 1.0
    assert sorted(r["node"] for r in report["layers"])[0] == "sr_if/b8_conv"
    assert main(argv + ["--fix-input", "sr=16000"]) == 0  # the command line overrides the config
    assert json.loads((tmp_path / "r.json").read_text())["fixed_inputs"] == {"sr": 16000}


@pytest.mark.parametrize("op", sorted(GATES))
def test_recurrent_targets_have_a_consistent_view(op):
    """The protocol checks tests/test_targets.py makes for the one-weight ops, on W and R."""
    model = recurrent_model(op, bidir=True, head=False)
    targets, skipped = find_targets(model.graph)
    assert [type(t).__name__ for t in targets] == [op, f"{op}Hidden"] and not skipped
    index = GraphIndex(model.graph)
    x = data(n=3)["x"]
    y = np.zeros((T, 2, 3, H), np.float32)
    for t, a in zip(targets, (x, y)):
        w = index.array(t.w)
        W = t.to_matrix(w)
        assert W.shape == (2, w.shape[2], w.shape[1])
        np.testing.assert_array_equal(t.from_matrix(W).reshape(w.shape), w)
        assert t.n_out == W.shape[0] * W.shape[2] and t.fan_in == W.shape[1]
        rows = t.rows(a, None)
        assert rows.shape == (2, t.samples(a.shape) * t.rows_per_sample(a.shape), W.shape[1])
        pos = t.positions(a.shape, 5, np.random.default_rng(0))
        assert t.rows(a, pos).shape == (2, 3 * 5, W.shape[1])
        np.testing.assert_array_equal(np.sort(t.kernel_order()), np.arange(W.shape[1]))
        assert not t.INT8_KERNEL
