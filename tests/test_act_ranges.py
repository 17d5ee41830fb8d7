"""--act-calibration auto: each activation's range chosen by the error it causes at the outputs of the
layers that read it (onnx_gpfq.act_ranges), checked against a brute-force reference; the report rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gpfq import act_ranges, quantize
from onnx_gpfq.cli import main
from onnx_gpfq.graph import GraphIndex, serialize
from onnx_gpfq.ops.conv import Conv
from onnx_gpfq.ops.matmul import MatMul
from onnx_gpfq.rewrite import act_quant_from_range

ROOT = Path(__file__).resolve().parent.parent
MLP, CALIB = str(ROOT / "models" / "digits_mlp.onnx"), str(ROOT / "models" / "digits_calib.npz")


def _brute_force_candidates(x: np.ndarray, percentiles) -> dict[str, tuple[float, float]]:
    """The single rules' ranges computed from the definitions, all values used."""
    flat = x.reshape(-1).astype(np.float64)
    lo, hi = float(flat.min()), float(flat.max())
    out = {"minmax": (lo, hi)}
    for p in percentiles:
        out[f"percentile:{p:g}"] = tuple(float(v) for v in np.percentile(flat, [100 - p, p]))
    errs = []
    for a in np.linspace(1.0, 0.05, 40):
        q = act_quant_from_range(a * lo, a * hi, 8, False)
        codes = np.clip(np.round(flat / q.scale) + q.zero_point, 0, 255)  # numpy rounds half to even, like ONNX
        errs.append((np.mean(((codes - q.zero_point) * q.scale - flat) ** 2), a))
    a = min(errs, key=lambda e: e[0])[1]  # the first of equal errors, like the rule
    out["mse"] = (float(a * lo), float(a * hi))
    return out


def _brute_force_score(x_rows: np.ndarray, W: np.ndarray, lo: float, hi: float) -> float:
    """||(QDQ(X) - X) W||^2 / ||X W||^2 by the definition of QuantizeLinear/DequantizeLinear."""
    q = act_quant_from_range(lo, hi, 8, False)
    codes = np.clip(np.round(x_rows / q.scale) + q.zero_point, 0, 255)
    err = ((codes - q.zero_point) * q.scale - x_rows) @ W
    return float(np.sum(err ** 2) / np.sum((x_rows @ W) ** 2))


def _matmul_case(seed: int, outlier: float):
    """A MatMul layer reading x (batches of (8, 16, 12) tokens): channel 0 carries rare large
    values and W weighs that channel heavily, so clipping it costs at the output."""
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((8, 16, 12)).astype(np.float32) for _ in range(2)]
    for b in batches:
        b[..., 0] *= 0.1
        mask = rng.random(b.shape[:-1]) < 0.01
        b[..., 0][mask] = outlier * rng.choice([-1.0, 1.0], mask.sum())
    w = (rng.standard_normal((12, 10)) * 0.1).astype(np.float32)
    w[0] *= 50.0
    layer = MatMul(node="mm", x="x", w="w", w_shape=(12, 10))
    return batches, w, layer


@pytest.mark.parametrize("seed,outlier", [(0, 8.0), (1, 20.0), (2, 3.0)])
def test_auto_scores_no_worse_than_any_candidate_against_brute_force(seed, outlier):
    batches, w, layer = _matmul_case(seed, outlier)
    scorer = act_ranges.Scorer.of(layer, w, np.random.default_rng(0))
    quant, row = act_ranges.choose("x", batches, "auto", 8, False, 99.99, [scorer], np.random.default_rng(seed))
    x = np.concatenate(batches).reshape(-1, 12).astype(np.float64)  # 256 rows: all of them scored
    cands = _brute_force_candidates(np.concatenate(batches), act_ranges.PERCENTILES)
    scores = {rule: _brute_force_score(x, w.astype(np.float64), *r) for rule, r in cands.items()}
    assert row.rule in scores
    assert (row.lo, row.hi) == pytest.approx(cands[row.rule], rel=1e-12)
    assert quant == act_quant_from_range(*cands[row.rule], 8, False)
    assert scores[row.rule] <= min(scores.values()) * (1 + 1e-9)
    ref = -10 * np.log10(scores[row.rule])
    assert row.layers_sqnr_db == pytest.approx(ref, abs=1e-6)
    assert row.layers == ("mm",)


