"""LSTM: W and R quantized per direction and gate unit (see ``_recurrent``).

Stored by default as com.microsoft DynamicQuantizeLSTM (``formats/dynamic_lstm``): on the ddddocr
CRNN's BiLSTM it runs in half the time of the float LSTM, where the codes through DequantizeLinear
(--recurrent-format qdq) cost a dequantization on every inference and the float32 values
(--recurrent-format float32) run as fast as the float model (BENCHMARKS.md, placement section)."""

from ._recurrent import recurrent

LSTM = recurrent("LSTM", 4, deployed_format="dynamic")
