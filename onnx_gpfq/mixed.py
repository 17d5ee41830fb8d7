"""Mixed activation precision (``--act-bits auto``): 8-bit activations, with the few tensors whose 8-bit
quantization costs the model most promoted to 16 bits (opset-21 QuantizeLinear/DequantizeLinear).

The cost of a tensor is measured, not estimated: the relative error of the model's float outputs,
sum ||y_t - y||^2 / sum ||y||^2, when that tensor alone is fake-quantized at 8 bits (its range from
the run's --act-calibration on the same data) and everything else, weights included, stays float;
on the first PROBE_SAMPLES samples of the first calibration batch (every activation tensor of the
model is held for them at once: this bounds the memory). The budget (``--act16-budget``) is a fraction of the activation
tensors the run quantizes: at most floor(budget x count) of them are promoted, the costliest first,
and only those with a cost above zero.

What a promotion costs at run time (onnxruntime 1.2x, CPU provider, measured by
``tools/act16_kernels.py``): a MatMul or Gemm whose input is 16-bit leaves the int8 kernels
(MatMulIntegerToFloat / QGemm); onnxruntime keeps the activation's QuantizeLinear ->
DequantizeLinear in float and fuses the int8 weight's DequantizeLinear into a float MatMulNBits.
The report gives each promoted tensor with the multiply-adds per sample of the layers that read it,
the ones that now run that way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from . import act_ranges, rewrite, runtime
from .graph import GraphIndex, serialize
from .ops import Layer
from .options import Options
from .placement import after_activations


PROBE_SAMPLES = 8


@dataclass(frozen=True)
class Promotion:
    """One activation tensor's measured cost of 8-bit quantization, and whether it became 16-bit."""

    tensor: str
    cost: float  # relative output error with this tensor alone at 8 bits
    promoted: bool
    consumers: tuple[str, ...]  # quantized layers reading it, or writing it (a Conv's output): their int8
    # kernels are lost when it is promoted
    macs: int  # multiply-adds per sample of those layers (readers: from the measured input shapes)


def choose(model: onnx.ModelProto, quant_acts: set[str], batch: dict[str, np.ndarray], targets: list[Layer],
           options: Options) -> list[Promotion]:
    """Every quantized activation tensor with its cost, sorted by cost (highest first); the
    promoted ones marked. model: the normalised (and smoothed) float model; batch: one calibration
    batch {input: array}."""
    names = sorted(quant_acts)
    if not names:
        return []
    if not options.batch_axes:  # samples on axis 0 of every input (otherwise the whole batch)
        batch = {k: v[:PROBE_SAMPLES] if v.ndim else v for k, v in batch.items()}
    graph = model.graph
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = [o.name for o in graph.output]
    for name in names:
        if name not in outputs:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    wanted = outputs + [n for n in names if n not in outputs]
    values = dict(zip(wanted, runtime.session(probe.SerializeToString(), options.threads,
                                              optimization="disable").run(wanted, batch)))
    del probe
    reference = [values[o] for o in outputs]
    norm = sum(float(np.sum(np.square(r, dtype=np.float64))) for r in reference if r.dtype.kind == "f")
    costs = {}
    for k, name in enumerate(names):
        quant, _ = act_ranges.choose(name, [values[name]], options.act_calibration, 8, options.act_symmetric,
                                     options.percentile, [], np.random.default_rng([options.seed, k]))
        nodes, inits = rewrite.apply(graph, {}, {name: quant})
        data = serialize(rewrite.build_model(model, nodes, inits))
        if data is None:  # over 2 GiB: not measured
            costs[name] = 0.0
            continue
        got = runtime.session(data, options.threads, optimization="disable").run(outputs, batch)
        err = sum(float(np.sum((g.astype(np.float64) - r) ** 2)) for g, r in zip(got, reference) if r.dtype.kind == "f")
        costs[name] = err / norm if norm > 0 else 0.0
    limit = math.floor(options.act16_budget * len(names) + 1e-9)
    order = sorted(names, key=lambda n: (-costs[n], n))
    promoted = {n for n in order[:limit] if costs[n] > 0}
    readers = {}
    index, nodes = GraphIndex(model.graph), {n.name: n for n in model.graph.node}
    for t in targets:
        if t.x in quant_acts:
            readers.setdefault(t.x, []).append(t)
        out = after_activations(index, nodes[t.node].output[0])  # a Conv output: its QLinearConv is lost too
        if out in quant_acts and t.QUANTIZE_OUTPUT:
            readers.setdefault(out, []).append(t)
    result = []
    for name in order:
        layers = readers.get(name, [])
        macs = sum(_macs(t, values[name].shape) for t in layers if t.x == name) // max(values[name].shape[0], 1)
        result.append(Promotion(name, costs[name], name in promoted, tuple(t.node for t in layers), int(macs)))
    return result


def _macs(t: Layer, x_shape: tuple[int, ...]) -> int:
    """Multiply-adds of layer ``t`` over an input of ``x_shape`` (rows x fan-in x outputs)."""
    rows = t.samples(x_shape) * t.rows_per_sample(x_shape)
    return int(rows) * int(t.fan_in) * int(t.n_out)  # fan_in: what one output reads (per group for Conv)

