"""Checks of the user's model before any work: external data (location, offsets, lengths), tensor
data sizes against dims and type, onnx's checker with strict shape inference, one onnxruntime run.

Each failure is a one-line UserError naming the user's file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from .errors import UserError


def check_tensor_sizes(model: onnx.ModelProto, name: str) -> None:
    """Every tensor's data must hold exactly what its dims and type say (neither onnx's checker
    nor its loader looks): a short or long tensor is refused here, naming it."""
    from onnx.external_data_helper import _get_all_tensors

    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        if any(d < 0 for d in tensor.dims):
            raise UserError(f"{name}: tensor {tensor.name!r} has negative dims {list(tensor.dims)}")
        expected = _fixed_bytes(tensor)
        if expected is None:
            continue
        if tensor.raw_data:
            got = len(tensor.raw_data)
        else:
            field = {onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.DOUBLE: "double_data",
                     onnx.TensorProto.INT64: "int64_data", onnx.TensorProto.UINT64: "uint64_data"}.get(tensor.data_type, "int32_data")
            count = len(getattr(tensor, field))
            if count == 0 and expected == 0:
                continue
            itemsize = expected // max(int(np.prod(tensor.dims, dtype=np.int64)), 1)
            if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
                count //= 2
            got = count * itemsize
        if got != expected:
            raise UserError(f"{name}: tensor {tensor.name!r} holds {got} bytes of data, its dims {list(tensor.dims)} "
                            f"and type need {expected}")


def _load_external_data(model: onnx.ModelProto, base: Path) -> None:
    """Load tensors stored outside the .onnx file, refusing locations outside the model's folder
    and offsets or lengths that do not fit the file or the tensor."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    root = base.resolve()
    for tensor in _get_all_tensors(model):
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f"external data of tensor {tensor.name!r} ({location!r})"
        target = (root / location).resolve()
        if not location or os.path.isabs(location) or (root not in target.parents and target != root):
            raise UserError(f"external data location {location!r} of tensor {tensor.name!r} points outside the model's folder")
        if not target.is_file():
            raise UserError(f"external data file {location!r} of tensor {tensor.name!r} not found next to the model")
        try:
            offset = int(info.get("offset", 0))
            size = os.path.getsize(target)
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError:
            raise UserError(f"{where}: offset and length must be integers") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise UserError(f"{where}: offset {offset} and length {length} do not fit the file's {size} bytes")
        expected = _fixed_bytes(tensor)
        if expected is not None and expected != length:
            raise UserError(f"{where}: {length} bytes stored, its dims {list(tensor.dims)} need {expected}")
        with open(target, "rb") as f:
            f.seek(offset)
            tensor.raw_data = f.read(length)
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _fixed_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of a tensor's raw data, for the fixed-size byte-aligned types (None otherwise)."""
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except Exception:
        return None
    if dtype.kind not in "fiubc" or tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return None
    if any(d < 0 for d in tensor.dims):
        return -1
    return int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize


def check_model(model: onnx.ModelProto, name: str = "the model") -> None:
    """onnx's checker, shape inference strict, on the user's model: a model that breaks the spec
    (wrong dims, types, dangling edges) is refused in one line instead of failing somewhere later.

    Large initializers are checked as graph inputs of their type and dims (what shape inference
    reads of them), so that no weight is serialised for it.
    """
    from . import graph as graph_module

    light = onnx.ModelProto()
    light.CopyFrom(model)
    graph = light.graph
    inputs = {v.name for v in graph.input}
    kept = []
    for t in graph.initializer:
        if t.ByteSize() > graph_module.STRIP_BYTES and t.data_location != onnx.TensorProto.EXTERNAL:
            if t.name not in inputs:
                graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            kept.append(t)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    light.ir_version = max(light.ir_version, 4)
    _infer_output_shapes(light)
    try:
        onnx.checker.check_model(light.SerializeToString(), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError and friends
        from .errors import first_line

        raise UserError(f"{name} is not a valid ONNX model: {first_line(exc)}") from None


def _infer_output_shapes(model: onnx.ModelProto) -> None:
    """Graph outputs declared without a shape (which onnx's checker requires of graph outputs, and onnxruntime
    does not) are checked as value_info of the same type: everything else about them is still checked."""
    missing = [o for o in model.graph.output if o.type.HasField("tensor_type") and not o.type.tensor_type.HasField("shape")]
    if not missing:
        return
    kept = [o for o in model.graph.output if o not in missing]
    model.graph.value_info.extend(missing)
    del model.graph.output[:]
    model.graph.output.extend(kept)


def check_runs(model: onnx.ModelProto, batch: dict, name: str = "the model", threads: int = 0) -> None:
    """Run the (normalised) float model once on a calibration batch: a model onnxruntime cannot
    run on the data is the input's problem, said in one line before any work."""
    import onnxruntime as ort

    from ._threads import session_options
    from .errors import first_line

    from .graph import serialize

    data = serialize(model)
    if data is None:
        return
    try:
        ort.InferenceSession(data, session_options(threads), providers=["CPUExecutionProvider"]).run(None, batch)
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise UserError(f"onnxruntime cannot run {name} on the calibration data: {first_line(exc)}") from None
