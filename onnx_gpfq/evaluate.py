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
from pathlib import Path

import numpy as np

from .calib import load_batches, model_inputs
from .errors import UserError, first_line
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
    # SQNR of the QDQ model's own math (onnxruntime with graph optimisations off: no integer kernels);
    # sqnr_reference_db - sqnr_db is what this CPU's integer kernels lose (saturation, see onnx_gpfq.cpu)
    sqnr_reference_db: float | None = None

    @property
    def kernel_loss_db(self) -> float | None:
        if self.sqnr_db is None or self.sqnr_reference_db is None:
            return None
        return self.sqnr_reference_db - self.sqnr_db


@dataclass(frozen=True)
class Thresholds:
    """CI-gate limits, checked on every non-float model. Accuracy figures in [0, 1], drop in points."""

    min_accuracy: float | None = None
    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    min_sqnr: float | None = None

    def check(self) -> None:
        """Every limit finite and in its range (NaN would pass every comparison)."""
        for option, value, low, high in (("--min-accuracy", self.min_accuracy, 0.0, 1.0),
                                         ("--max-accuracy-drop", self.max_accuracy_drop, -100.0, 100.0),
                                         ("--min-agreement", self.min_agreement, 0.0, 1.0),
                                         ("--min-sqnr", self.min_sqnr, -1000.0, 1000.0)):
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and low <= value <= high):
                raise UserError(f"{option} must be a number in [{low:g}, {high:g}] (got {value!r})")


KERNEL_LOSS_WARN_DB = 0.5  # evaluate warns when this CPU's integer kernels lose more than this


def _session(path: str, threads: int = 0, optimization: str = "all"):
    from . import runtime

    try:  # spinning as deployed: latency is what this measures
        return runtime.session(path, threads, optimization=optimization, spinning=True)
    except Exception as exc:
        raise UserError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None


def _read_data(path: str, names: list[str]) -> dict[str, np.ndarray]:
    from .npyfile import read_npz

    if not os.path.exists(path):
        raise UserError(f"data file not found: {path}")
    if not os.path.isfile(path):
        raise UserError(f"data file {path} is not a regular file")
    return read_npz(Path(path), names + ["labels"], what="data file")


def _labels(labels: np.ndarray, n: int, path: str) -> np.ndarray:
    """Class indices, one per sample: integer labels as they are, valid one-hot rows (N, C) by argmax."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        onehot = np.isin(labels, (0, 1)).all() and (labels.sum(axis=1) == 1).all()
        if not onehot:
            raise UserError(f"{path}: 'labels' has shape {labels.shape} but its rows are not one-hot: "
                            "give class indices (N,) or one-hot rows (N, C)")
        labels = labels.argmax(axis=1)
    labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if labels.ndim != 1:
        raise UserError(f"{path}: 'labels' must be class indices (N,) or one-hot (N, C) (got shape {labels.shape})")
    if labels.dtype.kind not in "iu" and not (labels.dtype.kind in "fb" and np.all(np.mod(labels, 1) == 0)):
        raise UserError(f"{path}: 'labels' must hold integer class indices (got dtype {labels.dtype})")
    if labels.shape[0] != n:
        raise UserError(f"{path}: 'labels' holds {labels.shape[0]} entries for {n} samples")
    return labels.astype(np.int64)


def _run(session, name: str, batch, path: str) -> np.ndarray:
    try:
        return session.run([name], batch)[0]
    except Exception as exc:
        if type(exc).__module__.startswith("onnxruntime"):
            raise UserError(f"onnxruntime cannot run {path} on the data: {first_line(exc)}") from None
        raise


def evaluate(float_model: str, quantized: list[str], data: str, batch_size: int = 64, repeats: int = 3) -> list[ModelMetrics]:
    """Metrics for the float model (first) and each quantized model, on the same batches."""
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise UserError(f"--batch-size must be a positive integer (got {batch_size!r})")
    paths = [str(float_model)] + [str(q) for q in quantized]
    models = [load_model(p) for p in paths]  # clear errors for missing / non-ONNX files
    inputs = model_inputs(models[0])
    for path, model in zip(paths[1:], models[1:]):
        other = model_inputs(model)
        if [s.name for s in other] != [s.name for s in inputs]:
            raise UserError(f"{path} takes inputs {[s.name for s in other]}, the float model {[s.name for s in inputs]}")
    del models
    arrays = _read_data(str(data), [s.name for s in inputs])
    labels = arrays.pop("labels", None)
    batches = load_batches(arrays, inputs, batch_size)
    if labels is not None:
        samples = [a.shape[0] for s in inputs if (a := arrays[s.name]).ndim and s.dims]
        labels = _labels(labels, samples[0] if samples else 1, str(data))
    sessions = [_session(p) for p in paths]
    names = [s.get_outputs()[0].name for s in sessions]

    outputs = [np.concatenate([_run(s, n, b, p) for b in batches]) for s, n, p in zip(sessions, names, paths)]
    for path, out in zip(paths[1:], outputs[1:]):
        if out.shape != outputs[0].shape:
            raise UserError(f"{path}'s first output has shape {out.shape}, the float model's {outputs[0].shape}: "
                            "the models do not compute the same thing")
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
            accuracy = float(np.mean(top1.reshape(n, -1)[:, 0] == labels[:n]))
        agreement = float(np.mean(top1 == ref_top1)) if top1 is not None else float("nan")
        sqnr = sqnr_ref = None
        if i > 0:
            sqnr = _sqnr(ref, out)
            reference = _session(path, optimization="disable")
            sqnr_ref = _sqnr(ref, np.concatenate([_run(reference, names[i], b, path) for b in batches]).astype(np.float64))
        metrics.append(ModelMetrics(path, accuracy, agreement, sqnr, latencies[i], os.path.getsize(path),
                                    latencies[0] / latencies[i] if latencies[i] > 0 else float("nan"), sqnr_ref))
    return metrics


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - out)^2) in dB (inf when equal)."""
    noise = float(np.sum((ref - out) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))


def kernel_warnings(metrics: list[ModelMetrics]) -> list[str]:
    """One line per model whose deployed SQNR is more than KERNEL_LOSS_WARN_DB below its QDQ reference."""
    from .cpu import int8_path_text

    return [f"{m.path}: this CPU's integer kernels lose {m.kernel_loss_db:.1f} dB against the model's QDQ reference "
            f"({m.sqnr_db:.1f} vs {m.sqnr_reference_db:.1f} dB; {int8_path_text()}); quantize it with --target any"
            for m in metrics if m.kernel_loss_db is not None and np.isfinite(m.kernel_loss_db)
            and m.kernel_loss_db > KERNEL_LOSS_WARN_DB]


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
