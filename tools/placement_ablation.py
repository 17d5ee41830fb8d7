"""What each op kind of ``--act-placement integer`` buys in deployed latency: the model quantized with
the integer placement, with the minimal one, and with the integer placement less one op kind at a time
(onnx_gpfq.placement's INTEGER_OPS / PASSTHROUGH_OPS, patched in this process only) and without the
constant operands (CONSTANT_OPERAND_OPS), then every
variant timed interleaved by tools/latency.py's method (one thread, one sample per run, median over
rounds). Placement does not depend on the weight method, so RTN W8A8 on a few calibration samples
builds the graphs quickly. Prints JSON.

    python tools/placement_ablation.py MODEL.onnx --data INPUTS.npz [--calib 4] [--rounds 7] [--samples 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from latency import measure  # noqa: E402
from _real_models.report import cpu_flags  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--data", required=True, help=".npz of model inputs, samples stacked on axis 0")
    ap.add_argument("--calib", type=int, default=4, help="calibration samples (the first of --data)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args(argv)
    for p in (args.model, args.data):
        if not os.path.isfile(p):
            print(f"placement_ablation: no such file: {p}", file=sys.stderr)
            return 2
    import onnx_gpfq  # noqa: PLC0415
    from onnx_gpfq import placement  # noqa: PLC0415
    from onnx_gpfq.graph import normalise  # noqa: PLC0415
    from onnx_gpfq.inspection import optimised_ops  # noqa: PLC0415
    from onnx_gpfq.ops import find_targets  # noqa: PLC0415

    with np.load(args.data, allow_pickle=False) as d:
        arrays = {k: d[k] for k in d.files}
    calib = {k: v[:args.calib] for k, v in arrays.items()}
    integer_ops, passthrough_ops = placement.INTEGER_OPS, placement.PASSTHROUGH_OPS
    constant_ops = placement.CONSTANT_OPERAND_OPS
    variants = [("integer", "integer", None), ("minimal", "minimal", None),
                ("integer without constant operands", "integer", "constants")]
    variants += [(f"integer without {op}", "integer", op) for op in integer_ops + passthrough_ops]
    with tempfile.TemporaryDirectory(prefix="placement_ablation_") as work:
        paths, built, placements, skipped = [], {}, [], {}
        base = normalise(onnx.load(args.model))
        graph = base.graph
        targets, _ = find_targets(graph)
        weight_only = {t.node for t in targets if not t.INT8_KERNEL}  # as quantize decides it for int8 weights
        for label, kind, without in variants:
            placement.INTEGER_OPS = tuple(o for o in integer_ops if o != without)
            placement.PASSTHROUGH_OPS = tuple(o for o in passthrough_ops if o != without)
            placement.CONSTANT_OPERAND_OPS = () if without == "constants" else constant_ops
            where = placement.place(graph, targets, weight_only, kind)
            same = next((other for other, w in placements if w == where), None)
            if same is not None:  # e.g. the model has no such op between layers
                skipped[label] = same
                continue
            placements.append((label, where))
            model, report = onnx_gpfq.quantize(args.model, calib, method="rtn", weight_bits=8, act_bits=8,
                                               act_placement=kind, quiet=True)
            path = os.path.join(work, f"v{len(paths)}.onnx")
            onnx_gpfq.save_model(model, path)
            ops = Counter(n.op_type for n in optimised_ops(model))
            built[label] = {"activation_tensors": report.activations, "optimised_ops": dict(sorted(ops.items()))}
            paths.append(path)
        placement.INTEGER_OPS, placement.PASSTHROUGH_OPS = integer_ops, passthrough_ops
        placement.CONSTANT_OPERAND_OPS = constant_ops
        times = measure(paths, arrays, args.rounds, args.samples)
    for (label, info), path in zip(built.items(), paths):
        info.update({k: times[path][k] for k in ("median_ms", "min_ms", "ratio_to_first")})
    import onnxruntime  # noqa: PLC0415

    print(json.dumps({"model": args.model, "cpu": cpu_flags(), "cores": os.cpu_count(),
                      "onnxruntime": onnxruntime.__version__, "rounds": args.rounds, "variants": built,
                      "same_placement_as": skipped}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
