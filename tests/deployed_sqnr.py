"""Output SQNR (dB) of quantized models against their float model as onnxruntime runs them here, with
default session options (deployed) and with graph optimisations off (the QDQ reference), as JSON.
Run by test_target.py under ``qemu-x86_64 -cpu Haswell`` to see an AVX2 CPU without VNNI.

    python tests/deployed_sqnr.py FLOAT.onnx DATA.npz QUANT.onnx [QUANT.onnx ...]

Uses the first SAMPLES samples of DATA (environment variable, default 128): emulation is slow.
"""

import json
import os
import sys

import numpy as np
import onnxruntime as ort


def _run(path, feeds, optimise):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimise:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def sqnr(ref, y):
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - y).astype(np.float64) ** 2).sum()))


if __name__ == "__main__":
    float_path, data_path, *quantized = sys.argv[1:]
    with np.load(data_path) as data:
        n = int(os.environ.get("SAMPLES", "128"))
        feeds = {k: data[k][:n] for k in data.files if k != "labels"}
    ref = _run(float_path, feeds, True)
    print(json.dumps({q: {"deployed": sqnr(ref, _run(q, feeds, True)), "reference": sqnr(ref, _run(q, feeds, False))}
                      for q in quantized}))
