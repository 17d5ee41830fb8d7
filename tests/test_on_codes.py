"""Hard sigmoid on the integer codes (onnx_gpfq.on_codes): the grid it needs, its exactness, the
hard swish rewrite, and what onnxruntime makes of the result."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gpfq import quantize
from onnx_gpfq.graph import normalise
from onnx_gpfq.inspection import optimised_ops
from onnx_gpfq.on_codes import MAX_WIDEN, derived, exact, fold_hardswish, grid, grids
from onnx_gpfq.ops import find_targets
from onnx_gpfq.placement import place
from onnx_gpfq.rewrite import ActQuant, act_quant_from_range

RNG = np.random.default_rng(0)


def _dq(codes: np.ndarray, quant: ActQuant) -> np.ndarray:
    return (codes.astype(np.float64) - quant.zero_point) * np.float32(quant.scale)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("alpha,beta", [(1 / 6, 0.5), (0.2, 0.5), (1 / 3, 0.5), (0.25, 0.25)])
def test_clipped_codes_are_the_hard_sigmoid_of_the_dequantized_input(alpha, beta, symmetric):
    """For every code q of the moved grid: DQ(Clip(q, z_h, z_h + N), alpha s, z_h) = HardSigmoid(DQ(q)),
    the moved grid covers the calibrated range and its step grows by at most MAX_WIDEN."""
    moved_any = 0
    for _ in range(40):
        lo = -float(RNG.uniform(0.5, 40)) * (beta / alpha) / 3
        hi = float(RNG.uniform(0.5, 40))
        quant = act_quant_from_range(lo, hi, 8, symmetric)
        moved = grid(quant, alpha, beta)
        if moved is None:
            continue
        moved_any += 1
        assert exact(moved, alpha, beta) and moved.dtype == quant.dtype
        assert moved.scale <= MAX_WIDEN * quant.scale * (1 + 1e-6)
        info = np.iinfo(quant.dtype)
        codes = np.arange(info.min, info.max + 1)
        old, new = _dq(codes, quant), _dq(codes, moved)
        assert new.min() <= old.min() + 1e-9 and new.max() >= old.max() - 1e-9  # nothing newly clipped
        assert new.min() <= -beta / alpha + 1e-6  # reaches where the hard sigmoid is 0
        h = derived("x", moved, alpha, beta)
        assert h.codes_of == "x" and info.min <= h.clip[0] <= h.clip[1] <= info.max
        got = _dq(np.clip(codes, *h.clip), h)
        want = np.clip(alpha * new + beta, 0.0, 1.0)
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert moved_any >= 10


@pytest.mark.parametrize("symmetric", [False, True])
def test_the_range_choice_is_offered_the_admissible_grids_on_either_side(symmetric):
    """``grids``: every grid it offers is admissible (exact), one a step above the candidate's (covering
    its range), one a step below (finer, its top shrunk by at most MAX_WIDEN)."""
    offered = Counter()
    for _ in range(40):
        quant = act_quant_from_range(-float(RNG.uniform(3, 30)), float(RNG.uniform(0.5, 30)), 8, symmetric)
        info = np.iinfo(quant.dtype)
        top = (info.max - quant.zero_point) * quant.scale
        for g in grids(quant, 1 / 6, 0.5):
            assert exact(g, 1 / 6, 0.5)
            if g.scale >= quant.scale:
                offered["coarser"] += 1
                assert g == grid(quant, 1 / 6, 0.5)
            else:
                offered["finer"] += 1
                assert (info.max - g.zero_point) * g.scale >= top / MAX_WIDEN - 1e-9
                assert (info.min - g.zero_point) * g.scale <= -3 + 1e-6
    assert offered["coarser"] >= 20 and offered["finer"] >= 20


def test_no_grid_where_the_step_would_widen_too_much():
    """A range far above -beta / alpha (here [-0.5, 0.5] for a hard sigmoid that is 0 below -3) would
    need a step 6x coarser: the hard sigmoid keeps its own quantize/dequantize pair."""
    assert grid(act_quant_from_range(-0.5, 0.5), 1 / 6, 0.5) is None
    assert grid(act_quant_from_range(-4.0, 4.0), -1 / 6, 0.5) is None  # a falling hard sigmoid
    assert not exact(act_quant_from_range(-4.0, 4.0), 1 / 6, 0.5)


def _run(model: onnx.ModelProto, feeds: dict, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _conv(name: str, x: str, c_in: int, c_out: int, k: int, gain: float, rng) -> tuple[onnx.NodeProto, list]:
    w = numpy_helper.from_array((rng.standard_normal((c_out, c_in, k, k)) * gain).astype(np.float32), f"{name}_w")
    b = numpy_helper.from_array((rng.standard_normal(c_out) * 0.1).astype(np.float32), f"{name}_b")
    return helper.make_node("Conv", [x, w.name, b.name], [f"{name}_out"], name=name, pads=[k // 2] * 4), [w, b]


def _swish_model(form: str, gain: float = 0.4, divisor: float = 6.0) -> onnx.ModelProto:
    """conv1 -> hard swish of conv1_out in one of three forms -> conv2 (1x1) -> output.

    form: "op" (HardSwish, opset 14), "hardsigmoid" (x * HardSigmoid(x)), "decomposed"
    (x * Clip(x + 3, 0, 6) / divisor: a hard swish when divisor is 6)."""
    rng = np.random.default_rng(2)
    node1, w1 = _conv("conv1", "x", 3, 8, 3, gain, rng)
    consts = []
    if form == "op":
        middle = [helper.make_node("HardSwish", ["conv1_out"], ["hswish"], name="hswish")]
    elif form == "hardsigmoid":
        middle = [helper.make_node("HardSigmoid", ["conv1_out"], ["hs"], name="hs", alpha=1 / 6, beta=0.5),
                  helper.make_node("Mul", ["conv1_out", "hs"], ["hswish"], name="mul")]
    else:
        consts = [numpy_helper.from_array(np.array([3.0], np.float32), "three"),
                  numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                  numpy_helper.from_array(np.array(6.0, np.float32), "six"),
                  numpy_helper.from_array(np.array([divisor], np.float32), "divisor")]
        middle = [helper.make_node("Add", ["conv1_out", "three"], ["a"], name="add"),
                  helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip"),
                  helper.make_node("Mul", ["conv1_out", "c"], ["m"], name="mul"),
                  helper.make_node("Div", ["m", "divisor"], ["hswish"], name="div")]
    node2, w2 = _conv("conv2", "hswish", 8, 4, 1, 0.4, rng)
    graph = helper.make_graph([node1, *middle, node2], "swish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("conv2_out", TensorProto.FLOAT, [None, 4, 8, 8])],
                              initializer=w1 + consts + w2)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def _calib(n: int = 16) -> dict[str, np.ndarray]:
    return {"x": (np.random.default_rng(1).standard_normal((n, 3, 8, 8)) * 2).astype(np.float32)}


@pytest.mark.parametrize("form", ["op", "decomposed"])
def test_fold_hardswish_keeps_the_function(form):
    model = _swish_model(form)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_hardswish(folded.graph) == 1
    ops = Counter(n.op_type for n in folded.graph.node)
    assert ops["HardSigmoid"] == 1 and ops["Mul"] == 1 and not any(ops[k] for k in ("HardSwish", "Add", "Clip", "Div"))
    onnx.checker.check_model(folded, full_check=True)
    x = _calib(4)
    np.testing.assert_allclose(_run(folded, x)[0], _run(model, x)[0], rtol=1e-5, atol=1e-5)


def test_fold_hardswish_leaves_other_patterns_alone():
    """x * Clip(x + 3, 0, 6) / 5 is not a hard swish."""
    model = _swish_model("decomposed", divisor=5.0)
    before = [n.op_type for n in model.graph.node]
    assert fold_hardswish(model.graph) == 0
    assert [n.op_type for n in model.graph.node] == before


@pytest.mark.parametrize("form", ["op", "hardsigmoid", "decomposed"])
def test_hard_swish_runs_on_codes_in_integer_kernels(form):
    """Every form of hard swish becomes QLinearConv -> Clip on uint8 -> QLinearMul -> QLinearConv in what
    onnxruntime's optimiser produced: no HardSigmoid, no float Mul, Add or Div, and no
    QuantizeLinear / DequantizeLinear between the layers; the hard sigmoid read back from the model's
    codes equals HardSigmoid of the dequantized input; deployed = QDQ reference up to rounding."""
    model, report = quantize(_swish_model(form), _calib(), weight_bits=8, quiet=True)
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in optimised_ops(model))
    assert ops["QLinearConv"] == 2 and ops["QLinearMul"] == 1 and ops["Clip"] == 1
    assert not any(ops[k] for k in ("HardSigmoid", "HardSwish", "Mul", "Add", "Div"))
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1  # the model's input and output only
    rows = [r for r in report.activation_rows if r.rule.startswith("codes of")]
    assert len(rows) == 1 and rows[0].lo == 0.0 and abs(rows[0].hi - 1.0) < 1e-6 and rows[0].sqnr_db > 30
    clip = next(n for n in model.graph.node if n.op_type == "Clip")
    source = clip.input[0].replace("_QuantizeLinear_Output", "_DequantizeLinear_Output")
    h = clip.output[0].replace("_QuantizeLinear_Output", "_DequantizeLinear_Output")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in (source, h)])
    x = _calib(8)
    _, xv, hv = _run(probe, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_allclose(hv, np.clip(xv / 6 + 0.5, 0, 1), atol=1e-6)
    assert (hv == 0).any() and hv.max() > 0.9  # the low clip is exercised, and most of the slope
    deployed = _run(model, x)[0]
    reference = _run(model, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)[0]
    float_out = _run(_swish_model(form), x)[0]
    assert np.sqrt(np.mean((deployed - reference) ** 2)) < 0.5 * np.sqrt(np.mean((reference - float_out) ** 2))


def test_symmetric_int8_activations_run_on_codes_too():
    """--act-symmetric: int8 codes with zero point 0; the hard sigmoid's zero point is -beta N. (onnxruntime's
    CPU optimiser fuses less around int8 activations, Mul included: only the Clip and its exactness are
    asserted here.)"""
    model, report = quantize(_swish_model("hardsigmoid"), _calib(), weight_bits=8, act_symmetric=True, quiet=True)
    onnx.checker.check_model(model, full_check=True)
    assert sum(r.rule.startswith("codes of") for r in report.activation_rows) == 1
    ops = Counter(n.op_type for n in optimised_ops(model))
    assert ops["Clip"] == 1 and not ops["HardSigmoid"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits["hs_zero_point"].dtype == np.int8 and int(inits["hs_zero_point"]) < 0
    x = _calib(8)
    deployed = _run(model, x)[0]
    reference = _run(model, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)[0]
    float_out = _run(_swish_model("hardsigmoid"), x)[0]
    assert np.sqrt(np.mean((deployed - reference) ** 2)) < 0.5 * np.sqrt(np.mean((reference - float_out) ** 2))


def test_a_narrow_input_keeps_the_hard_sigmoids_own_qdq():
    """conv1_out within about [-0.5, 0.5]: moving its grid down to -3 would cost it 6x its step, so the
    hard sigmoid is calibrated and runs dequantize-HardSigmoid-quantize, as before."""
    model, report = quantize(_swish_model("hardsigmoid", gain=0.02), _calib(), weight_bits=8, quiet=True)
    assert not any(r.rule.startswith("codes of") for r in report.activation_rows)
    ops = Counter(n.op_type for n in optimised_ops(model))
    assert ops["HardSigmoid"] == 1 and ops["QLinearMul"] == 1 and ops["Clip"] == 0


def test_placement_offers_the_hard_sigmoid_on_codes():
    base = normalise(_swish_model("hardsigmoid"))
    targets, _ = find_targets(base.graph)
    p = place(base.graph, targets, set(), "integer")
    assert set(p.on_codes) == {"hs"} and p.on_codes["hs"].source == "conv1_out" and "hs" in p.calibrated
    assert not place(base.graph, targets, set(), "minimal").on_codes
