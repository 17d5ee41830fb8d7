"""Two-stream capture: segments reproduce a full run, each node runs once, and the X / X~ the
pipeline fed GPFQ are exactly the float model's and the quantized model's layer inputs."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gpfq import core, quantize
from onnx_gpfq.capture import Spill, Spilled, Stream, inputs
from onnx_gpfq.graph import GraphIndex, normalise
from onnx_gpfq.quantize import _row_plan
from onnx_gpfq.rewrite import dq_name
from onnx_gpfq.ops import find_targets


def small_cnn(seed=0):
    """Conv-Relu-Conv(+residual Add)-Relu-GlobalAveragePool-Flatten-Gemm, random weights."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((8, 8, 3, 3)) * 0.15).astype(np.float32)
    w3 = (rng.standard_normal((5, 8)) * 0.5).astype(np.float32)
    b3 = (rng.standard_normal(5) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["a2"], name="add"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in [("w1", w1), ("b1", b1), ("w2", w2), ("w3", w3), ("b3", b3)]]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _intermediates(model, names, x):
    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return dict(zip(names, ort.InferenceSession(model.SerializeToString(), so,
                                                providers=["CPUExecutionProvider"]).run(names, {"x": x})))


def test_stream_segments_match_full_run_and_run_each_node_once():
    model = normalise(small_cnn())
    graph = model.graph
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((4, 3, 6, 6)).astype(np.float32)} for _ in range(3)]
    stream = Stream(batches, model)
    index = GraphIndex(graph)
    wanted = ["r1", "r2", "f", "y"]
    for name in wanted:  # advance step by step, as the pipeline does
        stream.advance(list(graph.node), index.initializers, [name])
        for b, batch in enumerate(batches):
            np.testing.assert_array_equal(stream.values[name][b], _intermediates(model, [name], batch["x"])[name])
    assert stream.nodes_run == len(graph.node)
    assert stream.done == {n.name for n in graph.node}
    assert "r1" not in stream.values  # dropped once nothing left reads it


def test_pipeline_fed_gpfq_exact_float_and_quantized_layer_inputs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((24, 3, 6, 6)).astype(np.float32)
    out, report = quantize(small_cnn(), {"x": x}, weight_bits=3, batch_size=8, max_patches=10_000, quiet=True)
    base = normalise(small_cnn())
    targets, _ = find_targets(base.graph)
    assert [t.node for t in targets] == [r.node for r in report.layers] == ["conv1", "conv2", "fc"]
    out_inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    index = GraphIndex(base.graph)
    for t, row in zip(targets, report.layers):
        # Direct computation: X from the float model, X~ from the final quantized graph (later
        # layers cannot change an earlier layer's input), on the same batches.
        X_all, Xt_all = [], []
        for b in range(0, 24, 8):
            X_all.append(_intermediates(base, [t.x], x[b:b + 8])[t.x])
            Xt_all.append(_intermediates(out, [dq_name(t.x)], x[b:b + 8])[dq_name(t.x)])
        W = t.to_matrix(index.array(t.w).astype(np.float64))
        moments = core.Moments(W.shape[0], W.shape[1], "gram")
        for X, Xt in zip(X_all, Xt_all):  # equal arrays (nothing quantized upstream) passed once
            rows = t.rows(X, None)
            moments.update(rows, rows if np.array_equal(X, Xt) else t.rows(Xt, None))
        result = core.quantize_layer(W, moments, core.QuantSpec(alphabet=core.Alphabet.from_bits(3)))
        np.testing.assert_array_equal(t.from_matrix(result.codes), out_inits[f"{t.w}_quantized"])
        assert moments.m == row.rows
        # float32 products on both sides; the pipeline projects conv2's Moments on W (A, GW,
        # ||XW||^2 from the rows), which rounds differently from w^T F w: ~1e-6 relative
        np.testing.assert_allclose(result.rel_error, row.rel_error, rtol=1e-5)


