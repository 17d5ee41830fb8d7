"""RNN: W and R quantized per direction and gate unit (see ``_recurrent``)."""

from ._recurrent import recurrent

RNN = recurrent("RNN", 1)