def _massive_rows_case():
    """A MatMul reading x (batches of (8, 16, 12) tokens) in which 1% of the rows are massive:
    channel 0 at +80 and channel 1 at -40, which W (row 1 = 2 x row 0) cancels at the output, so
    such a row's output is as small as any other's. Clipping the +80s saves all other rows most
    of their rounding error and costs the massive rows their whole output."""
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((8, 16, 12)).astype(np.float32) for _ in range(2)]
    for b in batches:
        mask = rng.random(b.shape[:-1]) < 0.01
        b[..., 0][mask], b[..., 1][mask] = 80.0, -40.0
    w = (rng.standard_normal((12, 10)) * 0.1).astype(np.float32)
    w[1] = 2 * w[0]
    return batches, w, MatMul(node="mm", x="x", w="w", w_shape=(12, 10))


def test_auto_never_clips_a_row_out_of_its_output(monkeypatch):
    """A clip under which some scored row's output error exceeds ROW_ERROR_LIMIT times its output
    (and the worst row's under min-max) is not a candidate, even where its summed score is the
    lowest: a transformer's massive activation clipped. Without the limit auto takes that clip."""
    batches, w, layer = _massive_rows_case()
    x = np.concatenate(batches).reshape(-1, 12).astype(np.float64)
    W = w.astype(np.float64)

    def worst_row(lo, hi):
        q = act_quant_from_range(lo, hi, 8, False)
        codes = np.clip(np.round(x / q.scale) + q.zero_point, 0, 255)
        err = ((codes - q.zero_point) * q.scale - x) @ W
        return float(np.max(np.sum(err ** 2, axis=1) / np.sum((x @ W) ** 2, axis=1)))

    def auto():
        scorer = act_ranges.Scorer.of(layer, w, np.random.default_rng(0))
        return act_ranges.choose("x", batches, "auto", 8, False, 99.99, [scorer], np.random.default_rng(1))[1]

    kept, limit = auto(), act_ranges.ROW_ERROR_LIMIT
    assert worst_row(kept.lo, kept.hi) <= limit
    monkeypatch.setattr(act_ranges, "ROW_ERROR_LIMIT", float("inf"))
    free = auto()
    assert free.rule != "minmax" and free.rule != kept.rule
    assert worst_row(free.lo, free.hi) > 2 * limit  # some row's output destroyed
    assert worst_row(float(x.min()), float(x.max())) < 1.0
    assert free.layers_sqnr_db > kept.layers_sqnr_db  # the sum over rows preferred the clip


