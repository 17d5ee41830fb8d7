"""Stage 2: find the layers to quantize; each op type's knowledge lives in one module.

``OPS`` maps an op type to its ``Layer`` class (the protocol in ``base``). Adding an op type means
adding one module with its class and one line here; nothing else in the pipeline names op types.
The class implements ``parse``, ``channel_axis``, ``fan_in``, ``to_matrix`` / ``from_matrix``,
``rows_per_sample`` and ``rows``, and overrides the defaults where the op differs (``samples``,
``patch_key``, ``fan_in_axis``, ``integer_bias``, ``bias_correction``, ``emit``, ``kernel_order``,
``BIAS_INPUT``, ``QUANTIZE_OUTPUT``); tests/test_targets.py checks it against onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..graph import GraphIndex
from .base import Layer
from .conv import Conv
from .conv_transpose import ConvTranspose
from .gemm import Gemm
from .matmul import MatMul

OPS: dict[str, type[Layer]] = {
    "Conv": Conv,
    "ConvTranspose": ConvTranspose,
    "Gemm": Gemm,
    "MatMul": MatMul,
}

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


@dataclass(frozen=True)
class Skipped:
    """A node of a target op type left in float, and why."""

    node: str
    op_type: str
    reason: str


def find_targets(graph: onnx.GraphProto) -> tuple[list[Layer], list[Skipped]]:
    """All quantizable layers of a (normalised, topologically sorted) graph, in topological order."""
    index = GraphIndex(graph)
    targets: list[Layer] = []
    skipped: list[Skipped] = []
    for node in graph.node:
        if node.op_type not in OPS:
            for inner in _subgraph_layers(node):
                skipped.append(Skipped(inner.name or f"{inner.op_type} in {node.name}", inner.op_type,
                                       f"inside the body of {node.op_type} node {node.name!r}: layers in control-flow "
                                       "subgraphs are left in float"))
            continue
        result = _target(node, index)
        if isinstance(result, str):
            skipped.append(Skipped(node.name, node.op_type, result))
        else:
            targets.append(result)
    return targets, skipped


def _subgraph_layers(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Nodes of a target op type inside a node's subgraphs (If branches, Loop/Scan bodies), recursively."""
    found = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            for inner in sub.node:
                if inner.op_type in OPS:
                    found.append(inner)
                found.extend(_subgraph_layers(inner))
    return found


def _target(node: onnx.NodeProto, index: GraphIndex) -> Layer | str:
    """A target, or the reason the node stays in float: the checks every op shares, then its own."""
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain {node.domain!r}"
    cls = OPS[node.op_type]
    inputs = list(node.input) + [""] * 3
    x, w = inputs[0], inputs[cls.WEIGHT_INPUT]
    if not w or not index.is_constant(w):
        if x and index.is_constant(x):
            return "the constant operand is the first input (only weight-as-second-input is supported)"
        return "no constant weight (both operands are activations)"
    if index.is_constant(x):
        return "both operands are constant"
    weight = index.initializers[w]
    if weight.data_type not in FLOAT_TYPES:
        return f"weight {w!r} is not floating point"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return cls.parse(node, index, tuple(int(d) for d in weight.dims), attrs)
