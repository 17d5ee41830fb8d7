"""Activation QDQ placement (onnx_gpfq.placement): which tensors get QDQ, what onnxruntime's CPU
optimiser makes of them, and that the quantized stream X~ carries the same QDQ as the output graph."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gpfq import quantize
from onnx_gpfq import rewrite
from onnx_gpfq.errors import UserError
from onnx_gpfq.graph import normalise
from onnx_gpfq.inspection import optimised_ops
from onnx_gpfq.ops import find_targets
from onnx_gpfq.options import Options
from onnx_gpfq.placement import place

RNG = np.random.default_rng(0)


def _conv(name: str, x: str, c_in: int, c_out: int, k: int = 3) -> tuple[onnx.NodeProto, list]:
    w = numpy_helper.from_array((RNG.standard_normal((c_out, c_in, k, k)) * 0.3).astype(np.float32), f"{name}_w")
    b = numpy_helper.from_array((RNG.standard_normal(c_out) * 0.1).astype(np.float32), f"{name}_b")
    node = helper.make_node("Conv", [x, w.name, b.name], [f"{name}_out"], name=name, pads=[k // 2] * 4)
    return node, [w, b]


def _model() -> onnx.ModelProto:
    """conv1 -> SiLU (Sigmoid, Mul) -> MaxPool -> Concat with conv2(SiLU out) -> conv3 -> Sigmoid -> output.

    The region from conv1's output to conv3's input can run in integer kernels; the Sigmoid after
    conv3 only reaches the model output and stays float."""
    nodes, inits = [], []
    for node, ws in (_conv("conv1", "x", 3, 8),):
        nodes.append(node)
        inits += ws
    nodes += [helper.make_node("Sigmoid", ["conv1_out"], ["sig1"], name="sig1"),
              helper.make_node("Mul", ["conv1_out", "sig1"], ["silu1"], name="mul1"),
              helper.make_node("MaxPool", ["silu1"], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2])]
    node, ws = _conv("conv2", "pool1", 8, 8)
    nodes.append(node)
    inits += ws
    nodes += [helper.make_node("Concat", ["pool1", "conv2_out"], ["cat"], name="cat", axis=1)]
    node, ws = _conv("conv3", "cat", 16, 4, k=1)
    nodes.append(node)
    inits += ws
    nodes.append(helper.make_node("Sigmoid", ["conv3_out"], ["y"], name="head"))
    graph = helper.make_graph(nodes, "placement", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 4, 4])], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _calib(n: int = 16) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def _placement(kind: str):
    base = normalise(_model())
    targets, _ = find_targets(base.graph)
    return place(base.graph, targets, set(), kind)


def test_minimal_placement_is_the_layers_inputs_and_conv_outputs():
    p = _placement("minimal")
    assert p.calibrated == {"x", "conv1_out", "pool1", "conv2_out", "cat", "conv3_out"} and not p.shared


def test_integer_placement_covers_the_ops_between_layers_and_stops_at_the_float_head():
    p = _placement("integer")
    assert p.calibrated == {"x", "conv1_out", "sig1", "silu1", "cat", "conv3_out"}
    # MaxPool's output on its input's grid; conv2's output, read by the Concat only, on the Concat's
    assert p.shared == {"pool1": "silu1", "conv2_out": "cat"}
    assert "y" not in p.tensors  # the head's Sigmoid feeds the model output only


def test_placement_option_is_validated():
    assert Options().act_placement == "integer"
    with pytest.raises(UserError, match="--act-placement must be one of integer, minimal"):
        Options(act_placement="everything")


def _scale_zp(model: onnx.ModelProto, tensor: str) -> tuple[float, int]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.output[0] == f"{tensor}_QuantizeLinear_Output")
    return float(inits[q.input[1]]), int(inits[q.input[2]])


@pytest.fixture(scope="module")
def quantized():
    return {kind: quantize(_model(), _calib(), weight_bits=8, act_placement=kind, quiet=True)[0]
            for kind in ("integer", "minimal")}


def test_onnxruntime_runs_the_integer_placement_in_integer_kernels(quantized):
    integer = Counter(n.op_type for n in optimised_ops(quantized["integer"]))
    minimal = Counter(n.op_type for n in optimised_ops(quantized["minimal"]))
    # what onnxruntime's optimiser actually produced, not what the QDQ graph suggests
    assert integer["QLinearSigmoid"] == 1 and integer["QLinearMul"] == 1 and integer["QLinearConcat"] == 1
    assert integer["QLinearConv"] == 3 and integer["Mul"] == 0
    assert integer["Sigmoid"] == 1  # the head, float by design
    ops = optimised_ops(quantized["integer"])
    made_by = {o: n.op_type for n in ops for o in n.output}
    pool = next(n for n in ops if n.op_type.endswith("MaxPool"))
    assert made_by.get(pool.input[0]) != "DequantizeLinear"  # MaxPool runs on the uint8 codes
    assert minimal["QLinearMul"] == 0 and minimal["Mul"] == 1 and minimal["Sigmoid"] == 2
    # in the integer model no DequantizeLinear -> float op -> QuantizeLinear is left between the layers
    assert integer["DequantizeLinear"] + integer["QuantizeLinear"] < minimal["DequantizeLinear"] + minimal["QuantizeLinear"]


def test_maxpool_output_shares_its_inputs_grid(quantized):
    m = quantized["integer"]
    assert _scale_zp(m, "pool1") == _scale_zp(m, "silu1")


def test_a_concat_input_only_the_concat_reads_is_written_on_the_concats_grid(quantized):
    m = quantized["integer"]
    assert _scale_zp(m, "conv2_out") == _scale_zp(m, "cat")  # QLinearConcat copies it, no second rounding
    assert _scale_zp(quantized["minimal"], "conv2_out") != _scale_zp(quantized["minimal"], "cat")


def test_concat_grids_resolve_through_nested_concats_and_spare_inputs_read_elsewhere():
    """a -> Concat(a, b) -> c1 -> Concat(c1, b2) -> c2 -> conv; b also feeds another Conv: b keeps its grid,
    a and c1 (read by one Concat each) take the outermost Concat's."""
    nodes, inits = [], []
    for name, x in (("ca", "x"), ("cb", "x"), ("cb2", "x")):
        node, ws = _conv(name, x, 3, 4)
        nodes.append(node)
        inits += ws
    node, ws = _conv("cside", "cb_out", 4, 4)
    nodes.append(node)
    inits += ws
    nodes += [helper.make_node("Concat", ["ca_out", "cb_out"], ["c1"], name="cat1", axis=1),
              helper.make_node("Concat", ["c1", "cb2_out"], ["c2"], name="cat2", axis=1)]
    node, ws = _conv("head", "c2", 12, 4, k=1)
    nodes.append(node)
    inits += ws
    nodes.append(helper.make_node("Add", ["head_out", "cside_out"], ["y"], name="join"))
    graph = helper.make_graph(nodes, "nested", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    base = normalise(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    targets, _ = find_targets(base.graph)
    p = place(base.graph, targets, set(), "integer")
    assert p.shared == {"ca_out": "c2", "c1": "c2", "cb2_out": "c2"}
    assert {"cb_out", "c2"} <= p.calibrated and not {"ca_out", "c1", "cb2_out"} & p.calibrated


def test_integer_kernels_compute_the_qdq_reference(quantized):
    """QLinearSigmoid / QLinearMul / QLinearConcat and the int8 MaxPool as deployed (all
    optimisations) against the QDQ math as written (ORT_DISABLE_ALL): the same up to a rounding
    step of the last quantized tensor (their requantization may round the other way at a tie),
    so no saturation in the integer path."""
    x = _calib(32)["x"]
    data = quantized["integer"].SerializeToString()

    def run(level):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    deployed = run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    reference = run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    step, _ = _scale_zp(quantized["integer"], "conv3_out")
    # y = sigmoid(conv3_out): slope at most 1/4, so a few codes of conv3_out move y by at most that
    assert np.max(np.abs(deployed - reference)) <= 2 * step / 4 + 1e-6
    assert np.mean(deployed == reference) > 0.9


def test_quantized_stream_carries_the_new_qdq(monkeypatch):
    """The X~ of each layer comes from rewrite.apply with every activation calibrated so far: the
    new tensors (Sigmoid, Mul, MaxPool outputs) are in it before conv2 and conv3 read them."""
    seen = []
    real_apply = rewrite.apply

    def spy(graph, layers, acts):
        seen.append((set(layers), set(acts)))
        return real_apply(graph, layers, acts)

    monkeypatch.setattr(rewrite, "apply", spy)  # quantize.py calls rewrite.apply
    quantize(_model(), _calib(), weight_bits=8, act_placement="integer", quiet=True)
    before_conv2 = next(acts for layers, acts in seen if layers == {"conv1"})
    assert {"x", "conv1_out", "sig1", "silu1", "pool1"} <= before_conv2
    before_conv3 = next(acts for layers, acts in seen if layers == {"conv1", "conv2"})
    assert {"conv2_out", "cat"} <= before_conv3


def _tanh_gate_model() -> onnx.ModelProto:
    """conv1 -> x * Tanh(x) -> GlobalAveragePool -> conv2 (1x1) -> output (a gate with no integer kernel)."""
    return _between_convs([helper.make_node("Tanh", ["conv1_out"], ["gate"], name="gate"),
                           helper.make_node("Mul", ["conv1_out", "gate"], ["gated"], name="mul"),
                           helper.make_node("GlobalAveragePool", ["gated"], ["gap"], name="gap")], [], "gap", 1)


def _between_convs(middle: list, consts: list, last: str, hw: int) -> onnx.ModelProto:
    """conv1 (3 -> 8, 3x3) -> the middle nodes (reading conv1_out, ending in ``last``) -> conv2 (1x1, 8 -> 4)
    -> output (N, 4, hw, hw); consts: the middle nodes' initializers."""
    node1, w1 = _conv("conv1", "x", 3, 8)
    node2, w2 = _conv("conv2", last, 8, 4, k=1)
    graph = helper.make_graph([node1, *middle, node2], "between", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("conv2_out", TensorProto.FLOAT, [None, 4, hw, hw])],
                              initializer=w1 + consts + w2)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_float_operand_of_an_integer_op_gets_its_own_qdq():
    """x * Tanh(x): Tanh has no integer kernel, so its output is quantized (it runs dequantize-Tanh-quantize)
    and the Mul and the pooling after it run as QLinear kernels. (A HardSigmoid there runs on codes
    instead: tests/test_on_codes.py.)"""
    base = normalise(_tanh_gate_model())
    targets, _ = find_targets(base.graph)
    p = place(base.graph, targets, set(), "integer")
    assert p.calibrated == {"x", "conv1_out", "gate", "gated", "gap", "conv2_out"} and not p.on_codes
    assert place(base.graph, targets, set(), "minimal").calibrated == {"x", "conv1_out", "gap", "conv2_out"}
    model, _ = quantize(_tanh_gate_model(), _calib(), weight_bits=8, quiet=True)
    ops = Counter(n.op_type for n in optimised_ops(model))
    assert ops["QLinearMul"] == 1 and ops["QLinearGlobalAveragePool"] == 1 and ops["Mul"] == 0
    assert ops["Tanh"] == 1 and ops["QLinearConv"] == 2


def test_16_bit_activations_keep_the_minimal_placement():
    """onnxruntime has no 16-bit QLinearSigmoid/Mul/Concat: QDQ there would only cost time."""
    model, _ = quantize(_model(), _calib(), weight_bits=8, act_bits=16, quiet=True)
    quantized = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized == {"x", "conv1_out", "pool1", "conv2_out", "cat", "conv3_out"}


def _decomposed_hardswish_model() -> onnx.ModelProto:
    """conv1 -> x * Clip(x + 3, 0, 6) / 5 (PicoDet's decomposed HardSwish but for the divisor, so that it
    is not rewritten into x * HardSigmoid(x): Add, Clip, Mul, Div with scalar constants) -> conv2 -> output."""
    consts = [numpy_helper.from_array(np.array([3.0], np.float32), "three"),
              numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(6.0, np.float32), "six"),
              numpy_helper.from_array(np.array([5.0], np.float32), "divisor")]
    return _between_convs([helper.make_node("Add", ["conv1_out", "three"], ["a"], name="add"),
                           helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip"),
                           helper.make_node("Mul", ["conv1_out", "c"], ["m"], name="mul"),
                           helper.make_node("Div", ["m", "divisor"], ["hswish"], name="div")], consts, "hswish", 8)