def test_auto_clips_what_the_layer_ignores_where_the_own_mse_keeps_it():
    """Channel 0 is wide (std 4) and the layer reads it with weight 0; the others are narrow and
    weighted: clipping channel 0 costs the output nothing, the step it saves is what counts."""
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((8, 16, 12)).astype(np.float32) * 0.2 for _ in range(2)]
    for b in batches:
        b[..., 0] *= 20.0
    w = rng.standard_normal((12, 10)).astype(np.float32)
    w[0] = 0.0
    layer = MatMul(node="mm", x="x", w="w", w_shape=(12, 10))
    fresh = lambda: np.random.default_rng(5)  # noqa: E731
    scorer = act_ranges.Scorer.of(layer, w, fresh())
    _, auto = act_ranges.choose("x", batches, "auto", 8, False, 99.99, [scorer], fresh())
    _, mse = act_ranges.choose("x", batches, "mse", 8, False, 99.99, [scorer], fresh())
    assert auto.hi < 0.9 * mse.hi
    assert auto.layers_sqnr_db > mse.layers_sqnr_db + 1.0
    assert auto.sqnr_db < mse.sqnr_db  # worse on the tensor itself
    # the same tensor with no layer reading it is scored on itself: the own-MSE clip wins; where a
    # layer reads it in float (no grid of its own: its clip's cost unmeasured), min-max is kept
    _, alone = act_ranges.choose("x", batches, "auto", 8, False, 99.99, [], fresh())
    assert alone.layers == () and alone.layers_sqnr_db is None
    assert alone.sqnr_db >= mse.sqnr_db - 1e-9 and alone.hi < float(max(b.max() for b in batches))
    _, onward = act_ranges.choose("x", batches, "auto", 8, False, 99.99, [], fresh(), read_in_float=True)
    assert onward.rule == "minmax" and onward.hi == float(max(b.max() for b in batches))


def test_single_rules_are_kept_as_given():
    batches, w, layer = _matmul_case(0, 8.0)
    for rule in ("minmax", "percentile", "mse"):
        _, row = act_ranges.choose("x", batches, rule, 8, False, 99.9, [], np.random.default_rng(0))
        assert row.rule.split(":")[0] == rule
    _, row = act_ranges.choose("x", batches, "minmax", 8, False, 99.9, [], np.random.default_rng(0))
    assert (row.lo, row.hi) == (float(min(b.min() for b in batches)), float(max(b.max() for b in batches)))


def _residual_graph() -> onnx.GraphProto:
    """x -> Conv a -> Add(a, x) -> Conv b -> Concat(., x) -> y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), n) for n in ("wa", "wb")]
    nodes = [helper.make_node("Conv", ["x", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["a", "x"], ["s"], name="add"),
             helper.make_node("Conv", ["s", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["b", "x"], ["y"], name="cat", axis=1)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])
    return helper.make_graph(nodes, "g", [x], [y], inits)


def test_scoring_layers_walk_through_a_residual_add_and_fall_back_on_concat():
    graph = _residual_graph()
    conv = lambda name, x, w: Conv(node=name, x=x, w=w, w_shape=(4, 4, 3, 3), kernel=(3, 3), strides=(1, 1),  # noqa: E731
                                   pads=(1, 1, 1, 1), dilations=(1, 1))
    a, b = conv("conv_a", "x", "wa"), conv("conv_b", "s", "wb")
    found = {k: [(t.node, steps) for t, steps in v] for k, v in act_ranges.scoring_layers(graph, [a, b], {"conv_a", "conv_b"}).items()}
    assert found["a"] == [("conv_b", ())]  # a feeds only the Add: scored at the next Conv
    assert found["x"] == [("conv_a", ()), ("conv_b", ())]  # read by conv_a, and through the Add
    assert found["s"] == [("conv_b", ())]
    assert "b" not in found  # goes on into Concat only: scored on itself
    # what a layer reads in float: conv_b weight-only reads s, and through the Add a and x
    assert act_ranges.read_in_float(graph, [a, b], {"conv_a"}) == {"s", "a", "x"}
    assert act_ranges.read_in_float(graph, [a, b], {"conv_a", "conv_b"}) == set()
    # a layer whose input is not quantized (weight-only) scores nothing
    assert "s" not in act_ranges.scoring_layers(graph, [a, b], {"conv_a"})


def test_scoring_follows_silu_and_relu_exactly():
    """c = Conv(x); s = c * Sigmoid(c); r = Relu(c); both feed a MatMul-free Conv each."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), n) for n in ("w0", "w1", "w2")]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], name="c0"),
             helper.make_node("Sigmoid", ["c"], ["g"], name="sig"),
             helper.make_node("Mul", ["c", "g"], ["s"], name="mul"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Conv", ["s", "w1"], ["y1"], name="c1"),
             helper.make_node("Conv", ["r", "w2"], ["y2"], name="c2")]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 3, 3])  # noqa: E731
    graph = helper.make_graph(nodes, "g", [vi("x")], [vi("y1"), vi("y2")], inits)
    conv = lambda name, x, w: Conv(node=name, x=x, w=w, w_shape=(4, 4, 1, 1), kernel=(1, 1), strides=(1, 1),  # noqa: E731
                                   pads=(0, 0, 0, 0), dilations=(1, 1))
    layers = [conv("c0", "x", "w0"), conv("c1", "s", "w1"), conv("c2", "r", "w2")]
    found = act_ranges.scoring_layers(graph, layers, {"c0", "c1", "c2"})
    assert [(t.node, steps) for t, steps in found["c"]] == [("c1", (("SiLU",),)), ("c2", (("Relu",),))]
    v = np.linspace(-6, 6, 101)
    assert act_ranges.apply_steps((("SiLU",),), v) == pytest.approx(v / (1 + np.exp(-v)), rel=1e-12, abs=1e-15)
    # the score through SiLU, against the brute-force definition
    x = rng.standard_normal((2, 4, 3, 3)).astype(np.float32) * 3
    w = numpy_helper.to_array(inits[1]).astype(np.float64)
    scorer = act_ranges.Scorer.of(layers[1], w, np.random.default_rng(0), (("SiLU",),))
    quant, row = act_ranges.choose("c", [x], "minmax", 8, False, 99.99, [scorer], np.random.default_rng(0))
    q = act_quant_from_range(float(x.min()), float(x.max()), 8, False)
    codes = np.clip(np.round(x.astype(np.float64) / q.scale) + q.zero_point, 0, 255)
    xq = (codes - q.zero_point) * q.scale
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    rows = lambda a: a.transpose(0, 2, 3, 1).reshape(-1, 4)  # noqa: E731
    W = w.reshape(4, 4).T
    ref = np.sum((rows(silu(x.astype(np.float64))) @ W) ** 2) / np.sum(((rows(silu(xq)) - rows(silu(x.astype(np.float64)))) @ W) ** 2)
    assert row.layers_sqnr_db == pytest.approx(10 * np.log10(ref), abs=1e-6)


