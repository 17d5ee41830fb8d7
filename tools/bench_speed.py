"""Inference speed of quantized models against float, side by side (onnx-gpfq evaluate's latency).

    python tools/bench_speed.py [--json] [--repeats R]

Quantizes the shipped digits models (batch 64) and the onnx package's light ResNet-50 (random
weights, batch 1) at W8A8 and W4A8 (int8 containers), then times float and quantized models
interleaved batch by batch and prints, per model, latency per batch and the speedup over float,
plus the integer-kernel fraction onnxruntime's optimiser reached.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # light_models: the light zoo with seeded random weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over the data per model (default 5)")
    parser.add_argument("--models", nargs="*", default=["digits_mlp", "digits_cnn", "digits_vit", "light:resnet50"])
    args = parser.parse_args()

    import onnx

    from onnx_gpfq import evaluate, quantize, save_model
    from onnx_gpfq.inspection import inspect

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name.startswith("light:"):
                import light_models

                model = light_models.prepared(name.split(":", 1)[1])
                float_path = Path(tmp) / f"{name[6:]}.onnx"
                onnx.save(model, float_path)
                calib = light_models.random_inputs(model, 8, seed=0)
                data = Path(tmp) / f"{name[6:]}_data.npz"
                np.savez(data, **light_models.random_inputs(model, 16, seed=1))
                options = dict(max_patches=64, scale_rule="fixed")
                batch = 1
            else:
                float_path = ROOT / "models" / f"{name}.onnx"
                calib, data, options, batch = str(ROOT / "models" / "digits_calib.npz"), ROOT / "models" / "digits_test.npz", {}, 64
            paths = []
            for bits in (8, 4):
                q, _ = quantize(str(float_path), calib, weight_bits=bits, quiet=True, **options)
                path = Path(tmp) / f"{Path(float_path).stem}.w{bits}a8.onnx"
                save_model(q, path)
                paths.append((bits, path, inspect(q)["integer_kernel_fraction"]))
            metrics = evaluate(str(float_path), [str(p) for _, p, _ in paths], str(data), batch_size=batch,
                               repeats=args.repeats)
            for (bits, _, fraction), m in zip(paths, metrics[1:]):
                rows.append({"model": name, "weights": f"W{bits}A8", "batch": batch,
                             "float_ms": round(metrics[0].latency_ms, 4), "quant_ms": round(m.latency_ms, 4),
                             "speedup": round(m.speedup, 3), "integer_kernel_fraction": fraction})
    if args.json:
        print(json.dumps({"rows": rows}))
    else:
        for r in rows:
            print(f"{r['model']:16s} {r['weights']} batch {r['batch']:3d}: float {r['float_ms']:8.3f} ms, "
                  f"quantized {r['quant_ms']:8.3f} ms, speedup {r['speedup']:.2f}x, "
                  f"integer kernels {r['integer_kernel_fraction']:.2f}")


if __name__ == "__main__":
    main()
