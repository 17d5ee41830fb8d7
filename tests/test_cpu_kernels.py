"""The saturation model of onnxruntime's AVX2 int8 kernels (onnx_gpfq.cpu), and its check against the kernels
themselves under qemu's emulation of an AVX2 CPU without VNNI."""

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from onnx_gpfq import cpu

HERE = Path(__file__).resolve().parent


def test_saturating_model_is_exact_within_the_pair_bound_and_saturates_beyond():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (64, 51)).astype(np.uint8)
    b = rng.integers(-127, 128, (51, 40)).astype(np.int8)
    exact = a.astype(np.int64) @ b.astype(np.int64)
    assert not np.array_equal(cpu.saturating_u8s8_matmul(a, b), exact)  # random full-range codes saturate
    # clip the second code of each pair to the bound, as the 'any' target does: only a code of the first's sign
    bounded = b.astype(np.int32)
    first = bounded[0:50:2]
    bounded[1:50:2] = np.clip(bounded[1:50:2], -(cpu.PAIR_BOUND - np.maximum(-first, 0)), cpu.PAIR_BOUND - np.maximum(first, 0))
    assert cpu.pairs_within_bound(bounded, cpu.PAIR_BOUND)
    assert (np.abs(bounded[0:50:2]) + np.abs(bounded[1:50:2]) > cpu.PAIR_BOUND).any()  # opposite signs stay free
    assert np.array_equal(cpu.saturating_u8s8_matmul(a, bounded), a.astype(np.int64) @ bounded)
    worst = np.full((1, 2), 255, np.uint8)  # the bound is tight: 129 of one sign in a pair overflows
    assert cpu.saturating_u8s8_matmul(worst, np.array([[64], [64]]))[0, 0] == 255 * 128
    assert cpu.saturating_u8s8_matmul(worst, np.array([[65], [64]]))[0, 0] == cpu.INT16_MAX
    assert cpu.saturating_u8s8_matmul(worst, np.array([[-65], [-64]]))[0, 0] == -cpu.INT16_MAX - 1
    for pair in ([127], [-128]), ([-128], [127]):  # opposite signs: at most 255 * 128 either way
        assert cpu.saturating_u8s8_matmul(np.array([[255, 0], [0, 255], [255, 255]], np.uint8), np.array(pair)).tolist() \
            == (np.array([[255, 0], [0, 255], [255, 255]]) @ np.array(pair)).tolist()


def test_pair_reach_is_the_largest_same_sign_sum():
    q = np.array([[127, 64, -3, 0, 5], [-128, 64, -125, 7, 0], [3, 1, 1, -1, 0]])
    assert cpu.pair_reach(q).tolist() == [[128, 128, 128, 7, 5], [3, 1, 1, 1, 0]]
    assert cpu.pairs_within_bound(q[:2], 128) and not cpu.pairs_within_bound(q[:2], 127)


def test_pair_bound_applies_only_where_a_kernel_can_saturate():
    assert cpu.pair_bound("any", 127, 8) == 128
    assert cpu.pair_bound("any", 128, 8) == 128  # full-range codes
    assert cpu.pair_bound("any", 63, 8) is None  # 7-bit codes: 2 * 63 <= 128
    assert cpu.pair_bound("any", 127, 16) is None and cpu.pair_bound("any", 127, None) is None
    for name in ("x86-vnni", "arm64", "reference"):
        assert cpu.pair_bound(name, 127, 8) is None


def test_conv_kernel_order_is_the_nhwc_fan_in():
    w = np.arange(5 * 3 * 2 * 4).reshape(5, 3, 2, 4)  # (O, C, kh, kw)
    perm = cpu.conv_kernel_order(3, (2, 4))
    assert np.array_equal(w.reshape(5, -1)[:, perm], w.transpose(0, 2, 3, 1).reshape(5, -1))
    assert np.array_equal(np.sort(perm), np.arange(24))


def test_int8_path_names_this_cpu():
    assert cpu.int8_path() in ("x86-vnni", "x86-avx2", "arm64", "other")
    assert cpu.int8_path_text("x86-avx2").startswith("x86 without VNNI")


def _qemu_probe(*convs):
    qemu = shutil.which("qemu-x86_64")
    if qemu is None or platform.machine() != "x86_64":
        pytest.skip("needs qemu-user on x86_64 (apt-get install qemu-user; .ci/run installs it)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), *sys.path]))
    run = subprocess.run([qemu, "-cpu", "Haswell", sys.executable, str(HERE / "kernel_probe.py"), *convs],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_model_matches_onnxruntime_on_an_avx2_cpu_without_vnni():
    """MatMul: onnxruntime's int32 accumulator is the saturating model's, not the exact product. Conv: the pairs
    that saturate are consecutive positions of the (kh, kw, c) order within each group, depthwise included."""
    probes = _qemu_probe("3:3,3:1", "4:2,3:2", "1:3,3:4")
    assert probes["int8_path"] == "x86-avx2"
    assert probes["matmul"] == {"equals_exact": False, "equals_saturating_model": True}
    assert probes["bounded"] == {"equals_exact": True}  # the codes the 'any' target allows never saturate
    for spec, found in probes.items():
        if not spec.startswith("conv"):
            continue
        c, kernel, _ = spec.split()[1].split(":")
        kernel = tuple(int(v) for v in kernel.split(","))
        order = cpu.conv_kernel_order(int(c), kernel)  # fan-in index (c, kh, kw) at each kernel position
        k = len(order) - len(order) % 2
        expected = sorted(sorted([int(order[p]), int(order[p + 1])]) for p in range(0, k, 2))
        assert found == expected, spec
