"""One peer quantization in its own process, run by tools/peers.py with the peer's own interpreter.

    <peer venv>/bin/python tools/_peers/child.py JOB.json

JOB.json: {"peer", "method", "weight_bits", "act_bits", "model", "calib", "out", "result", "torch_module"}.
Imports only numpy, onnx and the peer's own packages (torch for AIMET and Brevitas), so it runs in
a peer's venv without onnx-gpfq. Writes the quantized model to ``out`` and a JSON to ``result``:
{"wall_s", "cpu_s", "versions", "settings", "note"} or {"unsupported": reason} or {"error": text}.
The timed span is the quantization: from the float model on disk and the calibration batches in
memory to the quantized ONNX file written (a peer's export to ONNX is part of it; imports are not).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np



def _batches(calib: str, batch: int) -> list[dict]:
    with np.load(calib, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != "labels"}
    n = min(a.shape[0] for a in arrays.values())
    n -= n % batch
    return [{k: a[i:i + batch] for k, a in arrays.items()} for i in range(0, n, batch)]


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------- onnx-gpfq

def run_onnx_gpfq(job: dict, batches: list[dict]) -> dict:
    import onnx

    import onnx_gpfq

    model, _report = onnx_gpfq.quantize(job["model"], batches, weight_bits=job["weight_bits"],
                                        act_bits=job["act_bits"], quiet=True)
    onnx.save(model, job["out"])
    return {"settings": f"onnx_gpfq.quantize(weight_bits={job['weight_bits']}, act_bits={job['act_bits']}) defaults",
            "versions": {"onnx-gpfq": _version("onnx-gpfq"), "onnxruntime": _version("onnxruntime")}}


# ---------------------------------------------------------------- AIMET-ONNX

def run_aimet(job: dict, batches: list[dict]) -> dict:
    import onnx
    from aimet_onnx.quantsim import QuantizationSimModel

    model = onnx.load(job["model"])
    sim = QuantizationSimModel(model, param_type=f"int{job['weight_bits']}", activation_type=f"int{job['act_bits']}")
    if job["method"] == "adaround":
        from aimet_onnx import apply_adaround

        apply_adaround(sim, batches)  # its default num_iterations
        settings = "apply_adaround(sim, calibration batches) at its defaults (num_iterations=10000 per layer)"
    elif job["method"] == "seqmse":
        from aimet_onnx import apply_seq_mse

        apply_seq_mse(sim, batches)  # its default num_candidates
        settings = "apply_seq_mse(sim, calibration batches) at its defaults (num_candidates=20)"
    else:
        raise ValueError(job["method"])

    sim.compute_encodings(batches)
    qdq = sim.to_onnx_qdq()
    onnx.save(qdq, job["out"])
    return {"settings": f"QuantizationSimModel(param_type=int{job['weight_bits']}, activation_type=int{job['act_bits']}), "
                        f"{settings}, compute_encodings on the same batches, to_onnx_qdq()",
            "versions": {"aimet-onnx": _version("aimet-onnx"), "torch": _version("torch"),
                         "onnxruntime": _version("onnxruntime")}}


# ---------------------------------------------------------------- AMD Quark (ONNX flow)

def quark_int4_support() -> str | None:
    """None when Quark's ONNX config has an int4 spec for Conv/Gemm weights, else the reason it has not."""
    from quark.onnx.quantization.config import spec

    names = sorted(n for n in dir(spec) if n.endswith("Spec") and not n.startswith("_") and n != "QTensorConfig")
    if any("int4" in n.lower() for n in names):
        return None
    return ("Quark's ONNX flow has no int4 spec for Conv/Gemm (quark.onnx.quantization.config.spec offers "
            + ", ".join(names) + "; int4 there is only MatMulNBits weight-only block quantization of MatMul)")


def run_quark(job: dict, batches: list[dict]) -> dict:
    if job["weight_bits"] != 8 or job["act_bits"] != 8:
        reason = quark_int4_support() if job["weight_bits"] == 4 else None
        return {"unsupported": reason or f"W{job['weight_bits']}A{job['act_bits']} is not one of Quark's ONNX presets"}
    from onnxruntime.quantization import CalibrationDataReader
    from quark.onnx import ModelQuantizer
    from quark.onnx.quantization.config.custom_config import A8W8_ADAROUND_QCONFIG, A8W8_QCONFIG

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

        def rewind(self):
            self.it = iter(batches)

    config = {"adaround": A8W8_ADAROUND_QCONFIG, "ptq": A8W8_QCONFIG}[job["method"]]
    ModelQuantizer(config).quantize_model(job["model"], job["out"], Reader())
    name = {"adaround": "A8W8_ADAROUND_QCONFIG", "ptq": "A8W8_QCONFIG"}[job["method"]]
    return {"settings": f"ModelQuantizer({name}).quantize_model (its preset: "
                        + ("AdaRound, 1000 iterations, lr 0.1" if job["method"] == "adaround" else "MinMax PTQ") + ")",
            "versions": {"amd-quark": _version("amd-quark"), "onnxruntime": _version("onnxruntime")}}


# ---------------------------------------------------------------- Brevitas

def run_brevitas(job: dict, batches: list[dict]) -> dict:
    import torch

    if not job.get("torch_module"):
        return {"unsupported": "Brevitas quantizes PyTorch modules and has no ONNX import; this tool has PyTorch "
                               "definitions of the digits models only (tools/train_digits.py)"}
    sys.path.insert(0, job["tools_dir"])
    from _peers import torch_digits

    module, how = torch_digits.load(job["torch_module"], job["model"])
    qmodel, settings = torch_digits.brevitas_gpfq(module, batches, job["weight_bits"], job["act_bits"])
    torch_digits.export(qmodel, job["out"], batches[0])
    del torch
    return {"settings": settings + "; " + how,
            "versions": {"brevitas": _version("brevitas"), "torch": _version("torch")}}


RUNNERS = {"onnx-gpfq": run_onnx_gpfq, "aimet-onnx": run_aimet, "amd-quark": run_quark, "brevitas": run_brevitas}


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        job = json.load(f)
    batches = _batches(job["calib"], job["batch"])  # the same batches for every peer
    try:
        import onnx  # noqa: F401  (imports before the clock, as bench_quantize does)
        if job["peer"] in ("aimet-onnx", "brevitas"):
            import torch  # noqa: F401
        t0, c0 = time.perf_counter(), time.process_time()
        res = RUNNERS[job["peer"]](job, batches)
        res["wall_s"] = time.perf_counter() - t0
        res["cpu_s"] = time.process_time() - c0
        if "unsupported" not in res and not os.path.exists(job["out"]):
            res = {"error": "the peer wrote no model"}
    except Exception as exc:  # noqa: BLE001  (a peer's failure is a finding: reported, not raised)
        tb = traceback.format_exc().strip().splitlines()
        res = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
               "traceback": tb[-12:]}
    with open(job["result"], "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
