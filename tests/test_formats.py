"""Deployment formats: integer-kernel fusion, INT4 / MatMulNBits / block-wise weights, per-layer
control (config, exclude), activation options, and tensors that must never be quantized."""

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_gpfq import quantize
from onnx_gpfq.cli import main
from onnx_gpfq.inspection import inspect

MODELS = Path(__file__).resolve().parent.parent / "models"
CALIB = str(MODELS / "digits_calib.npz")
TEST = np.load(MODELS / "digits_test.npz")["input"][:128]


def run(model, x=TEST, optimise=True):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimise:  # the ops' own semantics, before onnxruntime picks kernels
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def weight_bytes(model, suffixes):
    return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer if t.name.endswith(suffixes))


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_vit"])
@pytest.mark.parametrize("bits", [8, 4])
def test_every_quantized_layer_runs_as_an_integer_kernel(name, bits):
    model, report = quantize(MODELS / f"{name}.onnx", CALIB, weight_bits=bits, quiet=True)
    info = inspect(model)
    assert info["quantized_layers"] == len(report.layers) > 0
    assert info["integer_kernel_fraction"] == 1.0, info["float_layers"]
    assert {layer["bits"] for layer in info["layers"]} == {bits}


def test_int4_and_matmulnbits_hold_the_same_codes_as_int8_blocks():
    common = dict(weight_bits=4, granularity="block", block_size=16, quiet=True)
    int8, r8 = quantize(MODELS / "digits_vit.onnx", CALIB, weight_format="int8", **common)
    int4, r4 = quantize(MODELS / "digits_vit.onnx", CALIB, weight_format="int4", **common)
    nbits, rn = quantize(MODELS / "digits_vit.onnx", CALIB, weight_format="matmulnbits", **common)
    for model in (int8, int4, nbits):
        onnx.checker.check_model(model, full_check=True)
    # Op semantics: the same dequantized weights, so the same outputs to float tolerance.
    y8, y4, yn = (run(m, optimise=False) for m in (int8, int4, nbits))
    np.testing.assert_allclose(y4, y8, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(yn, y8, rtol=1e-4, atol=1e-4)
    # As deployed, onnxruntime turns INT4 DequantizeLinear -> MatMul into MatMulNBits with int8
    # activations internally: close, not identical.
    for y in (run(int8), run(int4), run(nbits)):
        assert np.sum((y - y8) ** 2) < 1e-3 * np.sum(y8 ** 2)  # SQNR > 30 dB
    # Same codes: the packed INT4 initializers unpack to the int8 ones.
    codes8 = {t.name: numpy_helper.to_array(t) for t in int8.graph.initializer if t.name.endswith("_quantized")}
    codes4 = {t.name: numpy_helper.to_array(t) for t in int4.graph.initializer if t.name.endswith("_quantized")}
    assert codes8.keys() == codes4.keys() and codes8
    for name in codes8:
        np.testing.assert_array_equal(codes4[name].astype(np.int8), codes8[name])
    assert int4.opset_import[0].version >= 21
    assert int4.ir_version >= onnx.helper.find_min_ir_version_for(list(int4.opset_import), ignore_unknown=True) == 10
    assert sum(1 for n in nbits.graph.node if n.op_type == "MatMulNBits") == 9  # every MatMul weight
    # About 1/8 of the float weight bytes (4 bits of 32), plus the block scales.
    float_bytes = r4.float_weight_bytes
    assert r4.quant_weight_bytes == pytest.approx(float_bytes / 8, rel=0.01)
    packed = weight_bytes(int4, ("_quantized",))
    assert packed <= float_bytes / 8 * 1.01
    nbits_packed = weight_bytes(nbits, ("_nbits",))
    assert 0 < nbits_packed <= float_bytes / 8 * 1.05
    assert {layer["format"] for layer in inspect(int4)["layers"]} == {"int4"}
    assert "MatMulNBits" in {layer["format"] for layer in inspect(nbits)["layers"]}


def test_per_channel_int4_conv():
    model, _ = quantize(MODELS / "digits_cnn.onnx", CALIB, weight_bits=4, weight_format="int4", quiet=True)
    onnx.checker.check_model(model, full_check=True)
    ref, _ = quantize(MODELS / "digits_cnn.onnx", CALIB, weight_bits=4, quiet=True)
    np.testing.assert_allclose(run(model, optimise=False), run(ref, optimise=False), rtol=1e-5, atol=1e-5)


def test_int4_refuses_more_than_4_bits():
    with pytest.raises(Exception, match="at most 4-bit"):
        quantize(MODELS / "digits_mlp.onnx", CALIB, weight_bits=8, weight_format="int4", quiet=True)


def test_weight_only_mode_has_no_activation_qdq():
    model, report = quantize(MODELS / "digits_cnn.onnx", CALIB, act_bits=None, quiet=True)
    assert not [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert report.activations == 0 and len(report.layers) == 6


@pytest.mark.parametrize("kwargs, dtype", [
    (dict(act_bits=16), TensorProto.UINT16),
    (dict(act_symmetric=True), TensorProto.INT8),
    (dict(act_calibration="percentile", percentile=99.9), TensorProto.UINT8),
    (dict(act_calibration="mse"), TensorProto.UINT8),
])
def test_activation_options(kwargs, dtype):
    model, _ = quantize(MODELS / "digits_cnn.onnx", CALIB, weight_bits=8, quiet=True, **kwargs)
    zps = [t for t in model.graph.initializer if t.name.endswith("_zero_point") and not t.name.startswith("onnx::")
           and t.data_type != TensorProto.INT8 or (t.name.endswith("_zero_point") and kwargs.get("act_symmetric"))]
    assert zps and any(t.data_type == dtype for t in zps)
    float_model = onnx.load(MODELS / "digits_cnn.onnx")
    y, y_q = run(float_model), run(model)
    sqnr = 10 * np.log10(np.sum(y ** 2) / np.sum((y - y_q) ** 2))
    assert sqnr > (45 if kwargs.get("act_bits") == 16 else 20)


def test_config_overrides_and_exclusion(tmp_path):
    config = tmp_path / "layers.toml"
    config.write_text('exclude = ["/fc/Gemm"]\n\n[[layers]]\nmatch = "/conv0/*"\nweight_bits = 8\n\n'
                      '[[layers]]\nmatch = "Conv"\nmethod = "rtn"\n')
    out = tmp_path / "cnn.onnx"
    assert main(["quantize", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "--calib", CALIB, "--weight-bits", "3",
                 "--config", str(config), "--quiet", "--report", str(tmp_path / "r.json")]) == 0
    layers = {layer["node"]: layer for layer in inspect(onnx.load(out))["layers"]}
    assert "/fc/Gemm" not in layers  # excluded: left in float
    assert layers["/conv0/Conv"]["bits"] == 8 and layers["/conv3/Conv"]["bits"] == 3
    report = json.loads((tmp_path / "r.json").read_text())
    assert any(s["node"] == "/fc/Gemm" and "excluded" in s["reason"] for s in report["left_in_float"])
    # Conv layers used RTN: their GPFQ and RTN errors are the same figure.
    assert all(abs(r["rel_error"] - r["rel_error_rtn"]) < 1e-12 for r in report["layers"] if r["op_type"] == "Conv")


def test_exclude_by_op_type(tmp_path, capsys):
    out = tmp_path / "vit.onnx"
    assert main(["quantize", str(MODELS / "digits_vit.onnx"), "-o", str(out), "--calib", CALIB, "--exclude", "Gemm",
                 "--quiet"]) == 0
    assert {layer["op_type"] for layer in inspect(onnx.load(out))["layers"]} == {"MatMul"}


@pytest.mark.parametrize("text, suffix, fragment", [
    ('{"layers": [{"match": "/nope/*", "weight_bits": 8}]}', ".json", "matches no quantizable layer"),
    ('{"layers": [{"match": "Conv", "bits": 8}]}', ".json", "unknown key(s) bits"),
    ('{"layers": [{"match": "Conv", "weight_bits": 11}]}', ".json", "--weight-bits must be one of"),
    ('{"layers": [{"match": "Conv", "method": "magic"}]}', ".json", "method must be one of"),
    ('{"layers": [', ".json", "not valid JSON"),
    ('[[layers]\nmatch = 1', ".toml", "not valid TOML"),
    ('{"exclude": ["/typo*"]}', ".json", "matches no quantizable layer"),
    ('{"colour": "blue"}', ".json", "unknown key(s) colour"),
])
def test_config_errors(tmp_path, capsys, text, suffix, fragment):
    config = tmp_path / f"c{suffix}"
    config.write_text(text)
    out = tmp_path / "o.onnx"
    code = main(["quantize", str(MODELS / "digits_cnn.onnx"), "-o", str(out), "--calib", CALIB, "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_exclude_typo_is_an_error(tmp_path, capsys):
    code = main(["quantize", str(MODELS / "digits_cnn.onnx"), "-o", str(tmp_path / "o.onnx"), "--calib", CALIB,
                 "--exclude", "/conv9/*"])
    assert code == 2 and "matches no quantizable layer" in capsys.readouterr().err


def test_additive_attention_mask_is_never_quantized():
    """Scores + mask (-1e4 on masked keys) -> Softmax -> @ V: quantizing the mask or the scores after
    it would wipe out the unmasked logits. Only the weight layers' inputs get QDQ."""
    rng = np.random.default_rng(0)
    d = 8
    wq, wv = (rng.standard_normal((d, d)) * 0.4).astype(np.float32), (rng.standard_normal((d, d)) * 0.4).astype(np.float32)
    mask = np.zeros((1, 4, 4), np.float32)
    mask[:, :, 2:] = -1e4
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"], name="q_proj"),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "xt"], ["scores"], name="scores"),
        helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
        helper.make_node("Softmax", ["masked"], ["attn"], axis=-1),
        helper.make_node("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        helper.make_node("MatMul", ["attn", "v"], ["y"], name="mix"),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in (("wq", wq), ("wv", wv), ("mask", mask))]
    graph = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, d])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((64, 4, d)).astype(np.float32)
    q, report = quantize(model, {"x": x}, weight_bits=8, quiet=True)
    quantized_tensors = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert quantized_tensors == {"x"}
    assert {r.node for r in report.layers} == {"q_proj", "v_proj"}
    y, y_q = run(model, x), run(q, x)
    assert 10 * np.log10(np.sum(y ** 2) / np.sum((y - y_q) ** 2)) > 30


def _one_layer_targets():
    """A MatMul and a Gemm target (find_targets on a two-layer graph)."""
    from onnx_gpfq.ops import find_targets

    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm"),
             helper.make_node("Gemm", ["h", "w2"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              initializer=[numpy_helper.from_array(np.ones((64, 32), np.float32), "w1"),
                                           numpy_helper.from_array(np.ones((32, 8), np.float32), "w2")])
    (mm, fc), _ = find_targets(graph)
    return mm, fc


def test_each_format_plans_its_layers():
    from onnx_gpfq.formats import FORMATS
    from onnx_gpfq.options import Options
    from onnx_gpfq.plan import add_domains, plan_layer, required_opset

    mm, fc = _one_layer_targets()
    nbits = Options(weight_bits=4, weight_format="matmulnbits", block_size=16)
    plans = {t.node: plan_layer(t, nbits) for t in (mm, fc)}
    assert plans["mm"].fmt.name == "matmulnbits" and plans["mm"].weight_only and plans["mm"].block_size == 16
    assert plans["fc"].fmt.name == "int8" and not plans["fc"].weight_only and plans["fc"].block_size == 0
    model = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", 13)])
    add_domains(model, plans)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 13), ("com.microsoft", 1)]
    int8 = {t.node: plan_layer(t, Options(weight_bits=4)) for t in (mm, fc)}
    add_domains(model, int8)
    assert len(model.opset_import) == 2  # int8 adds no domain
    assert [required_opset(Options(weight_bits=4, weight_format=f)) for f in FORMATS] == [13, 21, 13]
    assert required_opset(Options(granularity="block")) == 21
    codes = np.zeros((5, 3), np.int8)
    assert [FORMATS[f].stored_bytes(codes) for f in FORMATS] == [15, 8, 8]


@pytest.mark.parametrize("options, fragment", [
    (dict(weight_bits=8, weight_format="int4"), "int4 holds at most 4-bit codes: layer mm has 8 bits"),
    (dict(weight_bits=5, weight_format="matmulnbits"), "matmulnbits stores 4-bit codes: layer mm has 5 bits"),
    (dict(weight_bits=4, weight_format="matmulnbits", block_size=24), "power of two >= 16 (got 24)"),
])
def test_formats_refuse_what_they_cannot_store(options, fragment):
    from onnx_gpfq.errors import UserError
    from onnx_gpfq.options import Options
    from onnx_gpfq.plan import plan_layer

    mm, _ = _one_layer_targets()
    with pytest.raises(UserError, match=re.escape(fragment)):
        plan_layer(mm, Options(**options))


def test_a_new_format_is_one_class_and_one_registry_entry(monkeypatch):
    """A narrower int8 (what a CPU without VNNI needs to keep its int16 sums from saturating):
    an Int8 whose spec allows codes -64..63 only, registered under a new name."""
    from dataclasses import replace

    from onnx_gpfq import formats, options
    from onnx_gpfq.formats.int8 import Int8
    from onnx_gpfq.core import Alphabet

    class Bounded(Int8):
        name = "int8_bounded"

        def adjust_spec(self, target, spec):
            return replace(spec, alphabet=Alphabet(max(spec.alphabet.lo, -64), min(spec.alphabet.hi, 63)))

    monkeypatch.setitem(formats.FORMATS, Bounded.name, Bounded())
    model, report = quantize(MODELS / "digits_mlp.onnx", CALIB, weight_bits=8, weight_format="int8_bounded", quiet=True)
    codes = [numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("_quantized")
             and t.data_type == TensorProto.INT8]
    assert codes and all(c.min() >= -64 and c.max() <= 63 for c in codes)
    assert max(int(np.abs(c).max()) for c in codes) >= 63  # the bound is reached
    plain, _ = quantize(MODELS / "digits_mlp.onnx", CALIB, weight_bits=8, quiet=True)
    wide = [numpy_helper.to_array(t) for t in plain.graph.initializer if t.name.endswith("_quantized")
            and t.data_type == TensorProto.INT8]
    assert max(int(np.abs(c).max()) for c in wide) > 64  # without the format, the codes use the full range
