"""Which int8 kernels onnxruntime runs on a CPU, and what a deployment target allows the weight codes to be.

onnxruntime's CPU integer GEMM and convolution kernels (MLAS) multiply uint8 activations by int8
weights and accumulate in int32 — except on x86 without VNNI (AVX2, AVX-512BW). There the kernels use
``vpmaddubsw``, which multiplies two *consecutive* elements of the reduction axis K and adds the two
products in **int16 with saturation** before widening to int32:

    acc += sat16(a[2j] * b[2j] + a[2j+1] * b[2j+1])        a in [0, 255], b in [-128, 127]

With 8-bit weight codes near +-127 and large activations the pair overflows and the layer's output is
silently wrong (digits_cnn W8A8: 38.3 dB at the QDQ reference, 16.4 dB deployed on such a CPU).
Two codes of the same sign can never saturate when |b[2j]| + |b[2j+1]| <= 128, since 255 * 128 = 32640
<= 32767; two of opposite signs partly cancel (at most 255 * 128 either way) and never saturate. That
is the bound ``PAIR_BOUND`` the ``any`` target puts on the codes (``pair_reach``) (GPFQ enforces it as it walks the fan-in,
see ``onnx_gpfq.core``). Signed int8 activations are shifted to uint8 by the kernels first, so they
saturate the same way; depthwise convolutions too. VNNI (``vpdpbusd``), AMX and ARM64 (widening
multiply-accumulate, ``sdot``/``udot``) accumulate in int32 and never saturate.

Which pairs: K is the fan-in of MatMul / Gemm as stored (rows of the (K, N) weight), pairs
(0, 1), (2, 3), ... over the whole of K (also across the kernels' K blocks). Conv runs, after
onnxruntime's NHWC rewrite at its default optimisation level, with K ordered (kh, kw, c) within each
group: the channel varies fastest, unlike ONNX's (c, kh, kw) weight layout (``conv_kernel_order``).
All of this was measured with onnxruntime 1.32 under ``qemu-x86_64 -cpu Haswell`` (which reports an
AVX2 CPU without VNNI to MLAS's dispatch), probing every pair of K positions with codes of 127 and
activations of 255; tests/test_cpu_kernels.py repeats those probes where qemu-user is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT16_MAX = 32767
UINT8_MAX = 255
PAIR_BOUND = INT16_MAX // UINT8_MAX  # 128: same-sign |b0| + |b1| <= 128 keeps 255 * (|b0| + |b1|) within int16
# The step search grid of a bounded layer (in place of the default 0.1 .. 1.25, which serves every width
# down to ternary): C in 3% steps (2^(1/24)) from 1 up to 2, where every code is within +-64 (K / C = 63.5) and
# no pair reaches the bound, so the search can always fall back to unclipped codes; 0.63 and 0.8 for weights
# whose clipping pays even at 8 bits. Under the bound the best C of a channel sits between 1 and 2 (the
# larger, the more its consecutive weights are large together), and the output error moves a lot within
# that octave; below 0.63 an 8-bit grid clips so many codes that nearly every pair breaks the bound (each
# re-decided jointly: slow, and never chosen). Measured at W8A8 on the digits models (500 test samples, SQNR at
# the QDQ reference against target reference, seeds 0-5): with the default grid plus (1.6, 2.0) digits_cnn lost
# 0.56 / 0.52 / 0.54 dB at seeds 0 / 1 / 2; with 6% steps (2^(1/12)) 0.30 (mean of six seeds; digits_vit
# 0.21); with these 3% steps 0.13 (digits_vit 0.00), for 4-15% more quantize time. README (--target) has
# this grid's figures.
BOUNDED_C_GRID = (0.63, 0.8, 1.0, 1.029, 1.059, 1.091, 1.122, 1.155, 1.189, 1.224, 1.26, 1.297, 1.335, 1.374,
                  1.414, 1.456, 1.498, 1.542, 1.587, 1.634, 1.682, 1.731, 1.782, 1.834, 1.888, 1.943, 2.0)


@dataclass(frozen=True)
class CpuTarget:
    """A deployment target: which int8 kernels the model must stay exact on."""

    name: str
    saturating_pairs: bool  # some kernel of this target adds pairs of u8 x s8 products in int16
    description: str


TARGETS: dict[str, CpuTarget] = {t.name: t for t in (
    CpuTarget("any", True, "every onnxruntime CPU kernel: x86 with and without VNNI, ARM64 "
                           "(8-bit codes kept within the saturation bound of the AVX2 u8s8 kernels)"),
    CpuTarget("x86-vnni", False, "x86 CPUs with AVX-512 VNNI or AVX-VNNI (int32 accumulation)"),
    CpuTarget("arm64", False, "ARM64 CPUs (int32 accumulation)"),
    CpuTarget("reference", False, "the QDQ model's exact math; for hardware known not to saturate"),
)}


def pair_bound(target: str, max_code: int, act_bits: int | None) -> int | None:
    """The bound on |q_2j| + |q_2j+1| that ``target`` needs for codes up to ``max_code``, or None.

    Only 8-bit activations reach the saturating u8s8 kernels (16-bit ones and weight-only layers run
    in float), and codes with 2 * max_code <= PAIR_BOUND (7 bits and fewer) can never saturate.
    """
    if not TARGETS[target].saturating_pairs or act_bits != 8 or 2 * max_code <= PAIR_BOUND:
        return None
    return PAIR_BOUND


def conv_kernel_order(channels_per_group: int, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """Permutation of a Conv weight's fan-in rows, (c, k1, k2, ...) flattened as ONNX stores them, into the
    order onnxruntime's NHWC int8 kernel reduces over: (k1, k2, ..., c). ``rows[perm]`` is in kernel order."""
    return np.arange(channels_per_group * int(np.prod(kernel_shape, dtype=np.int64))).reshape(
        (channels_per_group, *kernel_shape)).transpose(*range(1, len(kernel_shape) + 1), 0).ravel()


