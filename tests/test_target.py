"""--target: 8-bit codes that no onnxruntime CPU kernel saturates ('any', the default), recorded in the model."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnx_gpfq import cpu, quantize
from onnx_gpfq.errors import UserError

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent / "models"
CALIB = str(MODELS / "digits_calib.npz")


def _layer_codes(model: onnx.ModelProto):
    """(node, codes in the int8 kernel's reduction order: (N1, K)) for every Conv/Gemm/MatMul with int8 codes."""
    inits = {t.name: t for t in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for node in model.graph.node:
        src = dq.get(node.input[1]) if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 else None
        if src is None or src.input[0] not in inits:
            continue
        codes = numpy_helper.to_array(inits[src.input[0]]).astype(np.int64)
        if node.op_type == "Conv":  # (O, C/g, *k) -> per output channel, (k..., c) order
            yield node.name, codes.transpose(0, *range(2, codes.ndim), 1).reshape(codes.shape[0], -1)
        elif node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            yield node.name, codes  # (N, K)
        else:
            yield node.name, codes.T  # (K, N) -> (N, K)


def _pair_sums(codes_nk: np.ndarray) -> np.ndarray:
    k = codes_nk.shape[1] - codes_nk.shape[1] % 2
    return np.abs(codes_nk[:, 0:k:2]) + np.abs(codes_nk[:, 1:k:2])


@pytest.fixture(scope="module")
def w8a8():
    out = {}
    for name in ("digits_cnn", "digits_vit"):
        for target in ("any", "reference"):
            out[name, target] = quantize(str(MODELS / f"{name}.onnx"), CALIB, weight_bits=8, target=target, quiet=True)
    return out


@pytest.mark.parametrize("name", ["digits_cnn", "digits_vit"])
def test_any_keeps_every_pair_within_the_bound_and_reference_does_not(w8a8, name):
    model, report = w8a8[name, "any"]
    layers = list(_layer_codes(model))
    assert len(layers) == len(report.layers) == report.bounded_layers
    assert all(_pair_sums(codes).max() <= cpu.PAIR_BOUND for _, codes in layers)
    # the unconstrained codes do break it: the bound is what keeps the kernels exact
    free, free_report = w8a8[name, "reference"]
    assert free_report.bounded_layers == 0
    assert max(_pair_sums(codes).max() for _, codes in _layer_codes(free)) > cpu.PAIR_BOUND


def test_target_is_recorded_in_the_model_and_the_report(w8a8):
    for (name, target), (model, report) in w8a8.items():
        props = {p.key: p.value for p in model.metadata_props}
        assert props["onnx_gpfq.target"] == target
        assert report.target == target and report.to_dict()["target"] == target
    assert "pair bound" in w8a8["digits_cnn", "any"][1].table()


def test_bounded_codes_compute_exactly_in_the_saturating_kernel_model(w8a8):
    """Every bounded layer's codes times any uint8 activations: the AVX2 model equals the exact product."""
    rng = np.random.default_rng(0)
    for _, codes in _layer_codes(w8a8["digits_cnn", "any"][0]):
        a = np.concatenate([np.full((1, codes.shape[1]), 255), rng.integers(0, 256, (15, codes.shape[1]))]).astype(np.uint8)
        assert np.array_equal(cpu.saturating_u8s8_matmul(a, codes.T), a.astype(np.int64) @ codes.T)


def test_low_bits_and_weight_only_are_unconstrained():
    model, report = quantize(str(MODELS / "digits_cnn.onnx"), CALIB, weight_bits=4, quiet=True)
    assert report.bounded_layers == 0
    _, report = quantize(str(MODELS / "digits_mlp.onnx"), CALIB, weight_bits=8, act_bits=None, quiet=True)
    assert report.bounded_layers == 0


def test_unknown_target_is_a_user_error():
    with pytest.raises(UserError, match="--target"):
        quantize(str(MODELS / "digits_mlp.onnx"), CALIB, target="x86")


def _deployed(float_model, *quantized):
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or platform.machine() != "x86_64":
        pytest.skip("needs qemu-user on x86_64 (apt-get install qemu-user; .ci/run installs it)")
    run = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, str(HERE / "deployed_sqnr.py"), str(float_model),
                          str(MODELS / "digits_test.npz"), *map(str, quantized)],
                         capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_any_is_exact_on_an_avx2_cpu_without_vnni_where_unconstrained_codes_are_not(w8a8, tmp_path):
    """As onnxruntime runs them on an AVX2 CPU (qemu), W8A8 'any' models keep their QDQ reference SQNR
    (within 0.5 dB); the unconstrained ones lose more than 5 dB to saturation."""
    paths = {}
    for (name, target), (model, _) in w8a8.items():
        if name == "digits_cnn":
            paths[target] = tmp_path / f"{name}.{target}.onnx"
            onnx.save(model, paths[target])
    sqnr = _deployed(MODELS / "digits_cnn.onnx", paths["any"], paths["reference"])
    bounded, free = sqnr[str(paths["any"])], sqnr[str(paths["reference"])]
    assert bounded["reference"] - bounded["deployed"] <= 0.5, bounded
    assert free["reference"] - free["deployed"] > 5.0, free
