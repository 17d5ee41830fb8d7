"""Command line: ``onnx-gpfq quantize`` and ``onnx-gpfq evaluate``.

User errors print one line on stderr and exit 2 (``--debug`` shows the traceback); a failed
CI-gate threshold in ``evaluate`` exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from . import __version__
from .errors import UserError
from .formats import FORMATS

EXAMPLES = """examples:
  onnx-gpfq quantize models/digits_cnn.onnx -o cnn.w4a8.onnx --calib models/digits_calib.npz
  onnx-gpfq evaluate models/digits_cnn.onnx cnn.w4a8.onnx --data models/digits_test.npz --max-accuracy-drop 1
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        raise UserError(f"{self.prog}: {message} (see --help)")


def _bits(value: str):
    from .options import parse_weight_bits

    return parse_weight_bits(value)


def _act_bits(value: str):
    if value.lower() == "none":
        return None
    if value in ("8", "16"):
        return int(value)
    raise UserError(f"--act-bits must be 8, 16 or none (got {value!r})")


def build_parser() -> argparse.ArgumentParser:
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
    q.add_argument("--input-shape", action="append", default=[], metavar="NAME:DIMS",
                   help="shape for random data where the model's is symbolic, e.g. input:1x3x224x224 (repeatable)")
    q.add_argument("--batch-axis", action="append", default=[], metavar="NAME:AXIS",
                   help="the axis samples are stacked on for input NAME (default 0), or NAME:none for an input "
                   "with no batch axis (fed whole to every run, e.g. a sample rate) (repeatable)")
    q.add_argument("--fix-input", action="append", default=[], metavar="NAME=VALUE",
                   help="specialise the model for this input value (a number, or V1,V2,... for a small 1-D input) "
                   "before quantizing: Ifs it decides are inlined, and the input leaves the output model's "
                   "interface (repeatable; also 'fix_inputs' in --config)")
    q.add_argument("--image-size", metavar="HxW", help="images: size fed to the model (default: the model's fixed H, W)")
    q.add_argument("--image-resize", choices=["crop", "stretch"], default="crop",
                   help="images: resize the shorter side and center-crop, or stretch (default: crop)")
    q.add_argument("--image-scale", type=float, default=1 / 255, help="images: pixel scale before mean/std (default: 1/255)")
    q.add_argument("--image-mean", default="0,0,0", metavar="R,G,B", help="images: per-channel mean (default: 0,0,0)")
    q.add_argument("--image-std", default="1,1,1", metavar="R,G,B", help="images: per-channel std (default: 1,1,1)")
    q.add_argument("--image-channels", choices=["RGB", "BGR"], default="RGB", help="images: channel order (default: RGB)")
    q.add_argument("--image-layout", choices=["NCHW", "NHWC"], default="NCHW", help="images: tensor layout (default: NCHW)")
    q.add_argument("--weight-bits", type=_bits, default=4, metavar="{2..8,ternary}",
                   help="weight bit width; ternary = levels {-1,0,1} x step (default: 4)")
    q.add_argument("--act-bits", type=_act_bits, default=8, metavar="{8,16,none}",
                   help="activation bits (asymmetric uint8/uint16 unless --act-symmetric), or none for weight-only "
                   "(default: 8; 16 needs opset 21, the model is upgraded)")
    q.add_argument("--act-symmetric", action="store_true", help="symmetric int8/int16 activations (zero point 0)")
    q.add_argument("--act-calibration", choices=["minmax", "percentile", "mse"], default="minmax",
                   help="activation range: full min-max, clipped at --percentile, or the clip minimising the "
                   "quantization MSE (default: minmax)")
    q.add_argument("--percentile", type=float, default=99.99, help="percentile for --act-calibration percentile (default: 99.99)")
    q.add_argument("--method", choices=["gpfq", "rtn"], default="gpfq",
                   help="gpfq: greedy path-following with error feedback; rtn: round to nearest, the baseline (default: gpfq)")
    q.add_argument("--seed", type=int, default=0, help="seed for patch subsampling (default: 0)")
    q.add_argument("--granularity", choices=["channel", "tensor", "block"], default="channel",
                   help="one weight step per output channel, per layer, or per block of --block-size fan-in rows "
                   "(block: MatMul/Gemm layers; Conv layers stay per channel) (default: channel)")
    q.add_argument("--block-size", type=int, default=32, help="fan-in rows per block for --granularity block (default: 32)")
    q.add_argument("--weight-format", choices=list(FORMATS), default="int8",
                   help="int8: codes in int8 containers, runs on int8 kernels; int4: packed INT4 with opset-21 "
                   "DequantizeLinear; matmulnbits: 2-D MatMul weights as com.microsoft MatMulNBits (4-bit, "
                   "block-wise) (default: int8)")
    q.add_argument("--scale-rule", choices=["search", "fixed"], default="search",
                   help="step = C * max|w| / K; search: C minimising each channel's exact output error; "
                   "fixed: C given by --c (default: search)")
    q.add_argument("--full-search", action="store_true",
                   help="--scale-rule search: one pass per C of the grid (12) on every layer, also on large layers "
                   "where the default goes coarse to fine (6)")
    q.add_argument("--c", type=float, default=1.0, help="C for --scale-rule fixed (default: 1.0)")
    q.add_argument("--sparsity", default=None, metavar="{soft,hard}:LAMBDA",
                   help="sparsity-promoting thresholding with absolute threshold LAMBDA (default: off)")
    q.add_argument("--bias-correction", action="store_true", help="add the mean output shift back to each bias")
    q.add_argument("--full-range", action="store_true", help="use the full two's-complement range [-2^(b-1), 2^(b-1)-1]")
    q.add_argument("--batch-size", type=int, default=32, help="calibration samples per onnxruntime run (default: 32)")
    q.add_argument("--max-patches", type=int, default=256,
                   help="rows of X sampled per calibration sample and layer (conv patches, tokens) (default: 256)")
    q.add_argument("--max-rows", type=int, default=4096,
                   help="rows of X per layer over all calibration samples; beyond it fewer patches per sample, "
                   "then a seeded subset (default: 4096)")
    q.add_argument("--memory-budget", default="1G", metavar="SIZE",
                   help="captured activations kept in memory (e.g. 512M, 2G, none); beyond it they spill to "
                   ".npy files in a temporary folder (read back one batch at a time, always removed) (default: 1G)")
    q.add_argument("--threads", type=int, default=0, metavar="N",
                   help="at most N threads for onnxruntime, numba and BLAS; the output does not depend on it "
                   "(default: 0, every core)")
    q.add_argument("--exclude", action="append", default=[], metavar="GLOB|OP",
                   help="leave nodes in float: a node-name glob or an op type (repeatable)")
    q.add_argument("--config", metavar="FILE", help="JSON or TOML per-layer overrides: "
                   '{"exclude": [GLOB...], "layers": [{"match": GLOB|OP, "weight_bits": .., "method": .., '
                   '"granularity": .., "block_size": .., "scale_rule": .., "c": .., "exclude": bool}]}; '
                   "a pattern matching no layer is an error")
    q.add_argument("--external-data", action="store_true",
                   help="store tensors in OUT.onnx.data beside the model (automatic above 2 GiB)")
    q.add_argument("--report", metavar="FILE.json", help="also write the per-layer report as JSON")
    q.add_argument("--quiet", action="store_true", help="no progress bar and no report table")
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
    from .graph import check_output_path, save_model
    from .calib import ImageOptions
    from .options import (Options, load_config, load_config_fix_inputs, parse_batch_axis, parse_input_shape, parse_size,
                          parse_sparsity)
    from .specialise import parse_fix_input
    from .quantize import quantize

    check_output_path(args.output, [args.model] + ([args.calib] if not args.calib.startswith("random:") else []))
    if args.report:
        check_output_path(args.report, [args.model, args.calib, args.output])
    rules, config_exclude = load_config(args.config) if args.config else ((), ())
    images = ImageOptions(size=_hw(args.image_size) if args.image_size else None, resize=args.image_resize,
                          scale=args.image_scale, mean=_floats(args.image_mean, "--image-mean"),
                          std=_floats(args.image_std, "--image-std"), channels=args.image_channels, layout=args.image_layout)
    options = Options(
        weight_bits=args.weight_bits, act_bits=args.act_bits, method=args.method, seed=args.seed,
        granularity=args.granularity, block_size=args.block_size, scale_rule=args.scale_rule, c=args.c, full_search=args.full_search,
        sparsity=parse_sparsity(args.sparsity), bias_correction=args.bias_correction, full_range=args.full_range,
        weight_format=args.weight_format, act_symmetric=args.act_symmetric, act_calibration=args.act_calibration,
        percentile=args.percentile, batch_size=args.batch_size, max_patches=args.max_patches, max_rows=args.max_rows,
        memory_budget=parse_size(args.memory_budget), threads=args.threads,
        exclude=tuple(args.exclude) + config_exclude, rules=rules, quiet=args.quiet, images=images,
        batch_axes=tuple(parse_batch_axis(v) for v in args.batch_axis),
        input_shapes=tuple(parse_input_shape(v) for v in args.input_shape),
        fix_inputs=dict((load_config_fix_inputs(args.config) if args.config else ())
                        + tuple(parse_fix_input(v) for v in args.fix_input)),  # the command line wins
    )
    model, report = quantize(args.model, args.calib, options)
    save_model(model, args.output, external_data=args.external_data)
    if args.report:
        from .graph import write_text

        write_text(args.report, json.dumps(report.to_dict(), indent=2, default=_json_default) + "\n")
    if not args.quiet:
        print(report.table(), file=sys.stderr)
    return 0