def test_spilled_frontier_lives_on_disk_and_reads_back_exactly(tmp_path):
    """Budget 0: every frontier batch goes to the spill file (no mapping kept open, so nothing of it
    counts in resident memory); indexing reads it back exactly; pruned tensors give their bytes back."""
    model = normalise(small_cnn())
    graph = model.graph
    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((4, 3, 6, 6)).astype(np.float32)} for _ in range(3)]
    spill = Spill(budget=0, folder=str(tmp_path))
    stream = Stream(batches, model, spill=spill)
    index = GraphIndex(graph)
    stream.advance(list(graph.node), index.initializers, ["a2"])
    assert set(stream.values) == {"a2"}  # x, c1, r1, c2: nothing still to run reads them
    for name in ("a2",):
        entries = stream.values[name].entries()
        assert len(entries) == 3 and all(isinstance(e, Spilled) for e in entries)
        for b, batch in enumerate(batches):
            got = stream.values[name][b]
            assert type(got) is np.ndarray  # a fresh array, not a memory map
            np.testing.assert_array_equal(got, _intermediates(model, [name], batch["x"])[name])
    assert spill.in_memory == 0 and spill.spilled_bytes > 0
    stream.advance(list(graph.node), index.initializers, ["y"])
    assert "a2" not in stream.values
    assert spill.on_disk == sum(e.nbytes for name in stream.values for e in stream.values[name].entries())
    assert os.path.getsize(tmp_path / "spill.bin") <= spill.spilled_bytes