def test_constant_operands_become_integer_kernels():
    """The scalar + 3 and / 5 of x * Clip(x + 3, 0, 6) / 5: the Add's output is quantized after its Clip,
    the constants are stored as 8-bit codes (copies: the Clip keeps its float bounds), the Div becomes a
    Mul by 1/5, and onnxruntime's optimiser makes QLinearAdd and two QLinearMul of them: nothing is left in
    float between the two QLinearConv (what it produced, not what the QDQ graph suggests)."""
    base = normalise(_decomposed_hardswish_model())
    targets, _ = find_targets(base.graph)
    p = place(base.graph, targets, set(), "integer")
    assert p.calibrated == {"x", "conv1_out", "c", "m", "hswish", "conv2_out"}
    assert p.constants == {"three_operand", "divisor_reciprocal"} and p.products == {"div"}
    assert p.operand_nodes == {"add", "div"}
    assert place(base.graph, targets, set(), "minimal").calibrated == {"x", "conv1_out", "hswish", "conv2_out"}
    model, _ = quantize(_decomposed_hardswish_model(), _calib(), weight_bits=8, quiet=True)
    ops = Counter(n.op_type for n in optimised_ops(model))
    assert ops["QLinearAdd"] == 1 and ops["QLinearMul"] == 2 and ops["QLinearConv"] == 2
    assert not any(ops[k] for k in ("Add", "Mul", "Div", "Clip"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert inits["divisor_reciprocal_codes"].dtype == np.uint8 and inits["three_operand_codes"].dtype == np.uint8
    for name, value in (("three_operand", 3.0), ("divisor_reciprocal", np.float32(1) / np.float32(5))):
        dq = (inits[f"{name}_codes"].astype(np.float64) - int(inits[f"{name}_zero_point"])) * float(inits[f"{name}_scale"])
        assert abs(dq.item() - value) <= 1e-6 * abs(value)  # a scalar is held to float32 precision
    minimal, _ = quantize(_decomposed_hardswish_model(), _calib(), weight_bits=8, act_placement="minimal", quiet=True)
    assert Counter(n.op_type for n in optimised_ops(minimal))["Div"] == 1  # the minimal placement is today's


def test_constant_operand_kernels_compute_the_qdq_reference():
    """QLinearAdd / QLinearMul with the quantized constants as deployed (all optimisations) against the
    QDQ math (ORT_DISABLE_ALL): within one output step of conv2 per input code moved."""
    model, _ = quantize(_decomposed_hardswish_model(), _calib(), weight_bits=8, quiet=True)
    x = _calib(32)["x"]
    data = model.SerializeToString()

    def run(level):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    deployed = run(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    reference = run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    float_out = ort.InferenceSession(_decomposed_hardswish_model().SerializeToString(),
                                     providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    err_deployed = np.sqrt(np.mean((deployed - reference) ** 2))
    err_quant = np.sqrt(np.mean((reference - float_out) ** 2))
    assert err_deployed < 0.5 * err_quant  # the integer kernels' rounding is well below the quantization error
    assert np.mean(np.isclose(deployed, reference, atol=1e-5)) > 0.5
