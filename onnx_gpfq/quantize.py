"""The pipeline: load and normalise -> find targets -> calibrate and capture -> quantize -> rewrite -> validate.

``quantize(model, calibration, options)`` returns the quantized ModelProto and a ``Report``.
Layers are quantized in topological order. For layer k, X is its input in the float network and
X~ its input in the network whose layers before k are already quantized, with the activation
QuantizeLinear/DequantizeLinear pairs the output graph will have; both come from two ``Stream``s
that advance segment by segment, so no node runs twice for the same sample and stream.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np
import onnx

from . import core, mixed, on_codes, rewrite, runtime, smooth, steps
from ._threads import blas_workers_sleep, limit as limit_threads
from .calib import load_batches, model_inputs, token_masks
from .capture import Spill, Stream, inputs
from .errors import UserError
from .npyfile import as_array
from .graph import GraphIndex, check_runs, load_model, normalise, save_model, serialize
from .options import Options
from . import act_ranges
from .ops import OPS, Layer, Skipped, find_targets, model_weight_bytes
from .placement import Placement, place, prepare
from .plan import LayerPlan, add_domains, onnx_scale, plan_layer, required_opset
from .report import LayerReport, Report
from .rewrite import ActQuant, QuantizedLayer, act_quant_from_range, read_name
from .specialise import fix_inputs


TARGET_KEY = "onnx_gpfq.target"


def _record_target(model: onnx.ModelProto, target: str) -> None:
    """The deployment target in the model's metadata (replacing one an earlier run wrote)."""
    kept = [p for p in model.metadata_props if p.key != TARGET_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=TARGET_KEY, value=target)


def _observe_new(placement: Placement, acts: dict[str, ActQuant], stream: Stream, options: Options, report: Report,
                 scoring: dict[str, list[tuple[Layer, tuple]]], index: GraphIndex, wide: set[str] = frozenset(),
                 float_read: frozenset[str] = frozenset()) -> None:
    """Choose the range of every activation tensor to quantize that the float stream now holds for
    the first time (``act_ranges.choose``, scored at the layers ``scoring`` names; ``wide``: the
    tensors --act-bits auto promoted to 16 bits; ``float_read``: the tensors a layer reads in float,
    ``act_ranges.read_in_float``; the ends only flat functions read, ``act_ranges.flat_sides``); its
    row goes into the report. A tensor sharing another's grid (placement.shared) takes it once that
    one is chosen; a hard sigmoid of ``placement.on_codes`` is computed on its input's codes where the
    input's grid allows it (``on_codes``)."""
    codes = placement.on_codes  # hard sigmoids that may run on their input's codes
    grids = {c.source: c for c in codes.values()}

    def choose(name: str, k: int) -> None:
        rng = np.random.default_rng([options.seed, k])
        bits = (16 if name in wide else 8) if options.act_bits == "auto" else options.act_bits
        scorers = [act_ranges.Scorer.of(t, index.array(t.w), rng, steps) for t, steps in scoring.get(name, [])]
        clip = grids.get(name)  # its hard sigmoid runs on its codes where its grid allows: such grids are scored
        admissible = (lambda q: on_codes.grids(q, clip.alpha, clip.beta)) if clip else None
        acts[name], row = act_ranges.choose(name, stream.values[name], options.act_calibration, bits,
                                            options.act_symmetric, options.percentile, scorers, rng, admissible,
                                            read_in_float=name in float_read,
                                            flat=act_ranges.flat_sides(index, name))
        if clip and on_codes.exact(acts[name], clip.alpha, clip.beta):
            row = replace(row, rule=f"{row.rule}+codes")
        report.activation_rows.append(row)

    def on_its_input_codes(name: str) -> bool:
        clip = codes.get(name)
        if clip is None or clip.source not in acts or not on_codes.exact(acts[clip.source], clip.alpha, clip.beta):
            return False
        acts[name] = on_codes.derived(clip.source, acts[clip.source], clip.alpha, clip.beta)
        report.activation_rows.append(act_ranges.on_codes_row(name, acts[name], acts[clip.source],
                                                              stream.values[clip.source], stream.values[name]))
        return True

    deferred: list[str] = []  # hard sigmoids whose input is new too but sorts after them
    for name in sorted(placement.calibrated - set(acts)):
        if name not in stream.values:
            continue
        if name in codes and codes[name].source not in acts and codes[name].source in stream.values:
            deferred.append(name)  # decided below; the others' random streams stay numbered in sorted order
        elif not on_its_input_codes(name):
            choose(name, len(set(acts) - placement.constants) + len(deferred))
    for name in deferred:
        if not on_its_input_codes(name):
            choose(name, len(set(acts) - placement.constants))
    for name, source in sorted(placement.shared.items()):
        if name not in acts and source in acts:
            acts[name] = replace(acts[source], codes_of=None, clip=None)  # its own QDQ pair on that grid


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def quantize(model, calibration, options: Options | None = None, **kwargs) -> tuple[onnx.ModelProto, Report]:
    """Quantize ``model`` (path or ModelProto) with GPFQ on ``calibration`` data.

    calibration: a .npz path, an iterable of {input: array} batches, or a CalibrationDataReader.
    options: an Options, or its fields as keyword arguments.
    Returns the quantized model (checked with onnx.checker and run once in onnxruntime) and the report.
    """
    if options is None:
        options = Options(**kwargs)
    elif kwargs:
        raise TypeError("pass either options or keyword options, not both")
    with blas_workers_sleep(), limit_threads(options.threads):  # capture and NumPy products take turns on the cores
        return _quantize(model, calibration, options)