@pytest.fixture(scope="module")
def mlp_auto():
    return quantize(MLP, CALIB, quiet=True, weight_bits=8, act_calibration="auto")


def test_report_has_a_row_per_quantized_activation(mlp_auto):
    _, report = mlp_auto
    assert report.options["act_calibration"] == "auto"
    assert len(report.activation_rows) == report.activations > 0
    for row in report.activation_rows:
        assert row.rule == "minmax" or row.rule == "mse" or row.rule.startswith("percentile:")
        assert row.lo <= 0.0 <= row.hi or row.lo < row.hi
        assert row.bits == 8
    assert any(row.layers for row in report.activation_rows)
    table = report.table()
    assert "scored at" in table
    for row in report.activation_rows:
        assert row.tensor[-32:] in table
    rows = json.loads(json.dumps(report.to_dict()))["activations"]
    assert [r["tensor"] for r in rows] == [row.tensor for row in report.activation_rows]
    assert {"rule", "lo", "hi", "sqnr_db", "layers_sqnr_db", "layers", "bits"} <= set(rows[0])


def test_auto_is_deterministic(mlp_auto):
    model, report = mlp_auto
    again, report2 = quantize(MLP, CALIB, quiet=True, weight_bits=8, act_calibration="auto")
    assert serialize(again) == serialize(model)
    assert report2.activation_rows == report.activation_rows