def test_rows_per_layer_are_capped_whatever_the_number_of_samples():
    """max_rows bounds each layer's rows: fewer patches per sample, then a seeded subset; the
    same rows for both streams, so the codes match a direct computation on exactly those rows."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 3, 6, 6)).astype(np.float32)  # 36 conv positions per sample
    for max_rows, conv_rows, fc_rows in ((10_000, 64 * 36, 64), (500, 64 * 7, 64), (40, 40, 40)):
        out, report = quantize(small_cnn(), {"x": x}, weight_bits=3, batch_size=16, max_rows=max_rows, quiet=True)
        assert [r.rows for r in report.layers] == [conv_rows, conv_rows, fc_rows]
    # plan: sorted, unique, in range, deterministic
    base = normalise(small_cnn())
    t = find_targets(base.graph)[0][0]
    shapes = [(16, 3, 6, 6)] * 4
    from onnx_gpfq.options import Options
    positions, keep = _row_plan(t, shapes, Options(max_rows=40), 0)
    assert all(p.shape == (16, 1) for p in positions) and sum(len(k) for k in keep) == 40
    assert all((np.diff(k) > 0).all() and k.min(initial=0) >= 0 and k.max(initial=0) < 16 for k in keep)
    again = _row_plan(t, shapes, Options(max_rows=40), 0)
    assert all((a == b).all() for a, b in zip(keep, again[1]))
    assert all((a == b).all() for a, b in zip(positions, again[0]))


def test_rows_subset_gives_the_codes_of_a_direct_computation():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((48, 3, 6, 6)).astype(np.float32)
    out, report = quantize(small_cnn(), {"x": x}, weight_bits=3, batch_size=16, max_rows=30, act_bits=None, quiet=True)
    base = normalise(small_cnn())
    t = find_targets(base.graph)[0][0]  # conv1 reads the model input: X = X~
    from onnx_gpfq.options import Options
    batches = [x[b:b + 16] for b in range(0, 48, 16)]
    positions, keep = _row_plan(t, [b.shape for b in batches], Options(max_rows=30), 0)
    rows = np.concatenate([t.rows(b, p)[:, k] for b, p, k in zip(batches, positions, keep)], axis=1)
    assert rows.shape[1] == 30
    W = t.to_matrix(GraphIndex(base.graph).array(t.w).astype(np.float64))
    moments = core.Moments(1, W.shape[1], "gram")
    moments.update(rows, rows)
    result = core.quantize_layer(W, moments, core.QuantSpec(alphabet=core.Alphabet.from_bits(3)))
    out_inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    np.testing.assert_array_equal(t.from_matrix(result.codes), out_inits[f"{t.w}_quantized"])


def test_two_streams_share_the_model_inputs_and_free_them_once_both_are_done(tmp_path):
    model = normalise(small_cnn())
    graph = model.graph
    index = GraphIndex(graph)
    rng = np.random.default_rng(6)
    batches = [{"x": rng.standard_normal((4, 3, 6, 6)).astype(np.float32)} for _ in range(2)]
    spill = Spill(budget=0, folder=str(tmp_path))
    held = inputs(batches, spill)
    a, b = Stream(held, model, spill=spill), Stream(held, model, spill=spill)
    one = batches[0]["x"].nbytes
    assert a.values["x"] is b.values["x"] and spill.spilled_bytes == spill.on_disk == 2 * one  # written once
    a.advance(list(graph.node), index.initializers, ["y"])  # a no longer needs x
    entries = held["x"].entries()
    assert len(entries) == 2 and spill.on_disk >= 2 * one  # b still reads them
    for e, batch in zip(entries, batches):
        np.testing.assert_array_equal(e.read(), batch["x"])
    b.advance(list(graph.node), index.initializers, ["y"])
    assert spill.on_disk == sum(e.nbytes for s in (a, b) for v in s.values.values() for e in v.entries()
                                if isinstance(e, Spilled))
    for i, batch in enumerate(batches):
        np.testing.assert_array_equal(a.values["y"][i], b.values["y"][i])
        np.testing.assert_array_equal(a.values["y"][i], _intermediates(model, ["y"], batch["x"])["y"])


def test_pipeline_moments_equal_a_direct_computation(monkeypatch):
    """The G, H (or, projected on W, H, tril(G)W and GW) that the two-stream capture accumulated
    equal those computed directly from the float model's and the final quantized model's layer
    inputs on the same batches."""
    seen = []
    original = core.quantize_layer

    def spy(W, moments, spec):
        seen.append((W, moments))
        return original(W, moments, spec)

    monkeypatch.setattr(core, "quantize_layer", spy)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((24, 3, 6, 6)).astype(np.float32)
    out, report = quantize(small_cnn(), {"x": x}, weight_bits=3, batch_size=8, quiet=True)
    base = normalise(small_cnn())
    targets, _ = find_targets(base.graph)
    assert len(seen) == len(targets) == 3
    forms = []
    for t, (W, mom) in zip(targets, seen):
        X = np.concatenate([t.rows(_intermediates(base, [t.x], x[b:b + 8])[t.x], None) for b in range(0, 24, 8)], axis=1)
        Xt = np.concatenate([t.rows(_intermediates(out, [dq_name(t.x)], x[b:b + 8])[dq_name(t.x)], None)
                             for b in range(0, 24, 8)], axis=1)
        X, Xt = X.astype(np.float64), Xt.astype(np.float64)
        G, H = Xt.transpose(0, 2, 1) @ X, Xt.transpose(0, 2, 1) @ Xt
        tol = dict(rtol=1e-5, atol=1e-5 * np.abs(H).max())
        np.testing.assert_allclose(mom.H, H, **tol)
        if mom.W is None:
            np.testing.assert_allclose(mom.G, G, **tol)
        else:
            np.testing.assert_allclose(mom.A, core.tril_matmul(G, W), rtol=1e-5, atol=1e-5 * np.abs(G @ W).max())
            np.testing.assert_allclose(mom.GW, G @ W, rtol=1e-5, atol=1e-5 * np.abs(G @ W).max())
        np.testing.assert_allclose(mom.mu_x, X.mean(axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mom.mu_xt, Xt.mean(axis=1), rtol=1e-5, atol=1e-6)
        forms.append("projected" if mom.W is not None else mom.form)
    assert "projected" in forms and "gram" in forms  # both accumulation paths checked


def test_runtime_session_options():
    from onnx_gpfq import runtime

    so = runtime.session_options(2, optimization="disable")  # the capture's sessions
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert so.intra_op_num_threads == 2 and so.log_severity_level == 3
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    deployed = runtime.session_options(optimization="all", spinning=True, config={"session.x": "1"})
    with pytest.raises(RuntimeError):  # no entry: onnxruntime's default, spinning
        deployed.get_session_config_entry("session.intra_op.allow_spinning")
    assert deployed.get_session_config_entry("session.x") == "1"
    assert deployed.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_peeked_output_is_kept_under_the_budget_and_given_back(tmp_path):
    """Stream.peek (an LSTM's own output, recomputed) keeps its result through the stream's Spill:
    counted in memory within the budget, on disk beyond it; release_all gives it all back."""
    model = normalise(small_cnn())
    graph = model.graph
    rng = np.random.default_rng(5)
    batches = [{"x": rng.standard_normal((4, 3, 6, 6)).astype(np.float32)} for _ in range(3)]
    one_batch = 4 * 3 * 6 * 6 * 4
    spill = Spill(budget=3 * one_batch + 1, folder=str(tmp_path))  # the inputs, and nothing more
    stream = Stream(batches, model, spill=spill)
    index = GraphIndex(graph)
    held = spill.in_memory
    peeked = stream.peek(list(graph.node), index.initializers, "a2")
    assert spill.in_memory <= spill.budget and spill.peak_in_memory <= spill.budget
    assert any(isinstance(e, Spilled) for e in peeked.entries())
    for b, batch in enumerate(batches):
        np.testing.assert_array_equal(peeked[b], _intermediates(model, ["a2"], batch["x"])["a2"])
    spill.release_all(peeked)
    assert spill.in_memory == held and not peeked and spill.on_disk == 0
    assert stream.nodes_run == 0 and "a2" not in stream.values  # peeking runs nothing for good


def test_memory_held_is_bounded_by_the_budget_whatever_the_number_of_samples():
    """The captured activations held in memory (the frontier, the model inputs, an LSTM's own
    output) never exceed --memory-budget: 4x the samples, the same bound; without a budget they
    grow with the samples. Spilling changes nothing in the output model."""
    from test_coverage import data as lstm_data, recurrent_model

    model = recurrent_model("LSTM", bidir=True)  # the LSTM's rows come from Stream.peek
    budget = 48 << 10
    held = {}
    for n in (32, 128):
        cal = lstm_data(n=n)
        opts = dict(weight_bits=4, batch_size=8, batch_axes=[("x", 1)], quiet=True)
        bounded, r = quantize(model, cal, memory_budget=budget, **opts)
        free, r_free = quantize(model, cal, memory_budget=None, **opts)
        assert 0 < r.peak_held_bytes <= budget and r.spilled_bytes > 0
        assert bounded.SerializeToString() == free.SerializeToString()
        held[n] = r_free.peak_held_bytes
    assert held[128] >= 3 * held[32] > 3 * budget  # what the budget bounds does grow with the samples


def test_spill_arena_reuses_freed_extents_and_reads_back_every_batch(tmp_path):
    """Extents of released batches are reused (smallest that fits, neighbours merged, the tail
    trimmed): the file never grows past what was held at once plus fragments, and every live
    batch reads back exactly, whatever was freed around it."""
    spill = Spill(budget=0, folder=str(tmp_path))
    rng = np.random.default_rng(0)
    live, peak = {}, 0
    for step in range(300):
        if live and rng.random() < 0.45:
            key = sorted(live)[rng.integers(len(live))]
            spill.release(live.pop(key)[0])
        else:
            a = rng.standard_normal(int(rng.integers(1, 5000))).astype(np.float32)
            live[step] = (spill.keep(a), a)
        peak = max(peak, spill.on_disk)
        assert spill.on_disk == sum(e.nbytes for e, _ in live.values())
    for entry, a in live.values():
        np.testing.assert_array_equal(entry.read(), a)
    assert os.path.getsize(tmp_path / "spill.bin") <= 2 * peak
    for entry, _ in list(live.values()):
        spill.release(entry)
    assert spill.on_disk == 0 and spill._end == 0 and spill._free == []  # all merged back, nothing left
    spill.close()