def _quantize(model, calibration, options: Options) -> tuple[onnx.ModelProto, Report]:
    start = time.perf_counter()
    source = model if isinstance(model, (str, os.PathLike)) else None  # named in onnxruntime's load errors
    model, specialised = fix_inputs(load_model(model), options.fix_inputs)
    base = normalise(model, min_opset=required_opset(options), source=source)
    batches = load_batches(calibration, model_inputs(base), options.batch_size, batch_axes=dict(options.batch_axes),
                           input_shapes=dict(options.input_shapes), images=options.images, seed=options.seed,
                           lazy=True)
    first_batch = {name: np.array(as_array(a)) for name, a in batches[0].items()}  # its own copy, not a view
    mask_name, masks = token_masks(options.token_mask, batches, model_inputs(base), dict(options.batch_axes))
    check_runs(base, first_batch, str(source) if source is not None else "the model", options.threads)
    base, smoothed = smooth.smooth(base, batches, options)  # --smooth: before anything reads the graph
    graph = base.graph

    targets, skipped = find_targets(graph)
    options.check_patterns([(t.node, t.op_type) for t in targets])
    skipped += [Skipped(t.node, t.op_type, "excluded by --exclude / config") for t in targets
                if options.is_excluded(t.node, t.op_type)]
    targets = [t for t in targets if not options.is_excluded(t.node, t.op_type)]
    if not targets:
        raise UserError(f"nothing to quantize: the model has no {'/'.join(OPS)} layer with a constant weight"
                        + (f" ({len(skipped)} left in float: {skipped[0].reason})" if skipped else ""))
    steps.check_weights_finite(targets, GraphIndex(graph))
    plans = {t.key: plan_layer(t, options) for t in targets}
    add_domains(base, plans)

    padded = 1.0 - float(np.mean(np.concatenate([m.reshape(-1) for m in masks]))) if masks else 0.0
    report = Report(skipped=skipped, calibration_samples=sum(next(iter(b.values())).shape[0] for b in batches),
                    options=_jsonable(options), fixed_inputs=specialised.fixed, inlined_ifs=specialised.inlined,
                    smoothed=smoothed, target=options.target, token_mask=mask_name, padded_fraction=padded,
                    bounded_layers=sum(1 for plan in plans.values() if plan.spec.pair_bound))
    with tempfile.TemporaryDirectory(prefix="onnx_gpfq_spill_") as spill_dir:
        spill = Spill(options.memory_budget, spill_dir)
        try:
            held = inputs(batches, spill)
            del batches  # held (or spilled) once for both streams now
            float_stream = Stream(held, base, threads=options.threads, spill=spill)
            quant_stream = Stream(held, base, threads=options.threads, spill=spill)
            del held
            out = _quantize_layers(base, targets, plans, options, report, float_stream, quant_stream, first_batch, masks)
        finally:
            spill.close()
        _record_target(out, options.target)
        report.spilled_bytes = spill.spilled_bytes
        report.peak_held_bytes = spill.peak_in_memory
    validate(out, first_batch, options.threads)
    report.seconds = time.perf_counter() - start
    return out, report


