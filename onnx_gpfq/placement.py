"""Which activation tensors get QuantizeLinear/DequantizeLinear (the placement rule).

Two placements (``Options.act_placement``, --act-placement):

- ``minimal``: the input of every quantized layer, the output of every Conv (after a Relu/Clip chain
  only it feeds) and the output of an Add joining two quantized tensors. Between layers everything
  else runs in float (dequantize -> op -> quantize).
- ``integer`` (the default): also the ops that onnxruntime's CPU optimiser turns into integer
  kernels when QDQ wraps them, wherever all their activation inputs are already quantized, so that
  execution stays in uint8 from one layer to the next:
    * QLinear kernels with their own output range (calibrated like any other tensor): Add, Mul
      (QLinearAdd/QLinearMul), Concat (QLinearConcat), Sigmoid, LeakyRelu, AveragePool,
      GlobalAveragePool, Softmax. A Concat's input that only the Concat reads is written on the
      Concat's output grid (``Placement.shared``), so that QLinearConcat copies it instead of
      rounding it a second time. One quantized input is enough: a float operand made by an op
      with no integer kernel gets a QDQ pair of its own, as onnxruntime's quantizer does, so that
      only that op runs dequantize-op-quantize; a HardSigmoid of a quantized tensor (the
      x * hardsigmoid(x) of hard swish) instead runs as a Clip on its input's codes
      (``Placement.on_codes``, module ``on_codes``) where its input's grid allows it;
    * a constant operand of Add or Mul (the + 3 of a decomposed HardSwish x * Clip(x + 3, 0, 6) / 6)
      is stored as 8-bit codes read through DequantizeLinear (``Placement.constants``), as
      onnxruntime's quantizer stores it, so that the op runs as QLinearAdd/QLinearMul. Scalars
      only: one 8-bit grid holds a scalar to about 1e-7, not a per-channel tensor of spread
      values. Those nodes read a copy (other readers keep the float value). Their outputs go after a Relu/Clip chain only they feed (the Clip folds into the
      uint8 range, as after a Conv). A Div by a constant (no integer kernel) becomes a Mul by the
      constant's float32 reciprocal (``Placement.products``, ``prepare``): x * (1 / c) may differ
      from x / c in the last bit of float32, far below one 8-bit step of the output;
    * data movement (its QDQ pair dropped by onnxruntime, the op run on uint8): MaxPool, Resize,
      Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Slice, Split, Gather, Expand, Tile. Their
      outputs take the input's scale and zero point (``Placement.shared``): onnxruntime drops the
      pair only when both are equal, and on values already on that grid the pair changes nothing.
  Such an op's output is quantized only where it leads on to a quantized layer's input through ops
  of this kind (a region between layers); outputs that only reach float ops or the model's outputs
  (detection heads, box decoding, attention scores) stay float, as in ``minimal``.

With 16-bit activations the pipeline uses ``minimal``: those QLinear kernels are 8-bit only.

Nothing else is quantized: attention masks, normalisation statistics and the model outputs of
MatMul/Gemm heads stay float.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .choices import PLACEMENTS  # noqa: F401  (the choices: integer, minimal)
from .graph import GraphIndex
from .on_codes import CodeClip, hardsigmoid_params
from .ops import Layer

REMOVABLE_ACTIVATIONS = ("Relu", "Clip")
# ops with a QLinear kernel: output range of their own; every activation input must be quantized
INTEGER_OPS = ("Add", "Mul", "Div", "Concat", "Sigmoid", "LeakyRelu", "AveragePool", "GlobalAveragePool", "Softmax")
# ops whose scalar constant operand is stored as 8-bit codes (Div: as a Mul by the reciprocal)
CONSTANT_OPERAND_OPS = ("Add", "Mul", "Div")
# data movement run on the integer codes: outputs share input 0's quantization
PASSTHROUGH_OPS = ("MaxPool", "Resize", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split",
                   "Gather", "Expand", "Tile")


@dataclass(frozen=True)
class Placement:
    """calibrated: tensors whose range is calibrated on the float network. shared: tensor -> the
    calibrated tensor whose scale and zero point it takes (outputs of data-movement ops; inputs that
    only a Concat reads, whose output comes later in the graph). constants:
    initializers quantized over their own values, read by the ``operand_nodes`` (after ``prepare``)."""

    calibrated: frozenset[str] = frozenset()
    shared: dict[str, str] = field(default_factory=dict)
    constants: frozenset[str] = frozenset()  # initializers stored as 8-bit codes (the copies ``prepare`` writes)
    operand_nodes: frozenset[str] = frozenset()  # Add / Mul / Div nodes (by name) with such an operand
    products: frozenset[str] = frozenset()  # the Div nodes among them: a Mul by the reciprocal
    on_codes: dict[str, CodeClip] = field(default_factory=dict)  # calibrated tensors that may run on codes

    @property
    def tensors(self) -> frozenset[str]:
        """Every tensor that gets a QDQ pair."""
        return self.calibrated | frozenset(self.shared)


def place(graph: onnx.GraphProto, targets: list[Layer], weight_only: set[str] = frozenset(),
          placement: str = "integer") -> Placement:
    """The activation tensors of ``graph`` to quantize for the quantized layers ``targets``.

    weight_only: node names of layers that read their input in float (block-wise, MatMulNBits, no
    int8 kernel). placement: "integer" or "minimal" (see the module docstring).
    """
    index = GraphIndex(graph)
    base = _minimal(graph, index, targets, weight_only)
    if placement == "minimal":
        return Placement(frozenset(base))
    layer_inputs = {t.x for t in targets if t.node not in weight_only and not index.is_constant(t.x)}
    chosen, shared, new = set(base), {}, {}  # new: tensor -> the node that makes it (integer or passthrough)
    operands: dict[str, list[str]] = {}  # integer node name -> its constant operands
    producer = {o: n for n in graph.node for o in n.output if o}
    for node in graph.node:  # topological: inputs are decided before their consumers
        data = [i for i in node.input if i and not index.is_constant(i)]
        consts = [i for i in node.input if i and index.is_constant(i)]
        if node.op_type in PASSTHROUGH_OPS and data and node.input[0] in chosen and not _skip_passthrough(node):
            root = shared.get(node.input[0], node.input[0])
            for out in node.output:
                if out and out not in index.graph_outputs:
                    shared[out] = root
                    chosen.add(out)
                    new[out] = node
        elif node.op_type in INTEGER_OPS and any(i in chosen for i in data) and (
                _quantizable_operand(node, index) if consts or node.op_type == "Div" else True):
            for i in data:  # a float operand (e.g. HardSigmoid's output in x * hardsigmoid(x)) gets a QDQ too
                if i not in chosen and i in producer and i not in index.graph_outputs:
                    chosen.add(i)
                    new[i] = producer[i]
            out = after_activations(index, node.output[0]) if consts else node.output[0]
            if out not in index.graph_outputs:
                chosen.add(out)
                new[out] = node
                if consts:
                    operands[node.name] = consts
    # keep a new tensor only where it leads to a quantized layer's input (or to a tensor the minimal
    # placement quantizes anyway) through new tensors (in reverse topological order of the nodes that
    # write them: consumers are decided first)
    made: dict[str, list[str]] = {}  # node name -> the new tensors it makes (an Add's: after its Clip)
    for tensor, node in new.items():
        made.setdefault(node.name, []).append(tensor)
    keep: set[str] = set()
    for node in reversed(graph.node):
        for out in node.output:
            if out in new and (out in layer_inputs or out in base or any(
                    o in keep for c in index.consumers.get(out, []) for o in made.get(c.name, []))):
                keep.add(out)
    operands = {n: c for n, c in operands.items() if n in {new[t].name for t in keep}}
    products = frozenset(n.name for n in graph.node if n.name in operands and n.op_type == "Div")
    constants = frozenset(operand_name(c, n in products) for n, cs in operands.items() for c in cs)
    # a tensor of the minimal placement made by a passthrough op stays quantized either way; it
    # takes the shared grid only when its source is quantized too
    shared = {t: s for t, s in shared.items() if t in keep}
    calibrated = (base - set(shared)) | {t for t in keep if t not in shared}
    codes = _on_codes(graph, calibrated, index)
    for tensor, root in _concat_inputs(graph, index, calibrated, shared, codes).items():
        shared[tensor] = root
        calibrated.discard(tensor)
    return Placement(frozenset(calibrated), shared, constants, frozenset(operands), products, codes)


def _concat_inputs(graph: onnx.GraphProto, index: GraphIndex, calibrated: set[str], shared: dict[str, str],
                   codes: dict[str, CodeClip]) -> dict[str, str]:
    """Calibrated inputs of a quantized Concat that only the Concat reads -> the calibrated tensor whose
    grid the Concat's output has. onnxruntime's QLinearConcat copies an input on the output's scale and
    zero point and maps any other through a table (one more rounding, slower); the op that makes such
    an input requantizes anyway, so it writes the output's grid directly: one rounding instead of two,
    nothing lost (no other reader sees the input). Nested Concats resolve to the outermost one."""
    found: dict[str, str] = {}
    sources = {c.source for c in codes.values()}
    for node in reversed(graph.node):  # outer Concats first: an inner one's output may take their grid
        out = node.output[0] if node.op_type == "Concat" and node.output else ""
        root = found.get(out) or shared.get(out) or (out if out in calibrated else None)
        if root is None:
            continue
        for x in node.input:
            if (x in calibrated and x not in codes and x not in sources and x not in index.graph_outputs
                    and all(c.output[:1] == node.output[:1] for c in index.consumers.get(x, []))):
                found[x] = root
    return found


def _on_codes(graph: onnx.GraphProto, calibrated: set[str], index: GraphIndex) -> dict[str, CodeClip]:
    """HardSigmoid outputs that may be computed on the codes of their quantized input (``on_codes``):
    both tensors calibrated, one such reader per input (its grid is moved for it)."""
    found: dict[str, CodeClip] = {}
    sources: set[str] = set()
    for node in graph.node:
        if node.op_type != "HardSigmoid" or node.domain not in ("", "ai.onnx"):
            continue
        x, h = node.input[0], node.output[0]
        if x in calibrated and h in calibrated and x not in sources and h not in index.graph_outputs:
            alpha, beta = hardsigmoid_params(node)
            if alpha > 0:
                found[h] = CodeClip(x, alpha, beta)
                sources.add(x)
    return found


def operand_name(constant: str, reciprocal: bool = False) -> str:
    """The initializer ``prepare`` writes for an integer node's constant operand: a copy (other readers
    keep the float original), or 1 / constant for a Div."""
    return f"{constant}_reciprocal" if reciprocal else f"{constant}_operand"


def prepare(graph: onnx.GraphProto, placement: Placement) -> None:
    """The graph edits the placement asks for, in place (node names and outputs unchanged): each node
    of ``placement.operand_nodes`` reads a copy of its constant operand (``operand_name``), the one
    stored as 8-bit codes, and a Div of ``placement.products`` becomes a Mul by the float32
    reciprocal of its divisor (onnxruntime has no integer Div; QLinearMul computes x * (1 / c))."""
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.name not in placement.operand_nodes:
            continue
        k = 1 if node.input[1] in inits else 0
        reciprocal = node.name in placement.products
        source = node.input[k]
        name = operand_name(source, reciprocal)
        if name not in inits:
            values = numpy_helper.to_array(inits[source]).astype(np.float32)
            values = (np.float32(1) / values).astype(np.float32) if reciprocal else values
            inits[name] = numpy_helper.from_array(values, name)
            graph.initializer.append(inits[name])
        node.input[k] = name
        if reciprocal:
            node.op_type = "Mul"


def _quantizable_operand(node: onnx.NodeProto, index: GraphIndex) -> bool:
    """Add / Mul (or Div by a constant) with one activation input and one finite float32 scalar
    constant (a Div's divisor: non-zero)."""
    if len(node.input) != 2 or node.op_type not in CONSTANT_OPERAND_OPS:
        return False
    k = 1 if index.is_constant(node.input[1]) else 0
    if index.is_constant(node.input[1 - k]) or (node.op_type == "Div" and k != 1):
        return False
    init = index.initializers[node.input[k]]
    if init.data_type != onnx.TensorProto.FLOAT:
        return False
    values = numpy_helper.to_array(init)
    return bool(values.size == 1 and np.isfinite(values).all() and (node.op_type != "Div" or (values != 0).all()))


def after_activations(index: GraphIndex, out: str) -> str:
    """Where a layer's output QDQ sits: ``out`` after a chain of Relu/Clip that only it feeds (not past
    a graph output), so that onnxruntime folds the chain into the QLinear kernel's uint8 range."""
    while out not in index.graph_outputs:
        consumers = index.consumers.get(out, [])
        if len(consumers) == 1 and consumers[0].op_type in REMOVABLE_ACTIVATIONS:
            out = consumers[0].output[0]
        else:
            break
    return out


def _skip_passthrough(node: onnx.NodeProto) -> bool:
    """MaxPool with an indices output has no integer form."""
    return node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1


def _minimal(graph: onnx.GraphProto, index: GraphIndex, targets: list[Layer], weight_only: set[str]) -> set[str]:
    """The ``minimal`` placement:

    - the input of every quantized layer (what makes its kernel integer on the input side),
      except the ``weight_only`` ones (node names: block-wise and MatMulNBits layers);
    - the output of every quantized layer whose op asks for it (``Layer.QUANTIZE_OUTPUT``: Conv),
      taken after a chain of Relu/Clip that only it feeds, so that onnxruntime fuses
      DQ -> Conv -> (Relu) -> Q into QLinearConv (Relu/Clip fold into the uint8 range);
    - the output of an Add whose inputs are both quantized (a residual join), again after Relu/Clip,
      so that it runs as QLinearAdd instead of dequantize-add-quantize.
    """

    chosen: set[str] = set()
    output_quantized = {t.node for t in targets if t.QUANTIZE_OUTPUT}
    for t in targets:
        if not index.is_constant(t.x) and t.node not in weight_only:
            chosen.add(t.x)
    for node in graph.node:  # topological order, so Add inputs are decided before the Add
        if node.name in output_quantized:
            chosen.add(after_activations(index, node.output[0]))
        elif node.op_type == "Add" and all(i in chosen for i in node.input):
            chosen.add(after_activations(index, node.output[0]))
    return chosen
