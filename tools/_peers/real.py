"""Real models for tools/peers.py, from the real-model suite (tools/real_models.py and its
tools/_real_models/ package): the model file, seeded calibration and evaluation data, and the task
metric are that suite's own functions (imported, not copied), so peers and onnx-gpfq are scored as
the suite scores them. Without that package this raises RealModelsUnavailable with the reason.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

DEFAULT_CACHE = os.path.expanduser("~/.cache/onnx-gpfq/real-models")
SEED = 0  # tools/real_models.py's default seed


class RealModelsUnavailable(RuntimeError):
    pass


def model(name: str, cache: str = DEFAULT_CACHE, work: str | None = None) -> dict:
    try:
        from _real_models import specs
    except ImportError as exc:
        raise RealModelsUnavailable(f"the real-model suite (tools/_real_models) is not importable: {exc}") from exc
    if name not in specs.SPECS:
        raise RealModelsUnavailable(f"no real model {name!r} (the suite has {', '.join(specs.SPECS)})")
    spec = specs.SPECS[name]
    path = spec.path(cache)
    calib, cal_meta = specs.make_data(spec, spec.calib_default, 0, SEED, cache)
    evals, meta = specs.make_data(spec, spec.eval_default, 1, SEED, cache, exclude=set(cal_meta.get("truth", [])))
    work = work or tempfile.mkdtemp(prefix=f"peers-{name}-")
    calib_path = os.path.join(work, f"{name}-calib.npz")
    np.savez(calib_path, **calib)

    def metric(runs: list, float_runs: list) -> float:
        preds = [specs.decode(spec, o, cache) for o in runs]
        ref = [specs.decode(spec, o, cache) for o in float_runs]
        return float(specs.score(spec, preds, ref, meta)[spec.metric])

    return {"name": name, "path": path, "calib": calib_path, "eval_inputs": evals, "per_sample": True,
            "metric_name": spec.metric, "higher_is_better": spec.higher_is_better, "metric": metric,
            "torch_module": None, "what": f"{spec.package} {spec.version} {spec.member or ''}: {spec.what}",
            "calibration_samples": spec.calib_default, "evaluation_samples": spec.eval_default}