def _quantize_layers(base: onnx.ModelProto, targets: list[Layer], plans: dict[str, LayerPlan], options: Options,
                     report: Report, float_stream: Stream, quant_stream: Stream, first_batch: dict,
                     masks: list[np.ndarray] | None = None) -> onnx.ModelProto:
    """Layer by layer in topological order: capture X and X~, run GPFQ, rewrite; the output model.
    masks: per calibration batch, (samples, tokens) True at real tokens (``calib.token_masks``), or None."""
    graph = base.graph
    weight_only = {t.node for t in targets if plans[t.key].weight_only or not t.INT8_KERNEL}
    # onnxruntime's QLinear kernels between layers are 8-bit only: 16-bit activations (all or some, --act-bits
    # auto) keep the minimal placement
    kind = options.act_placement if options.act_bits == 8 else "minimal"
    if kind == "integer" and options.act_bits:
        on_codes.fold_hardswish(graph)  # x * Clip(x + 3, 0, 6) / 6 and HardSwish -> x * HardSigmoid(x)
    placement = place(graph, targets, weight_only, kind) if options.act_bits else Placement()
    prepare(graph, placement)  # integer Add/Mul read copies of their constants, Div by a constant -> Mul
    index = GraphIndex(graph)
    quant_acts = placement.calibrated
    if options.act_bits == "auto":  # measured once, on the float model, before any range is set
        report.promotions = mixed.choose(base, quant_acts, first_batch, targets, options)
    wide = {p.tensor for p in report.promotions if p.promoted}
    integer_input = {t.node for t in targets if t.x in placement.tensors and t.node not in weight_only}
    scoring = act_ranges.scoring_layers(graph, targets, integer_input)
    float_read = act_ranges.read_in_float(graph, targets, integer_input)
    acts: dict[str, ActQuant] = {c: act_quant_from_range(index.array(c).min(), index.array(c).max(), 8, options.act_symmetric)
                                 for c in sorted(placement.constants)}  # fixed: their values are known
    layers: dict[str, QuantizedLayer] = {}
    by_weight: dict[str, QuantizedLayer] = {}
    moments_cache: dict[tuple, core.Moments] = {}

    progress = _progress(len(targets), options.quiet)
    try:  # the bar is closed (and its line cleared) on errors too
        for k, t in enumerate(targets):
            progress.set_postfix_str(t.node[-40:], refresh=False)
            layer_start = time.perf_counter()
            plan = plans[t.key]
            spec = plan.spec
            bits = str(options.layer(t.node, t.op_type).weight_bits)
            if t.w in by_weight:  # a weight shared by several nodes: quantized once, at its first use
                first = by_weight[t.w]
                layers[t.key] = QuantizedLayer(t, first.codes, first.scale, None, first.block_size, first.fmt)
                report.layers.append(LayerReport(t.key, t.op_type, t.graph_shape or t.w_shape, bits, spec.granularity, spec.scale_rule,
                                                 float("nan"), float("nan"), float("nan"), float(np.mean(first.codes == 0)),
                                                 f"shared with {first.target.node}", 0, 0.0))
                progress.update()
                continue
            extra = [e for e in t.extra_inputs if e and e not in index.initializers]
            float_stream.advance(list(graph.node), index.initializers, [t.x, *extra], quant_acts)
            _observe_new(placement, acts, float_stream, options, report, scoring, index, wide, float_read)
            nodes_q, inits_q = rewrite.apply(graph, layers, acts)
            x_tilde = t.x if t.node in weight_only else read_name(t.x, acts, index.graph_outputs)
            quant_stream.advance(nodes_q, inits_q, [x_tilde, *extra])
            if t.OWN_OUTPUT is None:
                xs, xts = float_stream.values[t.x], quant_stream.values[x_tilde]
            else:  # rows from the node's own output: run it once more, W quantized in the X~ network
                xs = _own_output(float_stream, list(graph.node), index.initializers, t)
                xts = _own_output(quant_stream, nodes_q, inits_q, t)

            W = t.to_matrix(index.array(t.w).astype(np.float64))
            # With a pair bound, GPFQ walks the fan-in in the order the int8 kernel adds it up in pairs.
            order = _kernel_order(t) if spec.pair_bound else None
            if order is not None:
                W = W[:, order, :]
            key = (t.patch_key, order is not None)
            moments, held_out = moments_cache.get(key, (None, None))
            if moments is None:
                shared = k + 1 < len(targets) and targets[k + 1].patch_key == t.patch_key
                moments, held_out = _accumulate(t, xs, xts, W, spec, options, k, may_project=not shared, order=order,
                                                extras=(_extras(float_stream, index, t), _extras(quant_stream, index, t)),
                                                masks=masks)
                moments_cache = {key: (moments, held_out)}  # consecutive layers reading the same rows share them
            if t.OWN_OUTPUT is not None:  # the node's own output, read into the Moments: given back
                float_stream.spill.release_all(xs)
                quant_stream.spill.release_all(xts)
            if options.damp == "rows":
                spec = replace(spec, damp=core.rows_damp(moments.m, W.shape[1]))
            if held_out is not None:
                fit, X_h, Xt_h = held_out
                result, chosen, _ = core.quantize_layer_held_out(
                    W, fit, spec, X_h, Xt_h, full=moments,
                    damps=core.DAMP_CANDIDATES if options.damp == "auto" else (spec.damp,),
                    upstreams=core.UPSTREAM_CANDIDATES if options.upstream == "auto" else None)
            else:
                result, chosen = core.quantize_layer(W, moments, spec), spec
            if order is not None:
                result = replace(result, codes=result.codes[:, np.argsort(order), :])

            bias = _corrected_bias(t, index, result)  # None where the layer's spec has no correction
            block = plan.block_size
            scale = onnx_scale(t, result.scale, spec.granularity)
            if not block and t.x in acts and (bias is not None or t.b):  # zero channels: keep the int32 bias exact
                scale = steps.zero_channel_steps(result.codes, scale, bias if bias is not None else index.array(t.b),
                                                 acts[t.x].scale)
            steps.check_steps(t.node, scale, result.C)
            layers[t.key] = by_weight[t.w] = QuantizedLayer(
                t, t.from_matrix(result.codes).astype(np.int8), scale, bias, block, plan.fmt)
            report.layers.append(LayerReport(
                t.key, t.op_type, t.graph_shape or t.w_shape, bits, spec.granularity + (f":{block}" if block else ""), spec.scale_rule,
                float(np.median(result.C)), float(result.rel_error), float(result.rel_error_rtn), float(result.sparsity),
                result.form, int(moments.m), time.perf_counter() - layer_start, chosen.damp, chosen.upstream))
            progress.update()
    finally:
        progress.close()

    # Activation tensors after the last quantized layer (e.g. its output) are calibrated on the
    # float network too: run what is left of it once.
    remaining = sorted(quant_acts - set(acts))  # (shared tensors follow their sources)
    if remaining:
        float_stream.advance(list(graph.node), index.initializers, remaining, quant_acts)
        _observe_new(placement, acts, float_stream, options, report, scoring, index, wide, float_read)

    nodes, inits = rewrite.apply(graph, layers, acts)
    report.activations = len(acts) - len(placement.constants)
    model_weights = model_weight_bytes(graph)
    report.model_weight_bytes = sum(model_weights.values())
    report.float_weight_bytes = sum(model_weights.get(w, _tensor_bytes(index.initializers[w])) for w in by_weight)
    report.quant_weight_bytes = sum(q.fmt.stored_bytes(q.codes) for q in by_weight.values())
    return rewrite.build_model(base, nodes, inits)