def test_bad_act_calibration_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    code = main(["quantize", MLP, "-o", str(out), "--calib", CALIB, "--act-calibration", "best"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "act-calibration" in lines[0] and "auto" in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("n", [1, 3, 10, 1000, 12345, 1 << 20])
def test_percentiles_of_equals_numpy(n):
    from onnx_gpfq.activations import percentiles_of

    rng = np.random.default_rng(n)
    for x in (rng.standard_normal(n) * 3, np.round(rng.standard_normal(n), 1)):  # ties too
        levels = [0.1, 99.9, 0.01, 99.99, 0.001, 99.999, 0.0, 100.0, 49.0, 51.0]
        assert percentiles_of(x, levels) == [float(v) for v in np.percentile(x, levels)]


def test_a_clip_of_values_the_scored_sample_lacks_is_not_taken_for_free():
    """16-bit codes: rounding costs next to nothing, so a clip wins only if its cost looks nil,
    which it does when the few outliers it clips are not among the values scored."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(1 << 21)
    x[rng.choice(x.size, 5, replace=False)] = 50.0
    values = [x[: 1 << 20].astype(np.float32), x[1 << 20:].astype(np.float32)]
    _, row = act_ranges.choose("t", values, "auto", 16, False, 99.99, [], np.random.default_rng(0))
    assert row.rule == "minmax" and row.hi == 50.0


def _conv_into_lstm() -> onnx.ModelProto:
    """x (N, 8, 1, T) -> Conv 1x1 -> Add(., x) -> s -> Squeeze -> Transpose -> LSTM -> Y_h (the output).
    s is quantized (a residual join of two quantized tensors) and read by the LSTM in float only."""
    rng = np.random.default_rng(0)
    c, hidden = 8, 6
    inits = [numpy_helper.from_array((rng.standard_normal((c, c, 1, 1)) * 0.3).astype(np.float32), "cw"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, c)) * 0.3).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((1, 4 * hidden, hidden)) * 0.3).astype(np.float32), "R")]
    nodes = [helper.make_node("Conv", ["x", "cw"], ["a"], name="conv"),
             helper.make_node("Add", ["a", "x"], ["s"], name="add"),
             helper.make_node("Squeeze", ["s", "axis2"], ["sq"], name="squeeze"),
             helper.make_node("Transpose", ["sq"], ["seq"], name="tr", perm=[2, 0, 1]),
             helper.make_node("LSTM", ["seq", "W", "R"], ["", "Y_h"], name="lstm", hidden_size=hidden)]
    graph = helper.make_graph(nodes, "conv_lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 1, "T"])],
                              [helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_tensor_a_recurrent_layer_reads_in_float_keeps_its_full_range():
    """Nothing scores s (the LSTM reads it in float, through Squeeze and Transpose): auto keeps min-max
    there instead of the own-MSE clip it takes for an unscored tensor that only reaches an output."""
    rng = np.random.default_rng(1)
    x = rng.standard_t(2, (64, 8, 1, 64)).astype(np.float32)  # heavy tails: the MSE clip cuts them
    calib = [{"x": x}]
    _, report = quantize(_conv_into_lstm(), calib, quiet=True, weight_bits=8)
    rows = {r.tensor: r for r in report.activation_rows}
    assert rows["s"].rule == "minmax" and rows["s"].layers == ()
    _, mse = quantize(_conv_into_lstm(), calib, quiet=True, weight_bits=8, act_calibration="mse")
    assert {r.tensor: r for r in mse.activation_rows}["s"].hi < rows["s"].hi  # a clip was on offer


def test_flat_sides_of_a_tensor_only_flat_functions_read():
    """A SiLU's input (read by its Sigmoid and the Mul) is flat below only; Tanh and a two-sided Clip
    at both ends; a tensor some other op also reads (here a Conv) at neither."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w")
    lo, hi = (numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((0.0, "lo"), (6.0, "hi")))
    nodes = [helper.make_node("Sigmoid", ["a"], ["ga"]), helper.make_node("Mul", ["a", "ga"], ["sa"]),
             helper.make_node("Tanh", ["b"], ["tb"]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["cc"]), helper.make_node("Clip", ["d", "lo"], ["cd"]),
             helper.make_node("Sigmoid", ["e"], ["ge"]), helper.make_node("Mul", ["e", "ge"], ["se"]),
             helper.make_node("Conv", ["e", "w"], ["ce"]),
             helper.make_node("Mul", ["f", "b"], ["mf"])]  # a Mul by another tensor: no function of f alone
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 3, 3])  # noqa: E731
    outs = ["sa", "tb", "cc", "cd", "se", "ce", "mf"]
    graph = helper.make_graph(nodes, "g", [vi(n) for n in "abcdef"], [vi(n) for n in outs], [w, lo, hi])
    index = GraphIndex(graph)
    got = {n: act_ranges.flat_sides(index, n) for n in "abcdef"}
    assert got == {"a": (True, False), "b": (False, False), "c": (True, True), "d": (True, False),
                   "e": (False, False), "f": (False, False)}  # b: the Mul by b reads it too
    assert act_ranges.flat_sides(index, "sa") == (False, False)  # a model output


