"""Output bytes of a fixed set of quantizations, recorded so that refactors can prove they change no bit.

``python tests/output_hashes.py --record`` writes tests/data/output_hashes.json for this machine's
fingerprint (CPU features and the versions of the packages whose kernels decide the floats); the test
in test_output_hashes.py compares against the record made on a machine of the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
ROOT = HERE.parent
RECORD = HERE / "data" / "output_hashes.json"
CALIB = str(ROOT / "models" / "digits_calib.npz")

# name -> (model, options). Weight-only and W8 cases pin what the rounding core decides; the rest pin
# formats, activations and the light zoo's graph handling.
CASES: dict[str, tuple[str, dict]] = {
    "mlp_w4a8": ("digits_mlp", {}),
    "cnn_w4a8": ("digits_cnn", {}),
    "vit_w4a8": ("digits_vit", {}),
    "cnn_w8a8": ("digits_cnn", {"weight_bits": 8, "target": "reference"}),
    "vit_w8a8": ("digits_vit", {"weight_bits": 8, "target": "reference"}),
    "cnn_w8a8_any": ("digits_cnn", {"weight_bits": 8}),
    "vit_w8a8_any": ("digits_vit", {"weight_bits": 8}),
    "cnn_w3_rtn_weight_only": ("digits_cnn", {"weight_bits": 3, "method": "rtn", "act_bits": None}),
    "cnn_int4": ("digits_cnn", {"weight_format": "int4"}),
    "vit_matmulnbits": ("digits_vit", {"weight_format": "matmulnbits", "granularity": "block", "block_size": 16}),
    "mlp_ternary_soft_bias": ("digits_mlp", {"weight_bits": "ternary", "sparsity": "soft:0.01", "bias_correction": True}),
    "cnn_percentile_symmetric": ("digits_cnn", {"act_calibration": "percentile", "act_symmetric": True}),
    "vit_tensor_fixed": ("digits_vit", {"granularity": "tensor", "scale_rule": "fixed", "c": 1.5}),
    "light_squeezenet_w4": ("light:squeezenet", {"max_patches": 16, "scale_rule": "fixed"}),
    "light_inception_v1_w8": ("light:inception_v1", {"weight_bits": 8, "max_patches": 16}),  # target any: grouped convs
}


def fingerprint() -> str:
    import numba
    import numpy
    import onnx
    import onnxruntime

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = "+".join(f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags)
    # The ISA flags alone do not decide the kernels: OpenBLAS picks its kernels by CPU model (an AMD EPYC
    # with AVX-512 runs its Haswell ones) and numba compiles for LLVM's name of the host CPU, so two
    # machines with the same flags gave different bytes. Both names go into the fingerprint.
    import llvmlite.binding as llvm
    from threadpoolctl import threadpool_info

    blas = "+".join(sorted({f"{i.get('internal_api')}:{i.get('architecture')}" for i in threadpool_info()
                            if i.get("user_api") == "blas"}))
    return (f"{platform.machine()} {isa} llvm-cpu={llvm.get_host_cpu_name()} blas={blas} numpy={numpy.__version__} "
            f"onnx={onnx.__version__} onnxruntime={onnxruntime.__version__} numba={numba.__version__}")


def output_bytes(case: str) -> bytes:
    from onnx_gpfq import quantize
    from onnx_gpfq.options import parse_sparsity

    model_name, options = CASES[case]
    options = dict(options)
    if "sparsity" in options:
        options["sparsity"] = parse_sparsity(options["sparsity"])
    if model_name.startswith("light:"):
        import light_models

        model = light_models.prepared(model_name.split(":", 1)[1])
        data = light_models.random_inputs(model, 1, seed=1)
    else:
        model, data = str(ROOT / "models" / f"{model_name}.onnx"), CALIB
    q, _ = quantize(model, data, quiet=True, **options)
    return q.SerializeToString()


def digest(case: str) -> str:
    return hashlib.sha256(output_bytes(case)).hexdigest()


def load_record() -> dict:
    return json.loads(RECORD.read_text()) if RECORD.exists() else {}


if __name__ == "__main__":
    if "--record" not in sys.argv:
        sys.exit("usage: python tests/output_hashes.py --record")
    record = load_record()
    record[fingerprint()] = {case: digest(case) for case in CASES}
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(CASES)} hashes for {fingerprint()}")
