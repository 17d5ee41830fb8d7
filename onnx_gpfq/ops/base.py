"""The protocol every quantizable op implements, and the parts all of them share.

A layer kind (Conv, Gemm, ...) is a frozen dataclass derived from ``Layer``. Its instances are the
*targets*: one per node to quantize, holding what ``parse`` read from the node. The rest of the
pipeline talks to a target only through this interface, never through its op type:

- ``parse``: which input is the activation, the weight and the bias, and the attributes; or the
  reason the node stays in float.
- ``to_matrix`` / ``from_matrix``: the ONNX weight to and from the GPFQ matrix view W of shape
  (g, N0, N1g): g groups, N0 fan-in (rows), N1g output columns per group. The layer computes
  y = X W per group, X holding one row per output position.
- ``samples`` / ``rows_per_sample`` / ``rows``: the rows of X from a captured input tensor.
- ``channel_axis`` / ``fan_in_axis``: axes of the ONNX weight for per-channel and block-wise scales.
- ``integer_bias`` / ``bias_correction``: how the layer's bias input may be rewritten.
- ``emit``: the node(s) that replace the original one in the output graph.
- ``fan_in`` / ``kernel_order``: N0, and the order in which onnxruntime's int8 kernel reduces it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx

from ..graph import GraphIndex


@dataclass(frozen=True, kw_only=True)
class Layer:
    """One quantizable layer. Tensor names refer to the normalised graph."""

    OP_TYPE: ClassVar[str]
    WEIGHT_INPUT: ClassVar[int] = 1  # index of the weight among the node's inputs
    BIAS_INPUT: ClassVar[int | None] = 2  # index of the bias input, None when the op has none
    QUANTIZE_OUTPUT: ClassVar[bool] = False  # give the output a QDQ pair (see placement.place)
    # onnxruntime runs the layer on an int8 kernel when its input is quantized. False: it runs in
    # float on the dequantized weights, so its input gets no QDQ (a weight-only layer) and
    # constraints of the int8 kernels do not apply to it.
    INT8_KERNEL: ClassVar[bool] = True
    # The rows come from this output of the layer's own node (recurrent weights), None: from ``x``.
    OWN_OUTPUT: ClassVar[int | None] = None
    # The formats.RECURRENT_FORMATS entry --recurrent-format auto stores the layer in; None: --weight-format's.
    DEPLOYED_FORMAT: ClassVar[str | None] = None

    node: str  # node name
    x: str  # activation input
    w: str  # weight initializer
    b: str | None = None  # bias initializer
    w_shape: tuple[int, ...]
    bias_locked: bool = False  # the bias slot holds an activation: no bias correction, no int32 bias

    # --- parsing -----------------------------------------------------------------------------
    @classmethod
    def parse(cls, node: onnx.NodeProto, index: GraphIndex, shape: tuple[int, ...], attrs: dict) -> "Layer | str":
        """A target for ``node`` (its weight, input 1, is a float initializer of ``shape``), or
        the reason the node stays in float."""
        raise NotImplementedError

    @classmethod
    def node_fields(cls, node: onnx.NodeProto, shape: tuple[int, ...]) -> dict:
        """The fields every target reads off its node: name, activation input, weight and its shape."""
        return dict(node=node.name, x=node.input[0], w=node.input[cls.WEIGHT_INPUT], w_shape=shape)

    @property
    def op_type(self) -> str:
        return self.OP_TYPE

    @property
    def key(self) -> str:
        """Identifies the target: the node name, unless a node has several weights (LSTM W and R)."""
        return self.node

    @property
    def graph_shape(self) -> tuple[int, ...] | None:
        """The shape the node reads its weight in when the codes are stored in another one
        (``w_shape``): the dequantized weight is reshaped to it. None: the same."""
        return None

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """Further tensors ``rows`` reads after the layer input ("" for an absent one), e.g. the
        sequence lengths of a recurrent layer."""
        return ()

    # --- weights -----------------------------------------------------------------------------
    @property
    def channel_axis(self) -> int:
        """Axis of the ONNX weight that indexes output channels (the per-channel scale axis)."""
        raise NotImplementedError

    @property
    def fan_in_axis(self) -> int | None:
        """Axis of the ONNX weight that block-wise scales split, or None: no block-wise scales."""
        return None

    @property
    def n_out(self) -> int:
        return self.w_shape[self.channel_axis]

    @property
    def fan_in(self) -> int:
        """N0: rows of W per group (the length of each output's dot product)."""
        raise NotImplementedError

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        """ONNX weight -> W of shape (g, N0, N1g)."""
        raise NotImplementedError

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        """W of shape (g, N0, N1g) -> ONNX weight layout (inverse of ``to_matrix``)."""
        raise NotImplementedError

    def kernel_order(self) -> np.ndarray:
        """Permutation of the N0 rows of W into the order onnxruntime's int8 kernel reduces the
        fan-in in (its K order): row ``kernel_order()[k]`` of W is the k-th term of the sum.
        The identity unless an op's kernel is known to reorder."""
        return np.arange(self.fan_in)

    # --- activations -------------------------------------------------------------------------
    @property
    def patch_key(self) -> tuple:
        """Targets with equal keys see identical rows of X (and share G, H, F)."""
        return (self.x, "rows", False)

    def samples(self, x_shape: tuple[int, ...]) -> int:
        """Calibration samples in a batch of the layer input (the rows of X come per sample)."""
        return x_shape[0]

    def rows_per_sample(self, x_shape: tuple[int, ...]) -> int:
        """Rows of X one sample yields: conv output positions, tokens, or 1."""
        raise NotImplementedError

    def rows(self, x: np.ndarray, positions: np.ndarray | None, *extra) -> np.ndarray:
        """Layer input -> rows of X, shape (g, rows, N0), float32. positions: (N, P) row indices
        to keep per sample (from ``positions``), or None for all. extra: the ``extra_inputs``
        (None for an absent one)."""
        raise NotImplementedError

    def row_tokens(self, x_shape: tuple[int, ...], positions: np.ndarray | None) -> np.ndarray | None:
        """For each row ``rows`` yields from an input of ``x_shape`` (with ``positions``), the flat index
        sample * tokens + token of the (samples, tokens) position it comes from, where the rows are
        the tokens of a (samples, tokens, features) input; None otherwise (no token mask applies)."""
        return None

    def positions(self, x_shape: tuple[int, ...], max_patches: int, rng: np.random.Generator) -> np.ndarray | None:
        """Row positions to keep per sample: (N, P) indices into the L rows of each sample, or None for all."""
        per_sample = self.rows_per_sample(x_shape)
        if per_sample <= max_patches:
            return None
        return np.stack([np.sort(rng.choice(per_sample, max_patches, replace=False)) for _ in range(self.samples(x_shape))])

    # --- bias --------------------------------------------------------------------------------
    @property
    def integer_bias(self) -> bool:
        """Whether an int32 bias with scale x_scale * w_scale computes the same output (what the
        fused integer kernels expect) when the input is quantized."""
        return False

    def bias_correction(self, delta: np.ndarray) -> np.ndarray | None:
        """The core's bias correction mu_X^T W - mu_X~^T Q (one value per output column) in the
        units of the bias input, or None when the layer's bias cannot carry it."""
        return None if self.bias_locked or self.BIAS_INPUT is None else delta

    # --- output graph ------------------------------------------------------------------------
    def emit(self, node: onnx.NodeProto, inputs: list[str], outputs: list[str]) -> list[onnx.NodeProto]:
        """The node(s) computing this layer from the rewired ``inputs`` into ``outputs``."""
        return [renamed(node, inputs, outputs)]


def renamed(node: onnx.NodeProto, inputs: list[str], outputs: list[str]) -> onnx.NodeProto:
    """``node`` reading ``inputs`` and writing ``outputs`` (the node itself when nothing changes)."""
    if list(inputs) == list(node.input) and list(outputs) == list(node.output):
        return node
    new = onnx.NodeProto()
    new.CopyFrom(node)
    del new.input[:]
    new.input.extend(inputs)
    del new.output[:]
    new.output.extend(outputs)
    return new


def tokens(x_shape: tuple[int, ...]) -> int:
    """Rows of X per sample for an op applied to the last axis: the product of the middle axes."""
    return math.prod(x_shape[1:-1]) if len(x_shape) > 2 else 1