def _jsonable(options: Options) -> dict:
    def conv(v):
        if isinstance(v, (int, float, bool, str, type(None))):
            return v
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return vars(v) if hasattr(v, "__dict__") else str(v)

    return {k: conv(v) for k, v in vars(options).items()}


def _kernel_order(t: Layer) -> np.ndarray | None:
    """The layer's kernel reduction order (Layer.kernel_order), or None where it is W's own row order."""
    order = t.kernel_order()
    return None if np.array_equal(order, np.arange(order.size)) else order


def _own_output(stream: Stream, nodes: list[onnx.NodeProto], inits: dict, t: Layer):
    """Output ``t.OWN_OUTPUT`` of the target's own node over all batches (Batches kept under the
    stream's Spill), computed from the stream's frontier without running the node for good (its
    weights are not all quantized yet)."""
    nodes = list(nodes)
    i = next(i for i, n in enumerate(nodes) if n.name == t.node)
    node = onnx.NodeProto()
    node.CopyFrom(nodes[i])
    name = node.output[t.OWN_OUTPUT] or f"{t.node}_output_{t.OWN_OUTPUT}"
    node.output[t.OWN_OUTPUT] = name
    nodes[i] = node
    return stream.peek(nodes, inits, name)


def _extras(stream: Stream, index: GraphIndex, t: Layer):
    """Batch -> the values of ``t.extra_inputs`` (None for an absent input, constants as they are)."""
    def at(b: int) -> list:
        return [None if not e else index.array(e) if e in index.initializers else stream.values[e][b]
                for e in t.extra_inputs]

    return at