def test_auto_clips_the_low_end_that_only_a_silu_sees():
    """x spans [-20, 5] before a SiLU (SiLU(x) is about 0 under -6): with flat=(True, False) auto
    clips the low end further from its best range, and the error at the layer after the SiLU drops;
    the chosen range scores no worse than every candidate it tried, by brute force."""
    rng = np.random.default_rng(4)
    x = [np.concatenate([rng.uniform(-20, 0, (2, 8, 6, 6)), rng.uniform(0, 5, (2, 8, 6, 6))], axis=1)
         .astype(np.float32)[:, rng.permutation(16)] for _ in range(2)]
    w = (rng.standard_normal((6, 16, 1, 1)) * 0.3).astype(np.float32)
    layer = Conv(node="c1", x="x", w="w", w_shape=(6, 16, 1, 1), kernel=(1, 1), strides=(1, 1),
                 pads=(0, 0, 0, 0), dilations=(1, 1))
    fresh = lambda: np.random.default_rng(7)  # noqa: E731
    scorer = act_ranges.Scorer.of(layer, w, fresh(), (("SiLU",),))
    _, plain = act_ranges.choose("x", x, "auto", 8, False, 99.99, [scorer], fresh())
    _, clipped = act_ranges.choose("x", x, "auto", 8, False, 99.99, [scorer], fresh(), flat=(True, False))
    assert "+low:" not in plain.rule and clipped.rule.startswith(plain.rule + "+low:")
    f = float(clipped.rule.split("+low:")[1])
    assert f in act_ranges.ONE_SIDED and clipped.lo == pytest.approx(f * plain.lo) and clipped.hi == plain.hi
    assert clipped.layers_sqnr_db > plain.layers_sqnr_db + 1.0
    # by the definition, on every row: the error after the SiLU at the layer's output
    rows = np.concatenate([b.transpose(0, 2, 3, 1).reshape(-1, 16) for b in x]).astype(np.float64)
    W = w.reshape(6, 16).T.astype(np.float64)
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731

    def err(lo_, hi_):
        q = act_quant_from_range(lo_, hi_, 8, False)
        xq = (np.clip(np.round(rows / q.scale) + q.zero_point, 0, 255) - q.zero_point) * q.scale
        return float(np.sum(((silu(xq) - silu(rows)) @ W) ** 2))

    tried = [(g * plain.lo, plain.hi) for g in act_ranges.ONE_SIDED] + [(plain.lo, plain.hi)]
    assert err(clipped.lo, clipped.hi) <= min(err(*r) for r in tried) * 1.05  # 256-row sample vs all rows
    # not offered without flat, with symmetric activations, or for the high end here
    _, sym = act_ranges.choose("x", x, "auto", 8, True, 99.99, [scorer], fresh(), flat=(True, False))
    assert "+low:" not in sym.rule
