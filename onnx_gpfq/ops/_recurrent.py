"""LSTM, GRU and RNN (layout 0): two weights per node, each quantized as its own target.

- W (input weights, input 1, shape (D, G*H, I)): y = X W per direction, X = the sequence input,
  one row per (sample, time step).
- R (recurrent weights, input 2, shape (D, G*H, H)): y = X R per direction, X = the hidden state the
  step starts from: the node's Y output shifted by one step in the direction's time order, with
  initial_h (or zeros) at the first step. X~ is the same shift of the Y that the partially quantized
  network computes (its W already quantized), so the capture runs the node once more to read it
  (``OWN_OUTPUT``, see ``quantize._own_output``).

D directions are GPFQ's groups; the G*H gate units are the output channels, one step per
(direction, unit). Padding steps (t >= sequence_lens[b]) give zero rows, so they add nothing to
G, H and F (they only count in the reported row total). For a GRU with linear_before_reset=0 the
hidden gate's recurrent product is R_h (r * h), not R_h h; its rows are taken as h like the other
gates' (the error that GPFQ minimises for those columns is the one of R_h h).

onnxruntime has no integer LSTM/GRU kernel reading a QDQ input, so the input stays float
(``INT8_KERNEL = False``: no activation QDQ) and how the weights are stored is the format's
(--recurrent-format, ``DEPLOYED_FORMAT`` by default): GRU and RNN as their dequantized float32 values
(``formats/float32``: DequantizeLinear of the codes would run on every inference), LSTM as
com.microsoft DynamicQuantizeLSTM (``formats/dynamic_lstm``: int8 W and R, input and hidden state
quantized at run time). With --recurrent-format qdq the codes are stored as a 2-D (D*G*H, fan-in)
tensor with one DequantizeLinear scale per row (opset 13 per-axis), reshaped back to (D, G*H,
fan-in) in the graph (``graph_shape``), and the node runs in float on the dequantized weights.
The bias B, the peepholes P and the states stay float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import Layer


@dataclass(frozen=True, kw_only=True)
class Recurrent(Layer):
    GATES: ClassVar[int]
    BIAS_INPUT: ClassVar[int | None] = None  # B holds both W's and R's biases: left as it is
    INT8_KERNEL: ClassVar[bool] = False
    DEPLOYED_FORMAT: ClassVar[str | None] = "float32"  # GRU, RNN: no int8 kernel, no DequantizeLinear per run
    OWN_OUTPUT: ClassVar[int | None] = None  # which output of its own node the rows come from (R)

    directions: tuple[bool, ...] = (False,)  # per direction: runs backwards in time
    seq_lens: str = ""  # sequence_lens input ("" when absent)
    initial_h: str = ""

    @classmethod
    def parse(cls, node, index, shape, attrs):
        if int(attrs.get("layout", 0)) != 0:
            return [f"{cls.OP_TYPE} layout=1 (batch-major) is not supported: only layout 0 is quantized"]
        inputs = list(node.input) + [""] * 8
        r = inputs[2]
        if not r or not index.is_constant(r):
            return [f"{cls.OP_TYPE} recurrent weight R is not a constant"]
        if len(shape) != 3:
            return [f"{cls.OP_TYPE} weight of rank {len(shape)}"]
        direction = attrs.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        dirs = {"forward": (False,), "reverse": (True,), "bidirectional": (False, True)}[direction]
        common = dict(node=node.name, directions=dirs, seq_lens=inputs[4], initial_h=inputs[5])
        r_shape = tuple(int(d) for d in index.initializers[r].dims)
        flat = lambda s: (s[0] * s[1], s[2])  # noqa: E731  the stored (2-D) layout
        return [cls(x=node.input[0], w=node.input[1], w_shape=flat(shape), **common),
                cls.Hidden(x=node.input[0], w=r, w_shape=flat(r_shape), **common)]

    @property
    def key(self) -> str:
        return f"{self.node}:{'R' if self.OWN_OUTPUT is not None else 'W'}"

    @property
    def graph_shape(self) -> tuple[int, ...]:
        d = len(self.directions)
        return (d, self.w_shape[0] // d, self.w_shape[1])

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        return (self.seq_lens,)

    @property
    def patch_key(self) -> tuple:
        return (self.key, "rows")

    @property
    def channel_axis(self) -> int:
        return 0

    @property
    def fan_in(self) -> int:
        return self.w_shape[1]

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        d, gh, n0 = self.graph_shape
        return w.reshape(d, gh, n0).transpose(0, 2, 1)

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        return m.transpose(0, 2, 1).reshape(self.w_shape)

    def samples(self, x_shape):
        return x_shape[1]  # X: (T, B, I)

    def rows_per_sample(self, x_shape):
        return x_shape[0]

    def _select(self, per_dir: list[np.ndarray], lens: np.ndarray | None, positions) -> np.ndarray:
        """Per direction (T, B, N) -> (D, rows, N): padding steps zeroed, then per sample the
        kept time steps, samples first."""
        out = []
        for a in per_dir:
            a = np.asarray(a, dtype=np.float32).transpose(1, 0, 2)  # (B, T, N)
            if lens is not None:
                a = np.where((np.arange(a.shape[1])[None, :] < lens[:, None])[..., None], a, 0.0).astype(np.float32)
            if positions is not None:
                a = a[np.arange(a.shape[0])[:, None], positions]
            out.append(a.reshape(-1, a.shape[-1]))
        return np.stack(out)

    def rows(self, x, positions, seq_lens=None):
        lens = None if seq_lens is None else np.asarray(seq_lens).reshape(-1).astype(np.int64)
        return self._select([x] * len(self.directions), lens, positions)


class _Hidden:
    """Mixin of the R targets: the rows are the previous hidden states, taken from Y."""

    OWN_OUTPUT: ClassVar[int | None] = 0
    WEIGHT_INPUT: ClassVar[int] = 2

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        return (self.seq_lens, self.initial_h)

    def samples(self, x_shape):
        return x_shape[2]  # Y: (T, D, B, H)

    def rows(self, y, positions, seq_lens=None, initial_h=None):
        y = np.asarray(y, dtype=np.float32)
        t_len, d_len, batch, hidden = y.shape
        lens = (np.full(batch, t_len, np.int64) if seq_lens is None
                else np.asarray(seq_lens).reshape(-1).astype(np.int64))
        h0 = (np.zeros((d_len, batch, hidden), np.float32) if initial_h is None
              else np.broadcast_to(np.asarray(initial_h, np.float32), (d_len, batch, hidden)))
        per_dir = []
        for d, backwards in enumerate(self.directions):
            seq = y[:, d]  # (T, B, H)
            if not backwards:
                prev = np.concatenate([h0[d][None], seq[:-1]], axis=0)
            else:  # step t starts from Y[t + 1], or from initial_h at the sample's last real step
                prev = np.concatenate([seq[1:], np.zeros_like(seq[:1])], axis=0)
                last = (np.arange(t_len)[:, None] == (lens - 1)[None, :])[..., None]
                prev = np.where(last, h0[d][None], prev)
            per_dir.append(prev)
        return self._select(per_dir, None if seq_lens is None else lens, positions)


def recurrent(op_type: str, gates: int, deployed_format: str = "float32") -> type[Recurrent]:
    """The layer class of one recurrent op (its R targets are the nested ``Hidden`` class)."""
    cls = dataclass(frozen=True, kw_only=True)(type(op_type, (Recurrent,), {
        "OP_TYPE": op_type, "GATES": gates, "DEPLOYED_FORMAT": deployed_format, "__module__": __name__}))
    cls.Hidden = dataclass(frozen=True, kw_only=True)(type(f"{op_type}Hidden", (_Hidden, cls), {"__module__": __name__}))
    return cls