def _hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h > 0 and w > 0:
            return h, w
    except ValueError:
        pass
    raise UserError(f"--image-size must look like 224x224 (got {text!r})")


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} must be comma-separated numbers (got {text!r})") from None


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def _cmd_evaluate(args) -> int:
    from .evaluate import Thresholds, check_thresholds, evaluate

    metrics = evaluate(args.float_model, args.models, args.data, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"models": [_finite(vars(m)) for m in metrics]}))
    else:
        print(f"{'model':40s} {'accuracy':>9s} {'agree':>7s} {'SQNR dB':>8s} {'ms/batch':>9s} {'speedup':>8s} {'size KiB':>9s}")
        for m in metrics:
            acc = "-" if m.accuracy is None else f"{m.accuracy:.4f}"
            sqnr = "-" if m.sqnr_db is None else f"{m.sqnr_db:.2f}"
            print(f"{m.path[-40:]:40s} {acc:>9s} {m.agreement:7.4f} {sqnr:>8s} {m.latency_ms:9.3f} {m.speedup:8.2f} {m.size_bytes / 1024:9.1f}")
    reason = check_thresholds(metrics, Thresholds(args.min_accuracy, args.max_accuracy_drop, args.min_agreement, args.min_sqnr))
    if reason:
        print(f"onnx-gpfq: threshold failed: {reason}", file=sys.stderr)
        return 1
    return 0


def _cmd_inspect(args) -> int:
    from .graph import load_model
    from .inspection import inspect

    info = inspect(load_model(args.model), args.model)
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
    return 0


def _finite(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return 2
        return {"quantize": _cmd_quantize, "evaluate": _cmd_evaluate, "inspect": _cmd_inspect}[args.command](args)
    except UserError as exc:
        if debug:
            raise
        print(f"onnx-gpfq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnx-gpfq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the user's fault: still one line unless --debug
        if debug:
            raise
        print(f"onnx-gpfq: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
