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

from onnx_gpfq import cpu, quantize
from onnx_gpfq.errors import UserError
from onnx_gpfq.inspection import inspect, kernel_codes

HERE = Path(__file__).resolve().parent
MODELS = HERE.parent / "models"
CALIB = str(MODELS / "digits_calib.npz")


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
    layers = kernel_codes(model)
    assert len(layers) == len(report.layers) == report.bounded_layers
    assert all(cpu.pairs_within_bound(codes, cpu.PAIR_BOUND) for codes in layers.values())
    info = inspect(model)
    assert info["saturating_layers"] == [] and info["target"] == "any"
    # the unconstrained codes do break it: the bound is what keeps the kernels exact
    free, free_report = w8a8[name, "reference"]
    assert free_report.bounded_layers == 0
    assert inspect(free)["saturating_layers"]


def test_target_is_recorded_in_the_model_and_the_report(w8a8):
    for (name, target), (model, report) in w8a8.items():
        props = {p.key: p.value for p in model.metadata_props}
        assert props["onnx_gpfq.target"] == target
        assert report.target == target and report.to_dict()["target"] == target
    assert "pair bound" in w8a8["digits_cnn", "any"][1].table()


def test_bounded_codes_compute_exactly_in_the_saturating_kernel_model(w8a8):
    """Every bounded layer's codes times any uint8 activations: the AVX2 model equals the exact product."""
    rng = np.random.default_rng(0)
    for codes in kernel_codes(w8a8["digits_cnn", "any"][0]).values():
        a = np.concatenate([np.full((1, codes.shape[0]), 255), rng.integers(0, 256, (15, codes.shape[0]))]).astype(np.uint8)
        assert np.array_equal(cpu.saturating_u8s8_matmul(a, codes), a.astype(np.int64) @ codes)


def test_low_bits_and_weight_only_are_unconstrained():
    model, report = quantize(str(MODELS / "digits_cnn.onnx"), CALIB, weight_bits=4, quiet=True)
    assert report.bounded_layers == 0
    _, report = quantize(str(MODELS / "digits_mlp.onnx"), CALIB, weight_bits=8, act_bits=None, quiet=True)
    assert report.bounded_layers == 0


def test_unknown_target_is_a_user_error():
    with pytest.raises(UserError, match="--target"):
        quantize(str(MODELS / "digits_mlp.onnx"), CALIB, target="x86")


def _evaluate_on_avx2(tmp_path, *quantized):
    """`onnx-gpfq evaluate --json` on digits_cnn, run as an AVX2 CPU without VNNI runs it (qemu): (result, stderr)."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or platform.machine() != "x86_64":
        pytest.skip("needs qemu-user on x86_64 (apt-get install qemu-user; .ci/run installs it)")
    with np.load(MODELS / "digits_test.npz") as data:  # emulation is slow: 128 samples
        np.savez(tmp_path / "test128.npz", **{k: data[k][:128] for k in data.files})
    run = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, "-m", "onnx_gpfq.cli", "evaluate",
                          str(MODELS / "digits_cnn.onnx"), *map(str, quantized), "--data", str(tmp_path / "test128.npz"),
                          "--json"], capture_output=True, text=True, env=dict(os.environ), timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    return {m["path"]: m for m in json.loads(run.stdout)["models"]}, run.stderr


def test_any_is_exact_on_an_avx2_cpu_without_vnni_where_unconstrained_codes_are_not(w8a8, tmp_path):
    """As onnxruntime runs them on an AVX2 CPU (qemu), W8A8 'any' models keep their QDQ reference SQNR
    (within 0.5 dB); the unconstrained ones lose more than 5 dB to saturation, and evaluate warns about them."""
    paths = {}
    for (name, target), (model, _) in w8a8.items():
        if name == "digits_cnn":
            paths[target] = tmp_path / f"{name}.{target}.onnx"
            onnx.save(model, paths[target])
    metrics, stderr = _evaluate_on_avx2(tmp_path, paths["any"], paths["reference"])
    bounded, free = metrics[str(paths["any"])], metrics[str(paths["reference"])]
    assert bounded["kernel_loss_db"] <= 0.5, bounded
    assert free["kernel_loss_db"] > 5.0, free
    warnings = [line for line in stderr.splitlines() if line.startswith("onnx-gpfq: warning:")]
    assert len(warnings) == 1 and str(paths["reference"]) in warnings[0] and "--target any" in warnings[0]


def test_evaluate_reports_the_reference_beside_the_deployed_sqnr(w8a8, tmp_path):
    """On any CPU, an 'any' model runs as its QDQ reference computes it: no kernel loss, no warning."""
    from onnx_gpfq.evaluate import evaluate, kernel_warnings

    path = tmp_path / "cnn.any.onnx"
    onnx.save(w8a8["digits_cnn", "any"][0], path)
    float_metrics, metrics = evaluate(str(MODELS / "digits_cnn.onnx"), [str(path)], str(MODELS / "digits_test.npz"),
                                      repeats=1)
    assert float_metrics.sqnr_reference_db is None and float_metrics.kernel_loss_db is None
    assert metrics.sqnr_reference_db > 30 and abs(metrics.kernel_loss_db) <= 0.5
    assert kernel_warnings([float_metrics, metrics]) == []