def _accumulate(t: Layer, xs, xts, W: np.ndarray, spec: core.QuantSpec, options: Options, k: int,
                may_project: bool, order: np.ndarray | None = None, extras=None,
                masks=None) -> tuple[core.Moments, tuple[core.Moments, np.ndarray, np.ndarray] | None]:
    """The Moments of layer ``t`` (weights W (g, N0, N1g)) over all calibration batches, same
    rows in both streams; with --damp auto or --upstream auto also (the Moments without the held-out rows, X_h, X~_h):
    the held-out rows, each (g, m_h, N0), are a seeded eighth of every batch's rows (HELD_OUT); else
    None. Where X~ still equals X (nothing quantized upstream) the rows are passed once; Moments are
    projected on W where that is cheaper and no other layer reads them. order: a permutation of the N0
    columns of X (W's rows already come in that order). masks: see ``_row_plan``."""
    shapes = xs.shapes() if hasattr(xs, "shapes") else [x.shape for x in xs]  # spilled batches stay on disk
    positions, keep = _row_plan(t, shapes, options, k, masks)
    m = sum(len(idx) for idx in keep)
    groups, n0, n1 = W.shape
    x, xt = xs[0], xts[0]
    same = np.array_equal(x, xt)
    project = may_project and not same and core.projection_pays(m, n0, n1, groups)
    passes = core.search_passes(spec, m, n0, n1, groups)
    form = core.choose_form(m, n0, n1, groups, passes=passes, projected=project)
    moments = core.Moments(groups, n0, form, W=W if project and form == "gram" else None, rows=m)
    held = [] if "auto" in (options.damp, options.upstream) else None
    fit = core.Moments(groups, n0, form, W=moments.W, rows=m) if held is not None else None  # without the held-out rows
    for b, (pos, idx) in enumerate(zip(positions, keep)):
        if b > 0:
            x, xt = xs[b], xts[b]
            same = np.array_equal(x, xt)

        def rows_of(a, stream):
            r = t.rows(a, pos, *(extras[stream](b) if extras else ()))
            r = r[:, idx] if len(idx) < r.shape[1] else r
            return r if order is None else np.ascontiguousarray(r[..., order])

        rows = rows_of(x, 0)
        rows_t = rows if same else rows_of(xt, 1)
        moments.update(rows, rows_t)
        if held is not None:
            out = np.random.default_rng([options.seed, k, b, 1]).random(rows.shape[1]) < HELD_OUT
            out[:1] &= not out.all()  # every batch keeps a row for the fit
            held.append((rows[:, out], rows_t[:, out]))
            fit.update(rows[:, ~out], rows_t[:, ~out])
    if not held or not sum(h[0].shape[1] for h in held):
        return moments, None
    return moments, (fit, np.concatenate([h[0] for h in held], axis=1), np.concatenate([h[1] for h in held], axis=1))


HELD_OUT = 0.125  # --damp / --upstream auto: the share of a layer's rows held out of its fit, to choose on


