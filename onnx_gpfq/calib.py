"""Calibration data: read it from what the user has, check it against the model's inputs, batch it.

Sources: a ``.npz`` path (one array per model input, named after it, samples along axis 0); any
iterable of ``{input_name: array}`` dicts (each one batch); any object with onnxruntime's
``CalibrationDataReader`` interface (``get_next()`` returning a dict, or None at the end).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import UserError

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype, and dims (int when fixed, None when symbolic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def load_batches(source, inputs: list[InputSpec], batch_size: int) -> list[Batch]:
    """Read, validate and batch calibration data. Raises UserError naming the offending input."""
    if isinstance(source, (str, os.PathLike)):
        arrays = _read_npz(Path(source))
        batches = _split(arrays, inputs, batch_size, str(source))
    elif hasattr(source, "get_next"):
        batches = []
        while (item := source.get_next()) is not None:
            batches.append(dict(item))
    elif isinstance(source, dict):
        batches = _split({k: np.asarray(v) for k, v in source.items()}, inputs, batch_size, "calibration dict")
    elif isinstance(source, Iterable):
        batches = [dict(item) for item in source]
    else:
        raise UserError(f"unsupported calibration source of type {type(source).__name__}")
    if not batches:
        raise UserError("calibration data is empty: give at least one sample")
    return [_check_batch(b, inputs, i) for i, b in enumerate(batches)]


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise UserError(f"calibration file not found: {path}")
    if path.suffix != ".npz":
        raise UserError(f"calibration file must be a .npz archive (got {path})")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"cannot read calibration file {path}: {exc}") from None


def _split(arrays: dict[str, np.ndarray], inputs: list[InputSpec], batch_size: int, where: str) -> list[Batch]:
    for spec in inputs:
        if spec.name not in arrays:
            found = ", ".join(sorted(arrays)) or "nothing"
            raise UserError(f"{where} has no array for model input {spec.name!r} (found: {found})")
    counts = {spec.name: arrays[spec.name].shape[0] if arrays[spec.name].ndim else 0 for spec in inputs}
    n = min(counts.values())
    if n == 0:
        raise UserError(f"{where} holds no samples for input {min(counts, key=counts.get)!r}")
    if len(set(counts.values())) > 1:
        raise UserError(f"{where}: inputs have different sample counts {counts}")
    fixed = {spec.dims[0] for spec in inputs if spec.dims and spec.dims[0] is not None}
    if fixed:  # a fixed leading dim (often 1): feed batches of exactly that size
        batch_size = fixed.pop()
        n -= n % batch_size
        if n == 0:
            raise UserError(f"{where}: the model takes batches of {batch_size} but fewer samples were given")
    return [{spec.name: arrays[spec.name][i:i + batch_size] for spec in inputs} for i in range(0, n, batch_size)]


def _check_batch(batch: Batch, inputs: list[InputSpec], index: int) -> Batch:
    out: Batch = {}
    for spec in inputs:
        if spec.name not in batch:
            raise UserError(f"calibration batch {index} has no value for model input {spec.name!r}")
        array = np.asarray(batch[spec.name])
        if array.dtype != spec.dtype:
            if array.dtype.kind == spec.dtype.kind == "f" or (array.dtype.kind in "iu" and spec.dtype.kind in "iu"):
                array = array.astype(spec.dtype)
            else:
                raise UserError(f"calibration input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}")
        if spec.dims and array.ndim != len(spec.dims):
            raise UserError(f"calibration input {spec.name!r} has rank {array.ndim} (shape {array.shape}), the model expects rank {len(spec.dims)}")
        for axis, (got, want) in enumerate(zip(array.shape, spec.dims)):
            if want is not None and got != want:
                raise UserError(f"calibration input {spec.name!r} has shape {array.shape}, the model expects {_dims_text(spec.dims)} (axis {axis})")
        if array.size == 0:
            raise UserError(f"calibration input {spec.name!r} is empty (shape {array.shape})")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise UserError(f"calibration input {spec.name!r} contains NaN or Inf values")
        out[spec.name] = np.ascontiguousarray(array)
    return out


def _dims_text(dims: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"
