"""Evaluate models side by side on a data set: accuracy, agreement and SQNR against the float model, latency.

The first output of each model is compared. Accuracy is top-1 over the last axis against ``labels``
(when the data holds them); agreement is the fraction of samples whose top-1 matches the float
model's; SQNR is 10 log10(sum y^2 / sum (y - y_q)^2) in dB over the whole data set. Latency is the
median wall time of one batch (onnxruntime, all graph optimisations on, as deployed).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .calib import load_batches, model_inputs
from .errors import UserError
from .graph import load_model


@dataclass(frozen=True)
class ModelMetrics:
    path: str
    accuracy: float | None
    agreement: float
    sqnr_db: float | None  # None for the float model itself
    latency_ms: float
    size_bytes: int
    speedup: float  # float latency / this latency


@dataclass(frozen=True)
class Thresholds:
    """CI-gate limits, checked on every non-float model. Accuracy figures in [0, 1], drop in points."""

    min_accuracy: float | None = None
    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    min_sqnr: float | None = None


def _session(path: str, threads: int = 0):
    from . import runtime

    try:  # spinning as deployed: latency is what this measures
        return runtime.session(path, threads, optimization="all", spinning=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"onnxruntime cannot load {path}: {first}") from None


def _read_data(path: str) -> dict[str, np.ndarray]:
    if not os.path.exists(path):
        raise UserError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise UserError(f"cannot read data file {path}: {exc}") from None


def evaluate(float_model: str, quantized: list[str], data: str, batch_size: int = 64, repeats: int = 3) -> list[ModelMetrics]:
    """Metrics for the float model (first) and each quantized model, on the same batches."""
    paths = [str(float_model)] + [str(q) for q in quantized]
    for p in paths:
        load_model(p)  # clear errors for missing / non-ONNX files
    arrays = _read_data(str(data))
    labels = arrays.pop("labels", None)
    inputs = model_inputs(load_model(paths[0]))
    batches = load_batches({k: v for k, v in arrays.items()}, inputs, batch_size)
    sessions = [_session(p) for p in paths]
    names = [s.get_outputs()[0].name for s in sessions]

    outputs = [np.concatenate([s.run([n], b)[0] for b in batches]) for s, n in zip(sessions, names)]
    latencies = _latencies(sessions, names, batches, repeats)
    ref = outputs[0].astype(np.float64)
    ref_top1 = ref.reshape(ref.shape[0], -1, ref.shape[-1]).argmax(-1) if ref.ndim > 1 else None
    metrics = []
    for i, (path, out) in enumerate(zip(paths, outputs)):
        out = out.astype(np.float64)
        top1 = out.reshape(out.shape[0], -1, out.shape[-1]).argmax(-1) if out.ndim > 1 else None
        accuracy = None
        if labels is not None and top1 is not None:
            n = top1.shape[0]
            accuracy = float(np.mean(top1.reshape(n, -1)[:, 0] == labels.reshape(-1)[:n]))
        agreement = float(np.mean(top1 == ref_top1)) if top1 is not None else float("nan")
        sqnr = None
        if i > 0:
            noise = float(np.sum((ref - out) ** 2))
            sqnr = float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))
        metrics.append(ModelMetrics(path, accuracy, agreement, sqnr, latencies[i], os.path.getsize(path),
                                    latencies[0] / latencies[i] if latencies[i] > 0 else float("nan")))
    return metrics


def _latencies(sessions, names, batches, repeats: int) -> list[float]:
    """Median ms per batch, the models interleaved batch by batch so that machine noise hits all alike."""
    for s, n in zip(sessions, names):  # warm-up
        s.run([n], batches[0])
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(repeats):
        for b in batches:
            for i, (s, n) in enumerate(zip(sessions, names)):
                t0 = time.perf_counter()
                s.run([n], b)
                times[i].append(time.perf_counter() - t0)
    return [float(np.median(t) * 1000) for t in times]


def check_thresholds(metrics: list[ModelMetrics], limits: Thresholds) -> str | None:
    """The first violated limit as a one-line reason, or None when all models pass."""
    reference = metrics[0]
    for m in metrics[1:]:
        if limits.min_accuracy is not None:
            if m.accuracy is None:
                return "--min-accuracy needs 'labels' in the data file"
            if m.accuracy < limits.min_accuracy:
                return f"{m.path}: accuracy {m.accuracy:.4f} < --min-accuracy {limits.min_accuracy}"
        if limits.max_accuracy_drop is not None:
            if m.accuracy is None or reference.accuracy is None:
                return "--max-accuracy-drop needs 'labels' in the data file"
            drop = 100 * (reference.accuracy - m.accuracy)
            if drop > limits.max_accuracy_drop:
                return f"{m.path}: accuracy drop {drop:.2f} points > --max-accuracy-drop {limits.max_accuracy_drop}"
        if limits.min_agreement is not None and m.agreement < limits.min_agreement:
            return f"{m.path}: agreement {m.agreement:.4f} < --min-agreement {limits.min_agreement}"
        if limits.min_sqnr is not None and (m.sqnr_db is None or m.sqnr_db < limits.min_sqnr):
            return f"{m.path}: SQNR {m.sqnr_db:.2f} dB < --min-sqnr {limits.min_sqnr}"
    return None