def _row_plan(t: Layer, shapes: list[tuple[int, ...]], options: Options, k: int,
              masks: list[np.ndarray] | None = None) -> tuple[list, list[np.ndarray]]:
    """Which rows of X layer ``t`` (the k-th) accumulates, per batch: (positions, keep).

    positions[b]: per-sample patch positions for ``Layer.rows`` (None: all). Each sample gets
    min(max_patches, max_rows // samples) of them (at least one). keep[b]: indices into the rows
    that batch yields; with token masks (per batch (samples, tokens), True at real tokens) only
    the rows at real tokens, where the layer's rows are tokens of that mask (``Layer.row_tokens``);
    when they exceed max_rows, a seeded uniform subset of max_rows rows over all batches. Seeded by
    (seed, k, batch), so both streams use the same rows and the output does not depend on anything else.
    """
    samples = sum(t.samples(shape) for shape in shapes)
    per_sample = max(1, min(options.max_patches, options.max_rows // max(samples, 1)))
    positions = [t.positions(shape, per_sample, np.random.default_rng([options.seed, k, b]))
                 for b, shape in enumerate(shapes)]
    counts = [p.size if p is not None else t.samples(shape) * t.rows_per_sample(shape)
              for p, shape in zip(positions, shapes)]
    rows = [np.arange(c) for c in counts]
    if masks is not None:
        tokens = [t.row_tokens(shape, p) for shape, p in zip(shapes, positions)]
        if all(tok is not None and m.shape == tuple(shape[:2]) for tok, m, shape in zip(tokens, masks, shapes)):
            real = [np.flatnonzero(m.reshape(-1)[tok]) for tok, m in zip(tokens, masks)]
            if sum(r.size for r in real):  # (no real token among the sampled rows: keep them all)
                rows = real
    total = sum(r.size for r in rows)
    if total <= options.max_rows:
        return positions, rows
    chosen = np.sort(np.random.default_rng([options.seed, k]).choice(total, options.max_rows, replace=False))
    edges = np.cumsum([0] + [r.size for r in rows])
    return positions, [r[chosen[(chosen >= lo) & (chosen < hi)] - lo] for r, lo, hi in zip(rows, edges[:-1], edges[1:])]


def _corrected_bias(t: Layer, index: GraphIndex, result) -> np.ndarray | None:
    """b' = b + mu_X^T W - mu_X~^T Q in the bias's ONNX shape, or None when the layer's bias
    cannot carry the correction (``Layer.bias_correction``)."""
    if result.bias_delta is None:
        return None
    delta = t.bias_correction(result.bias_delta.reshape(-1))
    if delta is None:
        return None
    base = index.array(t.b).astype(np.float64) if t.b else np.zeros(t.n_out)
    return (base + delta.reshape(base.shape)).astype(np.float32)


def validate(model: onnx.ModelProto, batch: dict[str, np.ndarray], threads: int = 0) -> None:
    """The output must pass the full ONNX checker and run in onnxruntime."""
    data = serialize(model)
    if data is None:  # over 2 GiB: check and load it from disk, as it will be saved
        with tempfile.TemporaryDirectory(prefix="onnx_gpfq_validate_") as tmp:
            path = os.path.join(tmp, "model.onnx")
            save_model(model, path, external_data=True)
            onnx.checker.check_model(path, full_check=True)
            outputs = runtime.session(path, threads).run(None, batch)
    else:
        onnx.checker.check_model(data, full_check=True)
        outputs = runtime.session(data, threads).run(None, batch)
    for out in outputs:
        if isinstance(out, np.ndarray) and out.dtype.kind == "f" and not np.isfinite(out).all():
            raise RuntimeError("the quantized model produces NaN/Inf on the calibration data")


class _NoProgress:
    def set_postfix_str(self, *a, **k): ...
    def update(self, *a): ...
    def close(self): ...


def _progress(total: int, quiet: bool):
    if quiet:
        return _NoProgress()
    from tqdm import tqdm

    class Bar(tqdm):
        # no monitor thread: tqdm keeps it for the life of the process, and a live thread makes
        # _threads.blas_workers_sleep leave OpenBLAS alone (it could be inside a product)
        monitor_interval = 0

    return Bar(total=total, desc="quantizing", unit="layer", file=sys.stderr, leave=False, dynamic_ncols=True)
