"""SmoothQuant-style migration (--smooth) and mixed 8/16-bit activations (--act-bits auto).

The migration must leave the float model's outputs unchanged, reach every consumer of the smoothed
tensor, and lower the consumers' 8-bit output error where a channel is an outlier; the mixed
precision must promote the measured costliest tensors within the budget, as 16-bit QDQ."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_gpfq
from onnx_gpfq import mixed, smooth
from onnx_gpfq.errors import UserError
from onnx_gpfq.graph import GraphIndex, normalise
from onnx_gpfq.options import Options

C, T = 16, 12  # channels, tokens


def _block(outlier=30.0, share_weight=False, ln_axis=-1):
    """x (n, T, C) -> LayerNormalization (gamma with an outlier channel) -> three MatMuls (Q/K/V-like,
    reading the same output) and a residual Add; the first projection -> Add bias -> MatMul (a
    MatMul+Add producer) -> output. Outputs: the sum of the branches, and the residual."""
    rng = np.random.default_rng(0)
    gamma = np.ones(C, np.float32)
    gamma[3] = outlier
    beta = (0.1 * rng.standard_normal(C)).astype(np.float32)
    w = [(rng.standard_normal((C, C)) / np.sqrt(C)).astype(np.float32) for _ in range(4)]
    w[1][:, 5] *= 0.05
    b0 = (rng.standard_normal(C)).astype(np.float32)
    b0[7] = 40.0  # an outlier channel of the MatMul+Add output
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(beta, "beta"),
             numpy_helper.from_array(b0, "b0")]
    inits += [numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(w)]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=ln_axis),
        helper.make_node("MatMul", ["ln", "w0"], ["q"], name="q"),
        helper.make_node("MatMul", ["ln", "w1"], ["k"], name="k"),
        helper.make_node("MatMul", ["ln", "w2"], ["v"], name="v"),
        helper.make_node("Add", ["q", "b0"], ["qb"], name="qb"),
        helper.make_node("MatMul", ["qb", "w3"], ["p"], name="p"),
        helper.make_node("Add", ["p", "k"], ["s1"], name="s1"),
        helper.make_node("Add", ["s1", "v"], ["y"], name="y"),
    ]
    if share_weight:  # v's weight also read by a MatMul on x
        nodes += [helper.make_node("MatMul", ["x", "w2"], ["z"], name="z"),
                  helper.make_node("Add", ["ln", "z"], ["res"], name="res")]
    else:
        nodes.append(helper.make_node("Add", ["ln", "x"], ["res"], name="res"))
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, T, C])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("res", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _data(n=48, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, T, C)).astype(np.float32)}


def _run(model, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, x)


def _batches(data, size=16):
    return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, len(data["x"]), size)]


def test_migration_is_exact_in_float_and_reaches_every_consumer():
    base = normalise(_block())
    data = _data()
    smoothed, chosen = smooth.smooth(base, _batches(data), Options(smooth=0.5, weight_bits=8))
    assert {c.tensor for c in chosen} == {"ln", "qb"}
    assert all(c.alpha == 0.5 for c in chosen)
    for a, b in zip(_run(base, data), _run(smoothed, data)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    index = GraphIndex(smoothed.graph)
    # the residual Add keeps the original LayerNormalization; the three projections read the copy
    assert [n.name for n in index.consumers["ln"] if n.op_type != "Shape"] == ["res"]
    assert sorted(n.name for n in index.consumers["ln_smoothed"]) == ["k", "q", "v"]
    # the outlier channel shrank in the copy's gamma, and the weights took the inverse scale
    gamma = index.array(index.producer["ln_smoothed"].input[1])
    assert gamma[3] < 30.0 and index.array("gamma")[3] == 30.0
    s = 30.0 / gamma[3]
    old = numpy_helper.to_array(next(t for t in base.graph.initializer if t.name == "w1"))
    np.testing.assert_allclose(index.array("w1")[3], old[3] * s, rtol=1e-5)
    assert base.graph.node[0].input[1] == "gamma"  # the input model is not modified
    assert np.array_equal(numpy_helper.to_array(next(t for t in base.graph.initializer if t.name == "gamma"))[3], 30.0)


def test_auto_alpha_lowers_the_consumers_error_against_an_independent_computation():
    base = normalise(_block())
    data = _data()
    options = Options(smooth="auto", weight_bits=8)
    _, chosen = smooth.smooth(base, _batches(data), options)
    ln = next(c for c in chosen if c.tensor == "ln")
    assert ln.alpha > 0 and ln.error < 0.5 * ln.error_off
    # error_off recomputed here: 8-bit min-max X over all data, per-column RTN weights at 8 bits
    x = _run(_with_output(base, "ln"), data)[-1].reshape(-1, C).astype(np.float64)
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = np.float32((hi - lo) / 255)
    zp = np.clip(np.round(-lo / scale), 0, 255)
    xq = (np.clip(np.rint(x / scale) + zp, 0, 255) - zp) * scale
    num = den = 0.0
    for name in ("w0", "w1", "w2"):
        w = numpy_helper.to_array(next(t for t in base.graph.initializer if t.name == name)).astype(np.float64)
        step = np.abs(w).max(axis=0) / 127
        num += np.sum((x @ w - xq @ (np.round(w / step) * step)) ** 2)
        den += np.sum((x @ w) ** 2)
    # the search keeps a subsample of ROWS rows: all of them here (48 x 12 = 576)
    assert ln.error_off == pytest.approx(num / den, rel=1e-6)


def _with_output(model, name):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.ValueInfoProto(name=name))
    return m


def test_not_smoothed_where_the_inverse_scale_cannot_reach_every_reader():
    data = _data()
    # v shares its weight with a MatMul on x: the LayerNormalization output cannot be smoothed, qb still can
    _, chosen = smooth.smooth(normalise(_block(share_weight=True)), _batches(data), Options(smooth=0.5))
    assert {c.tensor for c in chosen} == {"qb"}
    # LayerNormalization over another axis than the last: not a per-channel producer
    _, chosen = smooth.smooth(normalise(_block(ln_axis=1)), _batches(data), Options(smooth=0.5))
    assert {c.tensor for c in chosen} == {"qb"}
    # an excluded reader of qb stays float: qb (a MatMul+Add output, no copy) is left alone
    _, chosen = smooth.smooth(normalise(_block()), _batches(data), Options(smooth=0.5, exclude=("p",)))
    assert {c.tensor for c in chosen} == {"ln"}
    # layers reading their input in float (MatMulNBits) are not smoothed
    _, chosen = smooth.smooth(normalise(_block()), _batches(data), Options(smooth=0.5, weight_format="matmulnbits"))
    assert chosen == []
    # off, and weight-only runs, change nothing
    base = normalise(_block())
    assert smooth.smooth(base, _batches(data), Options(smooth="off")) == (base, [])
    assert smooth.smooth(base, _batches(data), Options(smooth="auto", act_bits=None)) == (base, [])


def test_quantize_with_smoothing_is_more_accurate_and_deterministic(tmp_path):
    model, calib, test = _block(), _data(64, 1), _data(64, 2)
    ref = _run(model, test)

    def sqnr(options):
        q, report = onnx_gpfq.quantize(model, calib, quiet=True, weight_bits=8, **options)
        out = _run(q, test)
        err = sum(np.sum((o - r) ** 2) for o, r in zip(out, ref))
        return 10 * np.log10(sum(np.sum(r ** 2) for r in ref) / err), q, report

    off, _, report_off = sqnr({"smooth": "off"})
    on, q1, report = sqnr({"smooth": "auto"})
    assert on > off + 0.5, (on, off)  # y is dominated by p, whose input outlier is a constant offset
    errors = {r.node: r.rel_error for r in report.layers}
    for r in report_off.layers:
        if r.node in ("q", "k", "v"):  # the layers reading the LayerNormalization output
            assert errors[r.node] < r.rel_error / 5, (r.node, errors[r.node], r.rel_error)
    assert {m.tensor for m in report.smoothed if m.alpha > 0} == {"ln", "qb"}
    assert "smoothing: 2 of 2" in report.table()
    # every layer reads a quantized input (the smoothed copy's QDQ), so onnxruntime runs it on int8 kernels
    producer = {o: n for n in q1.graph.node for o in n.output}
    for node in q1.graph.node:
        if node.op_type == "MatMul":
            assert producer[node.input[0]].op_type == "DequantizeLinear", node.name
    assert "ln_smoothed" in {n.input[0] for n in q1.graph.node if n.op_type == "QuantizeLinear"}
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(q1.SerializeToString(), so, providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert fused.count("MatMulIntegerToFloat") == 4 and "MatMul" not in fused, fused
    _, q2, _ = sqnr({"smooth": "auto"})
    assert q1.SerializeToString() == q2.SerializeToString()


def test_options_parse_smooth_and_budget():
    assert Options(smooth="0.5").smooth == 0.5 and Options(smooth="AUTO").smooth == "auto"
    assert Options(act16_budget="5%").act16_budget == pytest.approx(0.05)
    assert Options(act_bits="auto").act_bits == "auto"
    for bad in ({"smooth": 0}, {"smooth": "strong"}, {"act16_budget": -0.1}, {"act16_budget": "x%"}):
        with pytest.raises(UserError):
            Options(**bad)


# --- --act-bits auto ----------------------------------------------------------------------

def _qdq_dtypes(model):
    inits = {t.name: t for t in model.graph.initializer}
    return {n.input[0]: inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}


def test_act_bits_auto_promotes_the_costliest_tensors_within_the_budget():
    model, calib = _block(), _data(64, 1)
    q, report = onnx_gpfq.quantize(model, calib, quiet=True, weight_bits=8, act_bits="auto", act16_budget=0.5,
                                   smooth="off", act_calibration="minmax")  # checked below: unsmoothed, min-max ranges
    costs = report.promotions
    assert len(costs) == 2 and [p.cost for p in costs] == sorted((p.cost for p in costs), reverse=True)
    assert [p.promoted for p in costs] == [True, False]  # floor(0.5 x 2) = 1: the costliest
    dtypes = _qdq_dtypes(q)
    assert dtypes[costs[0].tensor] == TensorProto.UINT16 and dtypes[costs[1].tensor] == TensorProto.UINT8
    # multiply-adds per sample of the readers of the promoted tensor: T x C x C per MatMul
    assert costs[0].macs == len(costs[0].consumers) * T * C * C
    # the cost is the model's output error with that tensor alone at 8 bits: checked independently
    base = normalise(model)
    batch = {k: v[:mixed.PROBE_SAMPLES] for k, v in calib.items()}
    ref = _run(base, batch)
    p = costs[1]
    x = _run(_with_output(base, p.tensor), batch)[-1].astype(np.float64)
    lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
    scale = float(np.float32((hi - lo) / 255))
    zp = int(np.clip(np.round(-lo / scale), 0, 255))
    from onnx_gpfq import rewrite
    nodes, inits = rewrite.apply(base.graph, {}, {p.tensor: rewrite.ActQuant(scale, zp, np.uint8)})
    got = _run(rewrite.build_model(base, nodes, inits), batch)
    expect = sum(np.sum((g.astype(np.float64) - r) ** 2) for g, r in zip(got, ref)) / sum(np.sum(r.astype(np.float64) ** 2) for r in ref)
    assert p.cost == pytest.approx(expect, rel=1e-6)
    assert "16-bit activation" in report.table()
    # budget 0: nothing promoted
    q0, report0 = onnx_gpfq.quantize(model, calib, quiet=True, weight_bits=8, act_bits="auto", act16_budget=0.0)
    assert not any(p.promoted for p in report0.promotions)
    assert set(_qdq_dtypes(q0).values()) == {TensorProto.UINT8}
