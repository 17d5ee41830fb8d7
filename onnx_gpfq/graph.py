"""Stage 1: load an ONNX model and normalise its graph.

Normalising means: opset high enough for per-channel QDQ, constants folded into initializers and
BatchNormalization fused into the preceding Conv (onnxruntime's basic-level offline optimiser does
both), every node named, and the nodes in topological order. Nothing here knows about quantization.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .checks import _load_external_data, check_model, check_runs, check_tensor_sizes  # noqa: F401 (check_runs: quantize)
from .errors import UserError

MIN_OPSET = 13  # per-channel (axis) DequantizeLinear


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read a model from a path (external data included) or take a ModelProto as is."""
    if isinstance(source, onnx.ModelProto):
        return source
    path = Path(source)
    if not path.exists():
        raise UserError(f"model file not found: {path}")
    if not path.is_file():
        raise UserError(f"model path is not a file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for garbage and truncated files
        raise UserError(f"{path} is not a valid ONNX model (cannot parse it: {type(exc).__name__})") from None
    if not model.graph.node:
        raise UserError(f"{path} is not a valid ONNX model (its graph has no nodes)")
    _load_external_data(model, path.parent)
    check_tensor_sizes(model, str(path))
    return model


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose top-level Constant nodes holding a tensor are initializers (what onnxruntime's
    optimiser does), so that readers of quantization parameters find them in one place."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None and len(node.output) == 1:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return copy


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def normalise(model: onnx.ModelProto, min_opset: int = MIN_OPSET, source: str | os.PathLike | None = None) -> onnx.ModelProto:
    """Return a normalised copy of ``model`` (the input is never modified), at opset >= min_opset.
    ``source``: the user's file, named in error messages (default: "the model")."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    model = copy
    # Old exports (IR < 4) list weights as graph inputs too; an input can be overridden at run
    # time, so no optimiser treats it as constant. A quantized model fixes its weights: drop them.
    inits = {t.name for t in model.graph.initializer}
    if any(i.name in inits for i in model.graph.input):
        kept = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.ir_version = max(model.ir_version, 4)
    _float16_to_float32(model)
    if opset_version(model) < min_opset:
        try:
            model = _without_weights(model, lambda m: onnx.version_converter.convert_version(m, min_opset))
        except Exception as exc:
            raise UserError(f"cannot upgrade the model from opset {opset_version(model)} to {min_opset}: {exc}") from None
    model = _ort_basic_optimise(model, str(source) if source is not None else "the model")
    _name_nodes(model.graph)
    check_model(model, str(source) if source is not None else "the model")  # after the upgrade: at opset >= 13
    try:
        model = _without_weights(model, onnx.shape_inference.infer_shapes)
    except Exception:
        pass  # shapes are only a convenience: capture reads real tensors
    return model


STRIP_BYTES = 4096  # initializers larger than this travel around onnx's converter and shape inference


def _without_weights(model: onnx.ModelProto, transform) -> onnx.ModelProto:
    """``transform(model)`` (onnx.version_converter / onnx.shape_inference) without sending the
    weights through it.

    Both serialise the model, work on a C++ copy and parse the result back: about six times the
    model's size in memory (900 MiB for a 100 MB ResNet-50) and most of their time. They rewrite
    nodes and read small constant inputs (shapes, scales, pads), never the values of large
    weights, so initializers over STRIP_BYTES go through without their data and get it back
    afterwards. If any of them did not come out under its name with its dims and type, the whole
    model is transformed the plain way instead.
    """
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    meta = {}
    for t in stripped.graph.initializer:
        if t.ByteSize() > STRIP_BYTES and t.data_location != onnx.TensorProto.EXTERNAL:
            meta[t.name] = (tuple(t.dims), t.data_type)
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                t.ClearField(field)
    if not meta:
        return transform(model)
    result = transform(stripped)
    del stripped
    out = {t.name: t for t in result.graph.initializer if t.name in meta}
    if set(out) != set(meta) or any((tuple(t.dims), t.data_type) != meta[name] for name, t in out.items()):
        return transform(model)
    for t in model.graph.initializer:
        if t.name in out:
            out[t.name].CopyFrom(t)
    return result


# float16 and float64 models compute in float32 inside (the quantized kernels are float32 / int8)
LOW = (onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def _float16_to_float32(model: onnx.ModelProto) -> None:
    """Compute in float32 inside a float16 (or float64) model, keeping its inputs and outputs.

    float16/float64 initializers, Constant values and Cast targets become float32; each such graph
    input gets a Cast to float32 and each such graph output a Cast back, so the model's interface
    (what callers feed and read) does not change.
    """
    F32 = onnx.TensorProto.FLOAT
    graph = model.graph
    io = [v for v in list(graph.input) + list(graph.output) if v.type.tensor_type.elem_type in LOW]
    if not io and not any(t.data_type in LOW for t in graph.initializer) and not _has_f16_nodes(graph):
        return
    _convert_graph_f16(graph)
    del graph.value_info[:]
    casts_in, casts_out = [], []
    for value in graph.input:
        if value.type.tensor_type.elem_type in LOW:
            inner = f"{value.name}_float32"
            _rename_uses(graph, value.name, inner)
            casts_in.append(onnx.helper.make_node("Cast", [value.name], [inner], name=f"{value.name}_to_float32", to=F32))
    for value in graph.output:
        kind = value.type.tensor_type.elem_type
        if kind in LOW:
            inner = f"{value.name}_float32"
            _rename_uses(graph, value.name, inner, outputs_too=True)
            back = "float16" if kind == onnx.TensorProto.FLOAT16 else "float64"
            casts_out.append(onnx.helper.make_node("Cast", [inner], [value.name], name=f"{value.name}_to_{back}", to=kind))
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)


def _has_f16_nodes(graph: onnx.GraphProto) -> bool:
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in LOW:
                return True
            if node.op_type == "Cast" and attr.name == "to" and attr.i in LOW:
                return True
    return False


def _convert_graph_f16(graph: onnx.GraphProto) -> None:
    F32 = onnx.TensorProto.FLOAT
    for i, t in enumerate(graph.initializer):
        if t.data_type in LOW:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in LOW:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
            elif node.op_type in ("Cast", "CastLike") and attr.name == "to" and attr.i in LOW:
                attr.i = F32
            for sub in _subgraphs(attr):
                _convert_graph_f16(sub)
                for v in list(sub.input) + list(sub.output):
                    if v.type.tensor_type.elem_type in LOW:
                        v.type.tensor_type.elem_type = F32
                del sub.value_info[:]


def _rename_uses(graph: onnx.GraphProto, old: str, new: str, outputs_too: bool = False) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        if outputs_too:
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new
        for attr in node.attribute:
            for sub in _subgraphs(attr):  # outer-scope reads inside control-flow bodies
                _rename_uses(sub, old, new)


def _ort_basic_optimise(model: onnx.ModelProto, name: str = "the model") -> onnx.ModelProto:
    """Constant folding, Constant nodes -> initializers, Conv+BatchNormalization fusion."""
    from . import runtime

    with tempfile.TemporaryDirectory(prefix="onnx_gpfq_") as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        data = serialize(model)
        big = data is None
        if big:
            onnx.save(model, src, save_as_external_data=True, location="in.onnx.data")
        else:
            with open(src, "wb") as f:
                f.write(data)
            del data
        config = {"session.optimized_model_external_initializers_file_name": "out.onnx.data",
                  "session.optimized_model_external_initializers_min_size_in_bytes": "1024"} if big else None
        try:
            runtime.session(src, optimization="basic", spinning=True, optimized_model_path=dst, config=config)
        except Exception as exc:
            from .errors import first_line

            raise UserError(f"onnxruntime cannot load {name}: {first_line(exc, {tmp: name, src: name})}") from None
        optimised = onnx.load(dst)
    # onnxruntime drops the model-level metadata it does not use: keep the user's.
    optimised.producer_name, optimised.producer_version = model.producer_name, model.producer_version
    optimised.ir_version = max(optimised.ir_version, model.ir_version)
    del optimised.metadata_props[:]
    optimised.metadata_props.extend(model.metadata_props)
    return optimised


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Give every unnamed node a unique name (reports and --exclude refer to nodes by name)."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


class GraphIndex:
    """Read-only lookups over a graph: initializers, producers and consumers of each tensor."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer = producers(graph.node)
        self.consumers = consumers(graph.node)
        self.graph_outputs = {o.name for o in graph.output}

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def is_constant(self, name: str) -> bool:
        return name in self.initializers


def producers(nodes: Iterable[onnx.NodeProto]) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {name: node for node in nodes for name in node.output if name}


def consumers(nodes: Iterable[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it (once per input slot, subgraph reads included), in order."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node_inputs(node):
            found.setdefault(name, []).append(node)
    return found


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs and the outer-scope names its subgraphs use."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        for sub in _subgraphs(attr):
            names.extend(n for n in _outer_names(sub) if n not in names)
    return names


def _subgraphs(attr: onnx.AttributeProto) -> Iterable[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == onnx.AttributeProto.GRAPHS:
        yield from attr.graphs


def _outer_names(graph: onnx.GraphProto) -> list[str]:
    """Names a subgraph reads from the enclosing scope."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        local.update(node.output)
    outer: list[str] = []
    for node in graph.node:
        for name in node_inputs(node):
            if name not in local and name not in outer:
                outer.append(name)
    for out in graph.output:
        if out.name not in local and out.name not in outer:
            outer.append(out.name)
    return outer


PROTOBUF_LIMIT = 2**31 - 2**24  # a serialised ModelProto must stay under 2 GiB; keep a margin


def serialize(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None when it cannot be one protobuf (over 2 GiB: save it with
    external data). One serialisation: protobuf's ByteSize costs as much as serialising."""
    if sum(len(t.raw_data) for t in model.graph.initializer) > PROTOBUF_LIMIT:
        return None  # no 2 GiB string just to find that out
    try:
        data = model.SerializeToString()
    except ValueError:  # protobuf refuses messages over 2 GiB
        return None
    return data if len(data) <= PROTOBUF_LIMIT else None


# writing lives in outputs.py; these names stay importable from here
from .outputs import check_output_path, save_model, write_outputs, write_text  # noqa: E402,F401
