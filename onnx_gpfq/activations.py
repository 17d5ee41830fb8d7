"""Activation quantization: which tensors get QuantizeLinear/DequantizeLinear, and their ranges.

Ranges are calibrated on the float network, tensor by tensor as the float stream produces them,
before the quantized stream runs past them, so the X~ that GPFQ sees already carries the
activation quantization the output graph applies.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from .graph import GraphIndex
from .rewrite import ActQuant, act_quant_from_range, fake_quant
from .ops import Layer

REMOVABLE_ACTIVATIONS = ("Relu", "Clip")
MAX_VALUES = 1 << 20  # values per tensor used by the percentile / MSE searches (seeded subsample)


def activation_tensors(graph: onnx.GraphProto, targets: list[Layer], weight_only: set[str] = frozenset()) -> set[str]:
    """Which activation tensors get QuantizeLinear/DequantizeLinear (the placement rule).

    - the input of every quantized layer (what makes its kernel integer on the input side),
      except the ``weight_only`` ones (node names: block-wise and MatMulNBits layers);
    - the output of every quantized layer whose op asks for it (``Layer.QUANTIZE_OUTPUT``: Conv),
      taken after a chain of Relu/Clip that only it feeds, so that onnxruntime fuses
      DQ -> Conv -> (Relu) -> Q into QLinearConv (Relu/Clip fold into the uint8 range);
    - the output of an Add whose inputs are both quantized (a residual join), again after Relu/Clip,
      so that it runs as QLinearAdd instead of dequantize-add-quantize.
    Nothing else is quantized: attention masks, softmax inputs and outputs, normalisation
    statistics and the model outputs of MatMul/Gemm heads stay float.
    """
    index = GraphIndex(graph)

    def after_activations(out: str) -> str:
        while out not in index.graph_outputs:
            consumers = index.consumers.get(out, [])
            if len(consumers) == 1 and consumers[0].op_type in REMOVABLE_ACTIVATIONS:
                out = consumers[0].output[0]
            else:
                break
        return out

    chosen: set[str] = set()
    output_quantized = {t.node for t in targets if t.QUANTIZE_OUTPUT}
    for t in targets:
        if not index.is_constant(t.x) and t.node not in weight_only:
            chosen.add(t.x)
    for node in graph.node:  # topological order, so Add inputs are decided before the Add
        if node.name in output_quantized:
            chosen.add(after_activations(node.output[0]))
        elif node.op_type == "Add" and all(i in chosen for i in node.input):
            chosen.add(after_activations(node.output[0]))
    return chosen


def calibrate(values: list[np.ndarray], method: str, bits: int, symmetric: bool, percentile: float,
              rng: np.random.Generator) -> ActQuant:
    """Quantization parameters of one tensor from its values over all calibration batches.

    minmax: the full range. percentile: each tail clipped at ``percentile`` (e.g. 99.99).
    mse: the range [a lo, a hi], a in (0, 1], minimising the mean squared fake-quantization error.
    """
    lo, hi = math.inf, -math.inf
    for v in values:
        lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    if method == "minmax" or lo == hi:
        return act_quant_from_range(lo, hi, bits, symmetric)
    sample = _sample(values, rng)
    if method == "percentile":
        p_lo, p_hi = np.percentile(sample, [100.0 - percentile, percentile])
        return act_quant_from_range(float(p_lo), float(p_hi), bits, symmetric)
    best, best_err = None, np.inf
    for a in np.linspace(1.0, 0.05, 40):
        quant = act_quant_from_range(a * lo, a * hi, bits, symmetric)
        err = float(np.mean((fake_quant(sample, quant) - sample) ** 2))
        if err < best_err:
            best, best_err = quant, err
    return best


def _sample(values, rng: np.random.Generator) -> np.ndarray:
    """All values, or about MAX_VALUES of them drawn uniformly (with replacement) from every
    batch in proportion to its size; memory O(MAX_VALUES) whatever the number of batches."""
    entries = values.entries() if hasattr(values, "entries") else values  # no reading of spilled batches
    total = sum(math.prod(e.shape) for e in entries)
    if total <= MAX_VALUES:
        return np.concatenate([v.reshape(-1) for v in values]).astype(np.float64)
    parts = []
    for v in values:
        k = round(MAX_VALUES * v.size / total)
        parts.append(v.reshape(-1)[rng.integers(0, v.size, k)].astype(np.float64))
    return np.concatenate(parts)
