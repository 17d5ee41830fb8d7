"""Weight formats: how a layer's integer codes are stored in the output graph.

``FORMATS`` maps a ``--weight-format`` name to its format (the protocol in ``base``). Adding a
format means adding one module with its class and one line here: the CLI's choices and the
options' check read this registry. ``RECURRENT_FORMATS``: the formats --recurrent-format names. A DequantizeLinear container derives from ``qdq.QDQFormat``
(its codes' dtype and ``stored_bytes``); a format with its own op implements ``emit``.
"""

from __future__ import annotations

from .base import WeightFormat
from .dynamic_lstm import DynamicLSTM
from .float32 import Float32
from .int4 import Int4
from .int8 import Int8
from .matmulnbits import MatMulNBits

FORMATS: dict[str, WeightFormat] = {f.name: f for f in (Int8(), Int4(), MatMulNBits())}
# --recurrent-format: how LSTM / GRU / RNN weights are stored, whatever --weight-format says for the rest
# ("qdq": as --weight-format stores them, read through DequantizeLinear; "auto": the op's own choice,
# ``Recurrent.DEPLOYED_FORMAT``)
RECURRENT_FORMATS: dict[str, WeightFormat] = {f.name: f for f in (DynamicLSTM(), Float32())}
RECURRENT_CHOICES = ("auto", *RECURRENT_FORMATS, "qdq")


def get(name: str) -> WeightFormat:
    return FORMATS[name]
