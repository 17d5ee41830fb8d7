"""Stage 2: find the layers to quantize and map each to the notes' matrix view.

A target is a Conv / Gemm / MatMul node whose weight is an initializer. For each, ``to_matrix``
gives the weight as W of shape (g, N0, N1g) (g groups, N0 fan-in, N1g output columns per group)
and ``rows`` turns the node's input activation into the matching rows of X, shape (g, rows, N0):
conv patches unfolded with the node's real kernel, strides, pads, dilations and groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view

from .graph import GraphIndex

TARGET_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Target:
    """One quantizable layer. Tensor names refer to the normalised graph."""

    node: str  # node name
    op_type: str  # "Conv" | "Gemm" | "MatMul"
    x: str  # activation input
    w: str  # weight initializer
    b: str | None  # bias initializer (Conv input 2, Gemm C when it is a per-column vector)
    w_shape: tuple[int, ...]
    groups: int = 1
    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()  # ONNX order: all begins, then all ends (explicit; auto_pad resolved per input)
    dilations: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    trans_a: bool = False
    trans_b: bool = False
    output_padding: tuple[int, ...] = ()  # ConvTranspose
    output_shape: tuple[int, ...] = ()  # ConvTranspose: explicit output spatial shape, if given
    bias_locked: bool = False  # the bias slot holds an activation: no bias correction, no int32 bias

    @property
    def channel_axis(self) -> int:
        """Axis of the ONNX weight that indexes output channels (the per-channel scale axis)."""
        if self.op_type == "Conv" or (self.op_type == "Gemm" and self.trans_b):
            return 0
        return 1  # Gemm (transB=0), MatMul (K, N), ConvTranspose (Cin, Cout, *k)

    @property
    def fan_in_axis(self) -> int:
        """Axis of a 2-D (Gemm/MatMul) weight that indexes the fan-in (block-wise scales split it)."""
        return 1 if self.op_type == "Gemm" and self.trans_b else 0

    @property
    def n_out(self) -> int:
        return self.w_shape[self.channel_axis]

    @property
    def patch_key(self) -> tuple:
        """Targets with equal keys see identical rows of X (and share G, H, F)."""
        if self.op_type in ("Conv", "ConvTranspose"):
            return (self.x, self.op_type, self.groups, self.kernel, self.strides, self.pads, self.dilations,
                    self.auto_pad, self.output_padding, self.output_shape)
        return (self.x, "rows", self.trans_a)

    # --- weights -----------------------------------------------------------------------------
    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        """ONNX weight -> W of shape (g, N0, N1g)."""
        if self.op_type == "Conv":
            g = self.groups
            cout = w.shape[0]
            return w.reshape(g, cout // g, -1).transpose(0, 2, 1)
        if self.op_type == "ConvTranspose":  # a conv over the upsampled input with the kernel flipped
            nd = len(self.kernel)
            flipped = np.flip(w, axis=tuple(range(2, 2 + nd)))
            return np.moveaxis(flipped, 1, -1).reshape(1, -1, w.shape[1])
        if self.op_type == "Gemm" and self.trans_b:
            return w.T[None]
        return w[None]

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        """W of shape (g, N0, N1g) -> ONNX weight layout (inverse of ``to_matrix``)."""
        if self.op_type == "Conv":
            return m.transpose(0, 2, 1).reshape(self.w_shape)
        if self.op_type == "ConvTranspose":
            cin, cout, *k = self.w_shape
            w = np.moveaxis(m[0].reshape(cin, *k, cout), -1, 1)
            return np.flip(w, axis=tuple(range(2, 2 + len(k))))
        if self.op_type == "Gemm" and self.trans_b:
            return m[0].T
        return m[0]

    # --- activations -------------------------------------------------------------------------
    def samples(self, x_shape: tuple[int, ...]) -> int:
        """Calibration samples in a batch of the layer input (the rows of X come per sample)."""
        return x_shape[1] if self.op_type == "Gemm" and self.trans_a else x_shape[0]

    def positions(self, x_shape: tuple[int, ...], max_patches: int, rng: np.random.Generator) -> np.ndarray | None:
        """Row positions to keep per sample: (N, P) indices into the L rows of each sample, or None for all."""
        per_sample = self.rows_per_sample(x_shape)
        if per_sample <= max_patches:
            return None
        return np.stack([np.sort(rng.choice(per_sample, max_patches, replace=False)) for _ in range(self.samples(x_shape))])

    def rows_per_sample(self, x_shape: tuple[int, ...]) -> int:
        """Rows of X one sample yields: conv output positions, tokens, or 1."""
        if self.op_type == "Conv":
            return math.prod(self._out_spatial(x_shape))
        if self.op_type == "ConvTranspose":
            return math.prod(self._transpose_geometry(x_shape)[2])
        if self.op_type == "Gemm":
            return 1
        return math.prod(x_shape[1:-1]) if len(x_shape) > 2 else 1

    def rows(self, x: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
        """Layer input -> rows of X, shape (g, rows, N0), float32."""
        x = np.asarray(x, dtype=np.float32)
        if self.op_type == "Conv":
            begin, end = self._explicit_pads(x.shape)
            xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
            return _patches(xp, self.kernel, self.strides, self.dilations, self.groups, positions)
        if self.op_type == "ConvTranspose":
            return self._transpose_rows(x, positions)
        if self.op_type == "Gemm":
            a = x.T if self.trans_a else x
            return a.reshape(1, a.shape[0], -1)
        k = x.shape[-1]
        if x.ndim <= 2 or positions is None:
            return x.reshape(1, -1, k)
        per_sample = x.reshape(x.shape[0], -1, k)
        return per_sample[np.arange(x.shape[0])[:, None], positions].reshape(1, -1, k)

    def _explicit_pads(self, x_shape: tuple[int, ...]) -> tuple[list[int], list[int]]:
        nd = len(self.kernel)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for i in range(nd):
                size = x_shape[2 + i]
                ext = self.dilations[i] * (self.kernel[i] - 1) + 1
                total = max((-(-size // self.strides[i]) - 1) * self.strides[i] + ext - size, 0)
                small, big = total // 2, total - total // 2
                begin.append(small if self.auto_pad == "SAME_UPPER" else big)
                end.append(big if self.auto_pad == "SAME_UPPER" else small)
            return begin, end
        if self.auto_pad == "VALID":
            return [0] * nd, [0] * nd
        return list(self.pads[:nd]), list(self.pads[nd:])

    def _out_spatial(self, x_shape: tuple[int, ...]) -> list[int]:
        begin, end = self._explicit_pads(x_shape)
        out = []
        for i, k in enumerate(self.kernel):
            ext = self.dilations[i] * (k - 1) + 1
            out.append((x_shape[2 + i] + begin[i] + end[i] - ext) // self.strides[i] + 1)
        return out

    def _transpose_geometry(self, x_shape: tuple[int, ...]) -> tuple[list[int], list[int], list[int]]:
        """ConvTranspose as a stride-1 conv over the zero-upsampled input: pads (may be negative:
        a crop) on each side of the upsampled input, and the output spatial shape."""
        nd = len(self.kernel)
        out_pad = list(self.output_padding) or [0] * nd
        begin, end, out = [], [], []
        for i in range(nd):
            size, s, d, k = x_shape[2 + i], self.strides[i], self.dilations[i], self.kernel[i]
            full = s * (size - 1) + out_pad[i] + (k - 1) * d + 1
            if self.output_shape or self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                target = self.output_shape[i] if self.output_shape else size * s
                total = full - target  # the ONNX spec's rule for splitting the total padding
                pb = total // 2 if self.auto_pad == "SAME_UPPER" else total - total // 2
                pe = total - pb
            elif self.auto_pad == "VALID":
                pb = pe = 0
            else:
                pb, pe = self.pads[i], self.pads[nd + i]
            begin.append((k - 1) * d - pb)
            end.append((k - 1) * d - pe + out_pad[i])
            out.append(full - pb - pe)
        return begin, end, out

    def _transpose_rows(self, x: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
        nd = len(self.kernel)
        begin, end, _ = self._transpose_geometry(x.shape)
        up_shape = [(x.shape[2 + i] - 1) * self.strides[i] + 1 for i in range(nd)]
        up = np.zeros(x.shape[:2] + tuple(up_shape), x.dtype)
        up[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in self.strides)] = x
        xp = np.pad(up, [(0, 0), (0, 0)] + [(max(b, 0), max(e, 0)) for b, e in zip(begin, end)])
        crop = tuple(slice(max(-b, 0), xp.shape[2 + i] - max(-e, 0)) for i, (b, e) in enumerate(zip(begin, end)))
        xp = xp[(slice(None), slice(None)) + crop]
        return _patches(xp, self.kernel, (1,) * nd, self.dilations, 1, positions)


def _patches(xp: np.ndarray, kernel, strides, dilations, groups: int, positions: np.ndarray | None) -> np.ndarray:
    """Unfold a padded input (N, C, *S) into conv patches (g, N*P, C/g * prod(kernel)).

    Each row is one output position's receptive field, channel-major then kernel positions (the
    order of a Conv weight (Cout, C/g, *kernel) flattened). positions: (N, P) output positions per
    sample to keep, or None for all.
    """
    nd = len(kernel)
    ext = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    win = sliding_window_view(xp, ext, axis=tuple(range(2, 2 + nd)))  # (N, C, *P, *ext)
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, d) for d in dilations)]  # (N, C, *O, *k)
    out = win.shape[2:2 + nd]
    n = xp.shape[0]
    if positions is None:
        positions = np.broadcast_to(np.arange(math.prod(out)), (n, math.prod(out)))
    coords = np.unravel_index(positions.reshape(-1), out)
    sample = np.repeat(np.arange(n), positions.shape[1])
    patches = win[(sample, slice(None)) + tuple(coords)]  # (N*P, C, *k)
    patches = patches.reshape(patches.shape[0], groups, -1)  # channel-major, then kernel positions
    return np.ascontiguousarray(patches.transpose(1, 0, 2))


@dataclass(frozen=True)
class Skipped:
    """A node of a target op type left in float, and why."""

    node: str
    op_type: str
    reason: str


def find_targets(graph: onnx.GraphProto) -> tuple[list[Target], list[Skipped]]:
    """All quantizable layers of a (normalised, topologically sorted) graph, in topological order."""
    index = GraphIndex(graph)
    targets: list[Target] = []
    skipped: list[Skipped] = []
    for node in graph.node:
        if node.op_type not in TARGET_OPS:
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
    """Conv/Gemm/MatMul nodes inside a node's subgraphs (If branches, Loop/Scan bodies), recursively."""
    found = []
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sub in graphs:
            for inner in sub.node:
                if inner.op_type in TARGET_OPS:
                    found.append(inner)
                found.extend(_subgraph_layers(inner))
    return found


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _target(node: onnx.NodeProto, index: GraphIndex) -> Target | str:
    """A Target, or the reason the node stays in float."""
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain {node.domain!r}"
    inputs = list(node.input) + [""] * 3
    x, w = inputs[0], inputs[1]
    if not w or not index.is_constant(w):
        if x and index.is_constant(x):
            return "the constant operand is the first input (only weight-as-second-input is supported)"
        return "no constant weight (both operands are activations)"
    if index.is_constant(x):
        return "both operands are constant"
    weight = index.initializers[w]
    if weight.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        return f"weight {w!r} is not floating point"
    shape = tuple(int(d) for d in weight.dims)
    attrs = _attrs(node)
    if node.op_type == "Conv":
        if len(shape) < 3:
            return "Conv weight of rank < 3"
        nd = len(shape) - 2
        b = inputs[2] or None
        if b is not None and not index.is_constant(b):
            return "Conv bias is not constant"
        kernel = tuple(attrs.get("kernel_shape", shape[2:]))
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        return Target(
            node=node.name, op_type="Conv", x=x, w=w, b=b, w_shape=shape,
            groups=int(attrs.get("group", 1)), kernel=tuple(int(k) for k in kernel),
            strides=tuple(attrs.get("strides", (1,) * nd)), pads=tuple(attrs.get("pads", (0,) * (2 * nd))),
            dilations=tuple(attrs.get("dilations", (1,) * nd)), auto_pad=auto_pad or "NOTSET",
        )
    if node.op_type == "ConvTranspose":
        if len(shape) < 3:
            return "ConvTranspose weight of rank < 3"
        nd = len(shape) - 2
        if int(attrs.get("group", 1)) != 1:
            return "grouped ConvTranspose: its per-output-channel scales cannot be laid out on the weight's axis 1"
        b = inputs[2] or None
        if b is not None and not index.is_constant(b):
            return "ConvTranspose bias is not constant"
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        return Target(
            node=node.name, op_type="ConvTranspose", x=x, w=w, b=b, w_shape=shape,
            kernel=tuple(int(k) for k in attrs.get("kernel_shape", shape[2:])),
            strides=tuple(attrs.get("strides", (1,) * nd)), pads=tuple(attrs.get("pads", (0,) * (2 * nd))),
            dilations=tuple(attrs.get("dilations", (1,) * nd)), auto_pad=auto_pad or "NOTSET",
            output_padding=tuple(attrs.get("output_padding", ())), output_shape=tuple(attrs.get("output_shape", ())),
        )
    if len(shape) != 2:
        return f"{node.op_type} weight of rank {len(shape)} (only 2-D weights are supported)"
    if node.op_type == "Gemm":
        trans_b = bool(attrs.get("transB", 0))
        n_out = shape[0] if trans_b else shape[1]
        c = inputs[2] or None
        if c is not None and index.is_constant(c):
            c_shape = tuple(index.initializers[c].dims)
            if c_shape not in ((n_out,), (1, n_out)):
                return f"Gemm C of shape {c_shape} is not a per-column bias"
        elif c is not None:  # an activation added to the product (e.g. a fused MatMul + Add): left as it is
            return Target(node=node.name, op_type="Gemm", x=x, w=w, b=None, w_shape=shape,
                          trans_a=bool(attrs.get("transA", 0)), trans_b=trans_b, bias_locked=True)
        return Target(node=node.name, op_type="Gemm", x=x, w=w, b=c, w_shape=shape,
                      trans_a=bool(attrs.get("transA", 0)), trans_b=trans_b)
    return Target(node=node.name, op_type="MatMul", x=x, w=w, b=None, w_shape=shape)
