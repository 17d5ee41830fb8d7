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
from .gru import GRU
from .lstm import LSTM
from .matmul import MatMul
from .matmul_left import MatMulLeft
from .rnn import RNN

OPS: dict[str, type[Layer]] = {
    "Conv": Conv,
    "ConvTranspose": ConvTranspose,
    "Gemm": Gemm,
    "MatMul": MatMul,
    "LSTM": LSTM,
    "GRU": GRU,
    "RNN": RNN,
}

# The layer class of an op whose constant is its first operand (the second an activation).
CONSTANT_FIRST: dict[str, type[Layer]] = {"MatMul": MatMulLeft}

FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)

# Ops that carry weights besides the registered ones: listed in the report when left in float, and
# counted in the model's weight bytes (see ``weight_inputs``).
OTHER_WEIGHT_OPS = ("LSTM", "GRU", "RNN", "Attention", "QAttention", "Einsum", "DeformConv")
# Inputs that are weights (not biases, states or lengths) for ops whose biases are 2-D.
WEIGHT_SLOTS = {"LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}


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
        for inner in _subgraph_layers(node):
            skipped.append(Skipped(inner.name or f"{inner.op_type} in {node.name}", inner.op_type,
                                   f"inside the body of {node.op_type} node {node.name!r}: layers in control-flow "
                                   "subgraphs are left in float (--fix-input can inline a branch)"))
        if node.op_type not in OPS:
            if node.op_type in OTHER_WEIGHT_OPS and weight_inputs(node, index.initializers):
                skipped.append(Skipped(node.name, node.op_type, f"{node.op_type} weights are not quantized "
                                                                f"(no {node.op_type} module in onnx_gpfq.ops)"))
            continue
        result = _target(node, index)
        for r in result if isinstance(result, list) else [result]:
            if isinstance(r, str):
                skipped.append(Skipped(node.name, node.op_type, r))
            else:
                targets.append(r)
    return targets, skipped


def _is_weight_op(node: onnx.NodeProto) -> bool:
    return node.op_type in OPS or node.op_type in OTHER_WEIGHT_OPS


def _subgraph_layers(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Weight-carrying nodes inside a node's subgraphs (If branches, Loop/Scan bodies), recursively."""
    found = []
    for sub in _subgraphs(node):
        for inner in sub.node:
            if _is_weight_op(inner):
                found.append(inner)
            found.extend(_subgraph_layers(inner))
    return found


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for attr in node.attribute
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs))]


def weight_inputs(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[str]:
    """The float initializers ``node`` reads as weights: the slots in ``WEIGHT_SLOTS`` for the
    recurrent ops, otherwise every float initializer of rank >= 2 that is not the registered
    op's bias input. Only weight-carrying ops (registered, or in ``OTHER_WEIGHT_OPS``) have any."""
    if not _is_weight_op(node):
        return []
    bias = OPS[node.op_type].BIAS_INPUT if node.op_type in OPS else None
    slots = WEIGHT_SLOTS.get(node.op_type, range(len(node.input)))
    found = []
    for i in slots:
        name = node.input[i] if i < len(node.input) else ""
        t = inits.get(name)
        if t is not None and t.data_type in FLOAT_TYPES and i != bias and (len(t.dims) >= 2 or node.op_type in WEIGHT_SLOTS):
            found.append(name)
    return found


def model_weight_bytes(graph: onnx.GraphProto) -> dict[str, int]:
    """The model's weight bytes: name -> bytes of every float initializer a weight-carrying op
    reads as a weight (``weight_inputs``), in the main graph and in every subgraph (where a name
    may refer to an initializer of an enclosing graph). Biases, normalisation parameters,
    embedding tables read by Gather and other constants are not weights here. Each tensor counts once.
    This is the denominator of the report's quantized-weight fraction."""
    found: dict[str, int] = {}

    def visit(g: onnx.GraphProto, outer: dict[str, onnx.TensorProto]) -> None:
        inits = {**outer, **{t.name: t for t in g.initializer}}
        for node in g.node:
            for name in weight_inputs(node, inits):
                found.setdefault(name, tensor_bytes(inits[name]))
            for sub in _subgraphs(node):
                visit(sub, inits)

    visit(graph, {})
    return found


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's values in its own dtype."""
    import numpy as np

    return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _target(node: onnx.NodeProto, index: GraphIndex) -> Layer | str:
    """A target, or the reason the node stays in float: the checks every op shares, then its own."""
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain {node.domain!r}"
    cls = OPS[node.op_type]
    inputs = list(node.input) + [""] * 3
    x, w = inputs[0], inputs[cls.WEIGHT_INPUT]
    if not w or not index.is_constant(w):
        if x and index.is_constant(x) and node.op_type in CONSTANT_FIRST and w:
            cls, (w, x) = CONSTANT_FIRST[node.op_type], (x, w)
        elif x and index.is_constant(x):
            return "the constant operand is the first input (only weight-as-second-input is supported)"
        else:
            return "no constant weight (both operands are activations)"
    if index.is_constant(x):
        return "both operands are constant"
    weight = index.initializers[w]
    if weight.data_type not in FLOAT_TYPES:
        return f"weight {w!r} is not floating point"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return cls.parse(node, index, tuple(int(d) for d in weight.dims), attrs)
