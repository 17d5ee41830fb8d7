"""Command line: ``onnx-gpfq quantize`` and ``onnx-gpfq evaluate``.

User errors print one line on stderr and exit 2 (``--debug`` shows the traceback); a failed
CI-gate threshold in ``evaluate`` exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys

from . import __version__
from .errors import UserError

EXAMPLES = """examples:
  onnx-gpfq quantize models/digits_cnn.onnx -o cnn.w4a8.onnx --calib models/digits_calib.npz
  onnx-gpfq evaluate models/digits_cnn.onnx cnn.w4a8.onnx --data models/digits_test.npz --max-accuracy-drop 1
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise UserError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    from .options import Options

    parser = _Parser(prog="onnx-gpfq", description="Post-training quantization of ONNX models with GPFQ "
                     "(greedy path-following quantization).", epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"onnx-gpfq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a model's Conv/Gemm/MatMul weights (and activations)",
                       description="Quantize every Conv/Gemm/MatMul weight of MODEL with GPFQ and write a QDQ model "
                       "that onnxruntime runs with integer kernels.")
    q.add_argument("model", metavar="MODEL.onnx", help="the float model to quantize (never modified)")
    q.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="where to write the quantized model")
    q.add_argument("--calib", required=True, metavar="DATA",
                   help="calibration data: a .npz with one array per model input, named after it, samples along "
                   "axis 0; a folder of .npz files, of .npy files (single-input models) or of images; or random:N "
                   "for N seeded random samples (a conversion check, not a calibration)")
    Options.add_arguments(q)  # every option of Options and of its image preprocessing, declared with its field
    q.add_argument("--config", metavar="FILE", help="JSON or TOML per-layer overrides: "
                   '{"exclude": [GLOB...], "layers": [{"match": GLOB|OP, "weight_bits": .., "method": .., '
                   '"granularity": .., "block_size": .., "scale_rule": .., "c": .., "exclude": bool}]}; '
                   "a pattern matching no layer is an error")
    q.add_argument("--external-data", action="store_true",
                   help="store tensors in OUT.onnx.data beside the model (automatic above 2 GiB)")
    q.add_argument("--report", metavar="FILE.json", help="also write the per-layer report as JSON")
    q.add_argument("--debug", action="store_true", help="show tracebacks")

    e = sub.add_parser("evaluate", help="compare models on a data set (and gate CI on thresholds)",
                       description="Accuracy (when the data has 'labels'), top-1 agreement and output SQNR against "
                       "the float model, latency per batch and size, for FLOAT and each QUANT model.")
    e.add_argument("float_model", metavar="FLOAT.onnx", help="the reference float model")
    e.add_argument("models", nargs="*", metavar="QUANT.onnx", help="models to compare with it")
    e.add_argument("--data", required=True, metavar="DATA.npz", help="inputs named after the model inputs, and optionally 'labels'")
    e.add_argument("--batch-size", type=int, default=64, help="samples per run (default: 64)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.add_argument("--min-accuracy", type=float, help="fail (exit 1) if a model's accuracy is below this (0..1)")
    e.add_argument("--max-accuracy-drop", type=float, help="fail if accuracy drops more than this many points vs float")
    e.add_argument("--min-agreement", type=float, help="fail if top-1 agreement with float is below this (0..1)")
    e.add_argument("--min-sqnr", type=float, help="fail if output SQNR vs float is below this (dB)")
    e.add_argument("--debug", action="store_true", help="show tracebacks")

    i = sub.add_parser("inspect", help="summarise a quantized model and check which layers run as integer kernels",
                       description="Per quantized layer: bits, granularity, format and scales; the model size; and, from "
                       "the graph onnxruntime's optimiser actually produces, how many layers run as integer kernels.")
    i.add_argument("model", metavar="MODEL.onnx", help="a quantized model")
    i.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    i.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _cmd_quantize(args) -> int:
    from .options import Options, load_config, load_config_fix_inputs
    from .outputs import write_outputs
    from .quantize import quantize

    _check_planned_files(args)
    rules, config_exclude = load_config(args.config) if args.config else ((), ())
    options = Options.from_args(args, exclude=config_exclude, rules=rules,
                                fix_inputs=load_config_fix_inputs(args.config) if args.config else ())
    model, report = quantize(args.model, args.calib, options)
    outputs = [(args.output, model, args.external_data)]
    if args.report:
        outputs.append((args.report, (json.dumps(report.to_dict(), indent=2, default=_json_default) + "\n").encode(), False))
    write_outputs(outputs)  # all or none
    if not args.quiet:
        print(report.table(), file=sys.stderr)
    return 0


def _check_planned_files(args) -> None:
    """Every file quantize will write against every file it reads and against each other, before any work."""
    import os

    from .graph import PROTOBUF_LIMIT
    from .paths import calibration_files, check_outputs, external_data_files

    data_files = external_data_files(args.model) if os.path.isfile(args.model) else []
    reads = [("input model", args.model)] + [("model's external data file", p) for p in data_files]
    reads += [("calibration file", p) for p in calibration_files(args.calib)]
    if args.config:
        reads.append(("config file", args.config))
    writes = [("-o", args.output)]
    input_bytes = sum(os.path.getsize(p) for _, p in reads[: 1 + len(data_files)] if os.path.isfile(p))
    if args.external_data or input_bytes > PROTOBUF_LIMIT // 2:  # the output may get its OUT.data
        writes.append(("-o's external data file", f"{args.output}.data"))
    if args.report:
        writes.append(("--report", args.report))
    check_outputs(writes, reads)


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _cmd_evaluate(args) -> int:
    from .evaluate import Thresholds, check_thresholds, evaluate, kernel_warnings

    thresholds = Thresholds(args.min_accuracy, args.max_accuracy_drop, args.min_agreement, args.min_sqnr)
    thresholds.check()
    metrics = evaluate(args.float_model, args.models, args.data, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"models": [_finite(vars(m) | {"kernel_loss_db": m.kernel_loss_db}) for m in metrics]}))
    else:
        print(f"{'model':40s} {'accuracy':>9s} {'agree':>7s} {'SQNR dB':>8s} {'ref dB':>7s} {'ms/batch':>9s} {'speedup':>8s} "
              f"{'size KiB':>9s}")
        for m in metrics:
            acc = "-" if m.accuracy is None else f"{m.accuracy:.4f}"
            sqnr = "-" if m.sqnr_db is None else f"{m.sqnr_db:.2f}"
            ref = "-" if m.sqnr_reference_db is None else f"{m.sqnr_reference_db:.2f}"
            print(f"{m.path[-40:]:40s} {acc:>9s} {m.agreement:7.4f} {sqnr:>8s} {ref:>7s} {m.latency_ms:9.3f} {m.speedup:8.2f} "
                  f"{m.size_bytes / 1024:9.1f}")
    for line in kernel_warnings(metrics):
        print(f"onnx-gpfq: warning: {line}", file=sys.stderr)
    reason = check_thresholds(metrics, thresholds)
    if reason:
        print(f"onnx-gpfq: threshold failed: {reason}", file=sys.stderr)
        return 1
    return 0


