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
      GlobalAveragePool, Softmax. One quantized input is enough: a float operand made by an op
      with no integer kernel (the HardSigmoid of x * hardsigmoid(x), the Add-Clip-Div of a
      decomposed HardSwish) gets a QDQ pair of its own, as onnxruntime's quantizer does, so that
      only that op runs dequantize-op-quantize;
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

import onnx

from .choices import PLACEMENTS  # noqa: F401  (the choices: integer, minimal)
from .graph import GraphIndex
from .ops import Layer

REMOVABLE_ACTIVATIONS = ("Relu", "Clip")
# ops with a QLinear kernel: output range of their own; every activation input must be quantized
INTEGER_OPS = ("Add", "Mul", "Concat", "Sigmoid", "LeakyRelu", "AveragePool", "GlobalAveragePool", "Softmax")
# data movement run on the integer codes: outputs share input 0's quantization
PASSTHROUGH_OPS = ("MaxPool", "Resize", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split",
                   "Gather", "Expand", "Tile")


@dataclass(frozen=True)
class Placement:
    """calibrated: tensors whose range is calibrated on the float network. shared: tensor -> the
    calibrated tensor whose scale and zero point it takes (outputs of data-movement ops)."""

    calibrated: frozenset[str] = frozenset()
    shared: dict[str, str] = field(default_factory=dict)

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
    producer = {o: n for n in graph.node for o in n.output if o}
    for node in graph.node:  # topological: inputs are decided before their consumers
        data = [i for i in node.input if i and not index.is_constant(i)]
        if node.op_type in PASSTHROUGH_OPS and data and node.input[0] in chosen and not _skip_passthrough(node):
            root = shared.get(node.input[0], node.input[0])
            for out in node.output:
                if out and out not in index.graph_outputs:
                    shared[out] = root
                    chosen.add(out)
                    new[out] = node
        elif node.op_type in INTEGER_OPS and any(i in chosen for i in data) and len(data) == len(
                [i for i in node.input if i]):  # no constant operand: the QLinear kernel would need it quantized
            for i in data:  # a float operand (e.g. HardSigmoid's output in x * hardsigmoid(x)) gets a QDQ too
                if i not in chosen and i in producer and i not in index.graph_outputs:
                    chosen.add(i)
                    new[i] = producer[i]
            out = node.output[0]
            if out not in index.graph_outputs:
                chosen.add(out)
                new[out] = node
    # keep a new tensor only where it leads to a quantized layer's input (or to a tensor the minimal
    # placement quantizes anyway) through new tensors
    keep: set[str] = set()
    for node in reversed(graph.node):
        for out in node.output:
            if new.get(out) is node and (out in layer_inputs or out in base or any(
                    new.get(o) is c and o in keep for c in index.consumers.get(out, []) for o in c.output)):
                keep.add(out)
    # a tensor of the minimal placement made by a passthrough op stays quantized either way; it
    # takes the shared grid only when its source is quantized too
    shared = {t: s for t, s in shared.items() if t in keep}
    calibrated = (base - set(shared)) | {t for t in keep if t not in shared}
    return Placement(frozenset(calibrated), shared)


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
