"""Per-layer planning: the core's spec and the weight format of each target, checked before any
calibration work, and what the formats chosen need from the model (opset, operator domains)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx

from . import cpu
from .core import DEFAULT_C_GRID, QuantSpec
from .formats import FORMATS, RECURRENT_FORMATS, WeightFormat
from .ops import Layer
from .options import Options

BLOCKWISE_OPSET = 21  # block-wise DequantizeLinear, 16-bit QuantizeLinear


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is quantized (the core's spec) and stored (its weight format)."""

    spec: QuantSpec
    fmt: WeightFormat

    @property
    def block_size(self) -> int:
        """Block length along the fan-in for block-wise scales, 0 otherwise."""
        return self.spec.group_size if self.spec.granularity == "block" else 0

    @property
    def weight_only(self) -> bool:
        """The layer's input stays float (see ``rewrite.QuantizedLayer.weight_only``)."""
        return self.fmt.weight_only or self.spec.granularity == "block"


def plan_layer(t: Layer, options: Options) -> LayerPlan:
    """The spec and format of one layer, with the format's constraints checked (UserError)."""
    fmt = FORMATS[options.weight_format].for_layer(t)
    if t.DEPLOYED_FORMAT is not None and options.recurrent_format != "qdq":  # LSTM / GRU / RNN
        fmt = RECURRENT_FORMATS[recurrent_format(t, options)].for_layer(t)
    layer = fmt.check(t, options.layer(t.node, t.op_type))
    plan = LayerPlan(fmt.adjust_spec(t, options.spec(layer, use_blocks=t.fan_in_axis is not None)), fmt)
    return _bounded_for_target(t, plan, options)


def recurrent_format(t: Layer, options: Options) -> str:
    """The RECURRENT_FORMATS entry of a recurrent layer: --recurrent-format, where auto is the op's
    ``DEPLOYED_FORMAT`` with 8-bit activations and float32 otherwise (weight-only and 16-bit runs ask
    for no 8-bit activations, which DynamicQuantizeLSTM would bring in at run time)."""
    if options.recurrent_format != "auto":
        return options.recurrent_format
    return t.DEPLOYED_FORMAT if options.act_bits == 8 else "float32"


def _bounded_for_target(t: Layer, plan: LayerPlan, options: Options) -> LayerPlan:
    """The plan with the target's pair bound on its codes (onnx_gpfq.cpu), where an int8 kernel that could
    saturate will run the layer: 8-bit activations, an op onnxruntime runs as an int8 kernel, codes large
    enough to overflow a pair."""
    acts = (8 if plan.fmt.runtime_uint8 else None if plan.weight_only or not t.INT8_KERNEL
            else 8 if options.act_bits == "auto" else options.act_bits)
    bound = cpu.pair_bound(options.target, plan.spec.alphabet.hi, acts)
    if bound is None:
        return plan
    # The default grid becomes the bounded one, up to C = 2, where every code is within +-64 and no pair can
    # reach the bound: the search can always fall back to unclipped codes at twice the step (what 7-bit codes give).
    grid = cpu.BOUNDED_C_GRID if plan.spec.c_grid == DEFAULT_C_GRID else plan.spec.c_grid
    return replace(plan, spec=replace(plan.spec, pair_bound=bound, c_grid=grid))


def required_opset(options: Options) -> int:
    """The opset the output needs: per-channel QDQ 13; block-wise scales and 16-bit activations
    21 (--act-bits auto too); and at least what the weight format needs (INT4: 21)."""
    blockwise = (options.act_bits in (16, "auto") or options.granularity == "block"
                 or any(r.granularity == "block" for r in options.rules))
    return max(FORMATS[options.weight_format].min_opset, BLOCKWISE_OPSET if blockwise else 13)


def add_domains(model: onnx.ModelProto, plans: dict[str, LayerPlan]) -> None:
    """Import the operator domains the chosen formats emit into (com.microsoft for MatMulNBits).

    A domain is appended even when the model already imports it (onnxruntime's optimiser, run by
    ``graph.normalise``, adds com.microsoft at version 1): the output then lists it twice, which
    the checker and onnxruntime accept. Deduplicating would change the bytes of every such output.
    """
    needed: dict[str, int] = {}
    for plan in plans.values():
        needed.update(plan.fmt.domains)
    for domain, version in needed.items():
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def onnx_scale(t: Layer, scale: np.ndarray, granularity: str) -> np.ndarray:
    """The core's steps (g, nb, N1g) in the shape DequantizeLinear wants for this weight."""
    if granularity == "tensor":
        return np.array(scale.reshape(-1)[0], np.float32)
    if granularity == "channel":
        return scale[:, 0, :].reshape(-1).astype(np.float32)
    blocks = scale[0].astype(np.float32)  # (nb, N): blocks along the fan-in
    return np.ascontiguousarray(blocks.T) if t.fan_in_axis == 1 else blocks