def _cmd_inspect(args) -> int:
    from .graph import constants_to_initializers, load_model
    from .inspection import inspect

    model = constants_to_initializers(load_model(args.model))
    try:
        info = inspect(model, args.model)
    except Exception as exc:
        if type(exc).__module__.startswith("onnxruntime"):  # the user's model, not ours, fails to load
            raise UserError(f"onnxruntime cannot load {args.model}: {_ort_line(exc, args.model)}") from None
        raise
    if args.json:
        print(json.dumps(info, default=_json_default))
        return 0
    print(f"{'layer':32s} {'op':6s} {'weight':>16s} {'bits':>7s} {'gran':>7s} {'format':>11s} {'scale min/median/max':>30s}")
    for layer in info["layers"]:
        shape = "x".join(str(d) for d in layer["weight_shape"])
        scales = f"{layer['scale_min']:.2e}/{layer['scale_median']:.2e}/{layer['scale_max']:.2e}"
        print(f"{layer['node'][-32:]:32s} {layer['op_type']:6s} {shape:>16s} {str(layer['bits']):>7s} "
              f"{layer['granularity']:>7s} {layer['format']:>11s} {scales:>30s}")
    print(f"model {info['model_bytes'] / 1024:.1f} KiB, initializers {info['initializer_bytes'] / 1024:.1f} KiB; "
          f"{info['integer_kernel_layers']}/{info['quantized_layers']} quantized layers run as integer kernels "
          f"(integer_kernel_fraction {info['integer_kernel_fraction']:.2f})")
    if info["float_layers"]:
        print("not on integer kernels: " + ", ".join(info["float_layers"]))
    print(f"this CPU: {info['int8_path_text']}; target {info['target'] or 'not recorded'}")
    if info["saturating_layers"]:
        print(f"{len(info['saturating_layers'])} layers have 8-bit codes beyond the pair bound of x86's AVX2 int8 kernels "
              "(wrong outputs on CPUs without VNNI; quantize with --target any): "
              + ", ".join(info["saturating_layers"][:5]) + (" ..." if len(info["saturating_layers"]) > 5 else ""))
    return 0


def _ort_line(exc: BaseException, user_path: str) -> str:
    """onnxruntime's first message line with the tool's temporary copies named as the user's file."""
    import re
    import tempfile

    from .errors import first_line

    line = first_line(exc)
    return re.sub(re.escape(tempfile.gettempdir()) + r"/onnx_gpfq_[^/\s]*/[^\s:]*", user_path, line)


def _finite(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    """The one boundary: expected failures (see errors.expected_failure) exit 2 with one line;
    Ctrl-C, SIGTERM and SIGHUP clean up (temporary files and folders) and exit 128 + signal;
    anything else is a bug: one line and exit 1 (``--debug`` shows the traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    previous = _catch_signals()
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return 2
        return {"quantize": _cmd_quantize, "evaluate": _cmd_evaluate, "inspect": _cmd_inspect}[args.command](args)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"onnx-gpfq: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except Exception as exc:
        from .errors import expected_failure

        if debug:
            raise
        message = expected_failure(exc)
        if message is not None:
            print(f"onnx-gpfq: error: {message}", file=sys.stderr)
            return 2
        print(f"onnx-gpfq: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _catch_signals() -> dict:
    """SIGTERM and SIGHUP raise Interrupted (a KeyboardInterrupt) while main runs, so they unwind
    like Ctrl-C. Only the main thread can install handlers; elsewhere nothing changes."""
    import threading

    from .errors import Interrupted

    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous[signum] = signal.signal(signum, handler)
    return previous


if __name__ == "__main__":
    sys.exit(main())