def saturating_u8s8_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """int32 (m, n) product of uint8 a (m, K) and int8 b (K, n) as the AVX2 u8s8 kernel computes it: the
    products of rows (2j, 2j+1) of K added in int16 with saturation, then summed in int32 (K padded with
    a zero row when odd)."""
    a = np.asarray(a).astype(np.int32)
    b = np.asarray(b).astype(np.int32)
    if a.shape[1] % 2:
        a = np.pad(a, ((0, 0), (0, 1)))
        b = np.pad(b, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]
    return np.clip(pairs, -INT16_MAX - 1, INT16_MAX).sum(axis=1, dtype=np.int32)


def pair_reach(codes_k_order: np.ndarray) -> np.ndarray:
    """max(q_2j+ + q_2j+1+, q_2j- + q_2j+1-) per pair of consecutive rows of codes (K, ...) (x+ = max(x, 0),
    x- = max(-x, 0); an odd last row pairs with 0): times 255, the largest |a_2j q_2j + a_2j+1 q_2j+1| any
    uint8 activations give, the int16 sum the AVX2 kernel must hold. Shape (ceil(K / 2), ...)."""
    q = np.asarray(codes_k_order).astype(np.int64)
    if q.shape[0] % 2:
        q = np.concatenate([q, np.zeros((1,) + q.shape[1:], np.int64)])
    pos, neg = np.maximum(q, 0), np.maximum(-q, 0)
    return np.maximum(pos[0::2] + pos[1::2], neg[0::2] + neg[1::2])


def pairs_within_bound(codes_k_order: np.ndarray, bound: int) -> bool:
    """True when no pair of consecutive rows (2j, 2j+1) of codes (K, ...) has codes of one sign whose
    magnitudes sum beyond ``bound`` (pair_reach <= bound)."""
    return bool((pair_reach(codes_k_order) <= bound).all())


def int8_path() -> str:
    """This CPU's onnxruntime int8 path: "x86-vnni", "x86-avx2" (pairs saturate), "arm64" or "other".

    Read from LLVM's host CPU detection (CPUID on x86), the same instruction MLAS dispatches on.
    """
    import platform

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "other"
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
    except Exception:  # llvmlite cannot read the CPU: say nothing rather than guess
        return "other"
    if any(features.get(f, False) for f in ("avx512vnni", "avxvnni", "amx-int8")):
        return "x86-vnni"
    return "x86-avx2" if features.get("avx2", False) else "other"


def int8_path_text(path: str | None = None) -> str:
    """One line for reports: this CPU's int8 path and whether its kernels saturate."""
    path = path or int8_path()
    return {
        "x86-vnni": "x86 with VNNI: int8 products accumulate in int32 (no saturation)",
        "x86-avx2": "x86 without VNNI (AVX2 u8s8 kernels): pairs of int8 products are added in int16 "
                    "and saturate unless the codes respect the pair bound (target 'any')",
        "arm64": "ARM64: int8 products accumulate in int32 (no saturation)",
    }.get(path, "unknown CPU: int8 kernels not identified")
