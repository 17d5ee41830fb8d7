"""All options of a quantization run: one frozen dataclass, declared once, validated once, passed down.

Each field that the command line sets carries its flag, help and check in its metadata
(``opt(...)``); ``add_arguments`` generates the argparse options from them and ``__post_init__``
is the one place values are checked (command line, config rules and Python API alike). Choices are
the Enums of ``choices.py``. Per-layer control: ``LayerRule``s from ``--config`` (``config.py``);
a rule (or ``--exclude`` entry) that matches no layer is an error, so a typo never passes silently.
"""

from __future__ import annotations

import argparse
import fnmatch
from dataclasses import dataclass, fields, replace

from .calib import ImageOptions
from .choices import (ACT_BITS, ACT_CALIBRATIONS, C_RANGE, FLAG, FLAG_OR_NONE, GRANULARITIES, METHODS,  # noqa: F401
                      PLACEMENTS, POSITIVE, SCALE_RULES, WEIGHT_BITS, WEIGHT_FORMATS, Check, check_choice, choice,
                      is_int, is_number, opt, parse_act_bits, parse_batch_axis, parse_budget, parse_damp,
                      parse_input_shape, parse_size, parse_smooth, parse_sparsity, parse_upstream,
                      parse_weight_bits)  # the parsers and choice tuples stay importable from here
from .config import RULE_KEYS, RULE_TYPES, LayerRule, load_config, load_config_fix_inputs  # noqa: F401
from .errors import UserError
from .formats import FORMATS, RECURRENT_CHOICES
from .specialise import parse_fix_inputs
from .core import Alphabet, QuantSpec, Sparsity
from .cpu import TARGETS


@dataclass(frozen=True)
class LayerOptions:
    """The weight options one layer ends up with."""

    weight_bits: int | str
    method: str
    granularity: str
    block_size: int
    scale_rule: str
    c: float


@dataclass(frozen=True)
class Options:
    """Everything that decides the output model. Same model, data, options and seed -> same bytes.

    weight_bits: 2..8 or "ternary" (levels {-1, 0, 1}); 2 bits symmetric is ternary too.
    weight_format: "int8" (codes in int8 containers, runs on int8 kernels), "int4" (packed INT4
      initializers, opset-21 DequantizeLinear; needs <= 4 bits), "matmulnbits" (2-D MatMul weights as
      com.microsoft MatMulNBits, 4-bit, block-wise; other layers as int8).
    granularity: weight step per output "channel", per "tensor", or per "block" of block_size rows of
      the fan-in (MatMul/Gemm layers; Conv layers fall back to per channel).
    act_bits: 8 or 16 (activation QDQ), or None for weight-only. act_symmetric: int8/int16 with zero
      point 0 instead of asymmetric uint8/uint16. act_calibration: "auto" (the default:
      per tensor, the candidate of the rules below with the least error at the outputs of the layers
      reading it, ``act_ranges``), or one rule for every tensor: "minmax", "percentile" (clip at the
      given percentile of each tail), "mse" (clip range minimising the fake-quant error).
    act_bits "auto": 8 bits, with the tensors whose 8-bit quantization costs the model output most
      (measured, mixed.py) at 16; act16_budget: the fraction of the quantized activation tensors that
      may be promoted (a count: floor(budget x tensors)).
    smooth: "auto" (the default: SmoothQuant-style migration, strength per tensor by the consumers'
      8-bit output error, smooth.py), "off", or a fixed strength alpha in (0, 1].
    damp: the ridge of QuantSpec.damp (0: none), or "auto": per layer the one of core.DAMP_CANDIDATES
      whose codes, fitted without an eighth of the layer's rows, give the least output error on that
      eighth; the layer is then fitted on all its rows with it (``core.quantize_layer_held_out``); or
      "rows": core.FEW_ROWS_DAMP on the layers fitted on fewer rows than they have inputs, 0 elsewhere
      (``core.rows_damp``).
    upstream: QuantSpec.upstream, the share beta in [0, 1] of the error that quantization upstream leaves
      in a layer's input which its codes take back (1: GPFQ's path following; 0: only the layer's own
      rounding error), or "auto": per layer one of core.UPSTREAM_CANDIDATES, chosen like --damp auto
      (with --damp auto both at once, over every pair).
    max_patches: conv patches / tokens (rows of X) sampled per calibration sample and layer.
    max_rows: rows of X per layer over the whole calibration set (after max_patches): beyond it each
      sample gets fewer patches (at least one), then a seeded subset of rows is kept. Bounds the
      cost of the Gram accumulation and of the residual form, and their memory, independently of
      the number of calibration samples.
    memory_budget: bytes of captured activations (both streams) kept in memory; beyond it they go
      to one spill file in a temporary folder, read back one batch at a time. None: no limit.
    batch_size: calibration samples per onnxruntime run.
    exclude: node-name globs or op types left in float. rules: per-layer overrides (--config).
    batch_axes: (input, axis) pairs for inputs whose samples are not stacked on axis 0 (axis None:
      no batch axis, fed whole to every run). input_shapes: (input, dims) for random data.
    images: preprocessing when the calibration source is a folder of images.
    threads: at most this many threads for onnxruntime, numba and BLAS (0: every core); the output
      does not depend on it.
    token_mask: "auto" (the input named attention_mask, if the model has one with 0/1 calibration
      values), "none", or the name of a (samples, tokens) input whose zeros mark padded tokens: the
      rows of X that a MatMul forms at those tokens are left out of the rows GPFQ fits (and its
      step search) (``calib.token_masks``, ``Layer.row_tokens``). Activation ranges still see them.
    Text is accepted where the command line gives text: weight_bits "4", act_bits "none",
    sparsity "soft:0.01", memory_budget "512M", batch_axes ["state:1"], input_shapes ["x:1x3x8x8"].
    """

    weight_bits: int | str = opt(4, "weight bit width; ternary = levels {-1,0,1} x step", metavar="{2..8,ternary}")
    act_bits: int | str | None = opt(8, "activation bits (asymmetric uint8/uint16 unless --act-symmetric), or none for "
                                     "weight-only (16 needs opset 21, the model is upgraded); auto: 8, with the tensors "
                                     "whose 8-bit quantization costs the model output most (measured) at 16, within "
                                     "--act16-budget", metavar="{8,16,auto,none}")
    act16_budget: float = opt(0.05, "--act-bits auto: at most this fraction of the quantized activation tensors "
                              "(e.g. 5%%, 0.25) goes to 16 bits", metavar="FRACTION", cli_default="5%",
                              shown="5%%")
    method: str = opt("gpfq", "gpfq: greedy path-following with error feedback; rtn: round to nearest, the baseline",
                      check=choice(METHODS))
    seed: int = opt(0, "seed for patch subsampling", kind=int,
                    check=Check("int", low=0, high=2**63 - 1, text="a non-negative integer below 2^63"))
    granularity: str = opt("channel", "one weight step per output channel, per layer, or per block of --block-size "
                           "fan-in rows (block: MatMul/Gemm layers; Conv layers stay per channel)",
                           check=choice(GRANULARITIES))
    block_size: int = opt(32, "fan-in rows per block for --granularity block", kind=int, check=POSITIVE)
    scale_rule: str = opt("search", "step = C * max|w| / K; search: C minimising each channel's exact output error; "
                          "fixed: C given by --c", check=choice(SCALE_RULES))
    c: float = opt(1.0, "C for --scale-rule fixed", kind=float,
                   check=Check("number", low=C_RANGE[0], high=C_RANGE[1],
                               text=f"> 0: a number in [{C_RANGE[0]:g}, {C_RANGE[1]:g}]"))
    c_grid: tuple[float, ...] | None = opt(None, "", cli=False)  # None: the core's default grid
    full_search: bool = opt(False, "--scale-rule search: one pass per C of the grid (12) on every layer, also on large "
                            "layers where the default goes coarse to fine (6)", action="store_true", check=FLAG)
    sparsity: Sparsity | None = opt(None, "sparsity-promoting thresholding with absolute threshold LAMBDA",
                                    metavar="{soft,hard}:LAMBDA", shown="off")
    bias_correction: bool | None = opt(None, "add the mean output shift that quantization leaves (weights, activation "
                                       "clips) back to each bias: b' = b + mu_X^T W - mu_X~^T Q (with --upstream BETA: "
                                       "the mean of the error the codes were fitted to)",
                                       action=argparse.BooleanOptionalAction, check=FLAG_OR_NONE,
                                       shown="on for --method gpfq, off for rtn")
    damp: float | str = opt("rows", "ridge against fitting the calibration rows: GPFQ minimises ||XW - X~Q||^2 + "
                            "lam ||W - Q||^2, lam = DAMP x the mean ||X~_t||^2 of the layer's fan-in (0: off); auto: per "
                            "layer 0 or 1, whichever gives less output error on an eighth of its calibration rows held "
                            "out of two trial fits, then a fit on all rows with it (2-3x the time); rows: 1 on the layers "
                            "with fewer calibration rows than inputs (underdetermined fits), 0 elsewhere",
                            metavar="{auto,rows,DAMP}", shown="rows")
    upstream: float | str = opt(1.0, "share of the error that quantization upstream leaves in a layer's input which the "
                                "layer's weights take back: GPFQ fits X~Q to (X~ + BETA (X - X~)) W; 1: the paper's path "
                                "following, 0: only the layer's own rounding error; auto: per layer one of 0, 0.5, 1 by the "
                                "output error on an eighth of its rows held out of trial fits, as --damp auto",
                                metavar="{auto,BETA}", shown="1")
    full_range: bool = opt(False, "use the full two's-complement range [-2^(b-1), 2^(b-1)-1]", action="store_true",
                           check=FLAG)
    weight_format: str = opt("int8", "int8: codes in int8 containers, runs on int8 kernels; int4: packed INT4 with "
                             "opset-21 DequantizeLinear; matmulnbits: 2-D MatMul weights as com.microsoft MatMulNBits "
                             "(4-bit, block-wise)", check=Check("choice", FORMATS.keys()))  # the live registry
    recurrent_format: str = opt("auto", "how LSTM / GRU / RNN weights are stored: dynamic: an LSTM as com.microsoft "
                                "DynamicQuantizeLSTM (int8 W and R, input quantized at run time; other recurrent ops as "
                                "float32); float32: the dequantized values (no DequantizeLinear at run time, 4 bytes a "
                                "weight); qdq: as --weight-format stores them, through DequantizeLinear; auto: with 8-bit "
                                "activations dynamic for LSTM, else float32", check=choice(RECURRENT_CHOICES))
    act_symmetric: bool = opt(False, "symmetric int8/int16 activations (zero point 0)", action="store_true", check=FLAG)
    act_calibration: str = opt("auto", "activation range: full min-max, clipped at --percentile, the clip minimising "
                               "the quantization MSE, or auto: per tensor, the candidate (min-max, percentiles, MSE "
                               "clip) with the least error at the outputs of the layers reading it",
                               check=choice(ACT_CALIBRATIONS))
    smooth: str | float = opt("auto", "SmoothQuant-style migration of activation outliers into the weights of the "
                              "MatMul/Gemm layers reading a LayerNormalization or MatMul(+Add) output (exact in float): "
                              "auto picks the strength per tensor from 0 (off), 0.25, 0.5, 0.75, 1 by the layers' 8-bit "
                              "output error; a number in (0, 1] fixes it", metavar="{auto,off,ALPHA}")
    percentile: float = opt(99.99, "percentile for --act-calibration percentile (auto tries it too)", kind=float,
                            check=Check("number", low=50.0, high=100.0, text="in (50, 100]"))
    act_placement: str = opt("integer", "which activations get QDQ: integer also quantizes the ops between layers that "
                         "onnxruntime runs as integer kernels (Add, Mul, Concat, Sigmoid, pooling, Resize, "
                         "Reshape, ...) where they lead to another quantized layer; minimal only the layers' inputs, "
                         "Conv outputs and residual Adds (also what 16-bit activations get)", check=choice(PLACEMENTS))
    batch_size: int = opt(32, "calibration samples per onnxruntime run", kind=int, check=POSITIVE)
    max_patches: int = opt(256, "rows of X sampled per calibration sample and layer (conv patches, tokens)", kind=int,
                           check=POSITIVE)
    max_rows: int = opt(4096, "rows of X per layer over all calibration samples; beyond it fewer patches per sample, "
                        "then a seeded subset", kind=int, check=POSITIVE)
    memory_budget: int | None = opt(256 << 20, "captured activations kept in memory (e.g. 512M, 2G, none); beyond it "
                                    "they spill to one file in a temporary folder (read back one batch at a time, "
                                    "always removed)", metavar="SIZE", cli_default="256M")
    exclude: tuple[str, ...] = opt((), "leave nodes in float: a node-name glob or an op type (repeatable)",
                                   metavar="GLOB|OP", repeat=True)
    rules: tuple[LayerRule, ...] = opt((), "", cli=False)
    batch_axes: tuple[tuple[str, int | None], ...] = opt(
        (), "the axis samples are stacked on for input NAME (default 0), or NAME:none for an input with no batch axis "
        "(fed whole to every run, e.g. a sample rate) (repeatable)", flag="--batch-axis", metavar="NAME:AXIS", repeat=True)
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = opt(
        (), "shape for random data where the model's is symbolic, e.g. input:1x3x224x224 (repeatable)",
        flag="--input-shape", metavar="NAME:DIMS", repeat=True)
    images: ImageOptions | None = opt(None, "", cli=False)
    threads: int = opt(0, "at most N threads for onnxruntime, numba and BLAS; the output does not depend on it "
                       "(0: every core)", kind=int, metavar="N",
                       check=Check("int", low=0, high=4096, text="a non-negative integer (0: every core)"))
    fix_inputs: tuple[tuple[str, tuple[float, ...]], ...] = opt(
        (), "specialise the model for this input value (a number, or V1,V2,... for a small 1-D input) before "
        "quantizing: Ifs it decides are inlined, and the input leaves the output model's interface (repeatable; "
        "also 'fix_inputs' in --config)", flag="--fix-input", metavar="NAME=VALUE", repeat=True)
    token_mask: str = opt("auto", "model input whose zeros mark padded tokens, (samples, tokens) like a transformer's "
                          "attention mask: the rows of X that MatMul layers form at those tokens are left out of "
                          "the rows GPFQ fits (and its step search); "
                          "auto: the input named attention_mask where the model has one (with 0/1 values); none: every row",
                          metavar="{auto,none,INPUT}")
    target: str = opt("any", "CPUs whose onnxruntime int8 kernels must compute the model exactly: 'any' keeps 8-bit "
                      "weight codes within the pair bound of x86's saturating AVX2 kernels (no VNNI); 'x86-vnni', "
                      "'arm64', 'reference' (the QDQ math) leave them unconstrained", check=choice(tuple(TARGETS)))
    quiet: bool = opt(False, "no progress bar and no report table", action="store_true", check=FLAG)

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "weight_bits", parse_weight_bits(self.weight_bits))
        put(self, "act_bits", parse_act_bits(self.act_bits))
        put(self, "smooth", parse_smooth(self.smooth))
        put(self, "damp", parse_damp(self.damp))
        put(self, "upstream", parse_upstream(self.upstream))
        put(self, "act16_budget", parse_budget(self.act16_budget))
        if self.sparsity is None or isinstance(self.sparsity, str):
            put(self, "sparsity", parse_sparsity(self.sparsity))
        if isinstance(self.memory_budget, str):
            put(self, "memory_budget", parse_size(self.memory_budget))
        put(self, "exclude", tuple(self.exclude))
        put(self, "rules", tuple(self.rules))
        put(self, "batch_axes", tuple(parse_batch_axis(v) if isinstance(v, str) else v for v in self.batch_axes))
        put(self, "input_shapes", tuple(parse_input_shape(v) if isinstance(v, str) else v for v in self.input_shapes))
        put(self, "fix_inputs", parse_fix_inputs(self.fix_inputs))
        for f in fields(self):
            check, value = f.metadata.get("check"), getattr(self, f.name)
            if check is not None and not check.ok(value):
                name = "the step-size constant C" if f.name == "c" else _flag(f)
                if check.kind == "choice":
                    check_choice(name, value, check.choices)
                raise UserError(f"{name} must be {check.text} (got {value!r})")
        if self.c_grid is not None and not all(is_number(c) and C_RANGE[0] <= c <= C_RANGE[1] for c in self.c_grid):
            raise UserError(f"every C of c_grid must be a number in [{C_RANGE[0]:g}, {C_RANGE[1]:g}] (got {self.c_grid!r})")
        if not (isinstance(self.token_mask, str) and self.token_mask):
            raise UserError(f"--token-mask must be auto, none or a model input's name (got {self.token_mask!r})")
        if self.percentile == 50.0:
            raise UserError(f"--percentile must be in (50, 100] (got {self.percentile!r})")
        if self.memory_budget is not None and not (is_int(self.memory_budget) and self.memory_budget >= 0):
            raise UserError(f"--memory-budget must be a size like 512M or 2G (got {self.memory_budget!r})")
        if self.full_range and self.weight_bits == "ternary":
            raise UserError("--full-range does not apply to ternary weights")
        if self.sparsity is not None and not isinstance(self.sparsity, Sparsity):
            raise UserError("sparsity must be a Sparsity (use parse_sparsity('soft:0.01'))")
        if self.images is not None and not isinstance(self.images, ImageOptions):
            raise UserError("images must be an ImageOptions")
        for rule in self.rules:
            self._layer_options(rule_overrides=(rule,))  # validates each rule's values

    # --- the command line, generated from the fields ----------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One argparse option per field with a command-line declaration (and the image options)."""
        for owner in (cls, ImageOptions):
            for f in fields(owner):
                spec = f.metadata.get("cli")
                if not spec:
                    continue
                check = f.metadata.get("check")
                kwargs = {"help": spec["help"]}
                if spec["action"]:
                    kwargs["action"] = spec["action"]
                    if spec["action"] is argparse.BooleanOptionalAction:  # --X / --no-X, the default shown
                        kwargs.update(default=spec["cli_default"], help=f"{spec['help']} (default: {spec['shown']})")
                else:
                    if spec["repeat"]:
                        kwargs.update(action="append", default=[])
                    else:
                        kwargs["default"] = spec["cli_default"]
                        if spec["shown"] != "":
                            kwargs["help"] += f" (default: {spec['shown'] or spec['cli_default']})"
                    if spec["kind"]:
                        kwargs["type"] = spec["kind"]
                    metavar = spec["metavar"] or (f"{{{','.join(check.choices)}}}" if check and check.kind == "choice" else None)
                    if metavar:
                        kwargs["metavar"] = metavar
                parser.add_argument(_flag(f, owner), dest=_dest(f, owner), **kwargs)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **more) -> "Options":
        """The Options of a parsed command line; ``more`` adds or extends fields (exclude, rules)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if f.metadata.get("cli")}
        values["exclude"] = tuple(values["exclude"]) + tuple(more.pop("exclude", ()))
        values["fix_inputs"] = tuple(more.pop("fix_inputs", ())) + tuple(values["fix_inputs"])  # the command line wins
        images = {f.name: getattr(args, _dest(f, ImageOptions)) for f in fields(ImageOptions) if f.metadata.get("cli")}
        return cls(**values, images=ImageOptions(**images), **more)

    # --- per layer --------------------------------------------------------------------------
    def _layer_options(self, rule_overrides=()) -> LayerOptions:
        layer = LayerOptions(self.weight_bits, self.method, self.granularity, self.block_size, self.scale_rule, self.c)
        for rule in rule_overrides:
            changes = {f.name: getattr(rule, f.name) for f in fields(LayerOptions) if getattr(rule, f.name) is not None}
            layer = replace(layer, **changes)
        where = f" (config rule {rule_overrides[-1].match!r})" if rule_overrides else ""
        try:
            bits = parse_weight_bits(layer.weight_bits)
        except UserError as exc:
            raise UserError(f"{exc}{where}") from None
        for name, value, choices in (("method", layer.method, METHODS), ("granularity", layer.granularity, GRANULARITIES),
                                     ("scale_rule", layer.scale_rule, SCALE_RULES)):  # per rule: the same choices
            if value not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)} (got {value!r}){where}")
        if not (is_int(layer.block_size) and 1 <= layer.block_size < 2**31):
            raise UserError(f"block_size must be a positive integer (got {layer.block_size!r}){where}")
        if not (is_number(layer.c) and C_RANGE[0] <= layer.c <= C_RANGE[1]):
            raise UserError(f"c must be a number > 0 in [{C_RANGE[0]:g}, {C_RANGE[1]:g}] (got {layer.c!r}){where}")
        return replace(layer, weight_bits=bits)

    def layer(self, node: str, op_type: str) -> LayerOptions:
        """The weight options of one layer, after the config rules that match it."""
        return self._layer_options(tuple(r for r in self.rules if not r.exclude and r.matches(node, op_type)))

    def is_excluded(self, node: str, op_type: str) -> bool:
        if any(p == op_type or fnmatch.fnmatchcase(node, p) for p in self.exclude):
            return True
        return any(r.exclude and r.matches(node, op_type) for r in self.rules)

    def check_patterns(self, layers: list[tuple[str, str]]) -> None:
        """Every --exclude pattern and config rule must match at least one layer (node, op_type)."""
        for pattern in self.exclude:
            if not any(pattern == op or fnmatch.fnmatchcase(node, pattern) for node, op in layers):
                raise UserError(f"--exclude {pattern!r} matches no quantizable layer")
        for rule in self.rules:
            if not any(rule.matches(node, op) for node, op in layers):
                raise UserError(f"config rule {rule.match!r} matches no quantizable layer")

    def spec(self, layer: LayerOptions | None = None, use_blocks: bool = True) -> QuantSpec:
        """The math core's spec for one layer (default: the global options)."""
        layer = layer or self._layer_options()
        block = layer.granularity == "block" and use_blocks
        granularity = layer.granularity if layer.granularity != "block" else ("block" if use_blocks else "channel")
        return QuantSpec(
            alphabet=Alphabet.from_bits(layer.weight_bits, full_range=self.full_range),
            method=layer.method,
            granularity=granularity,
            group_size=layer.block_size if block else 0,
            scale_rule=layer.scale_rule,
            c=float(layer.c),
            **({"c_grid": tuple(self.c_grid)} if self.c_grid else {}),
            search="full" if self.full_search else "auto",
            sparsity=self.sparsity,
            # default: GPFQ's layers only; rounding's own steps, scored against the float output, shrink weights
            # and the correction then over-corrects (README, Bias correction)
            bias_correction=self.bias_correction if self.bias_correction is not None else layer.method == "gpfq",
            damp=0.0 if self.damp in ("auto", "rows") else float(self.damp),  # set per layer in quantize.py
            upstream=1.0 if self.upstream == "auto" else float(self.upstream),  # auto: UPSTREAM_CANDIDATES
        )


def _flag(f, owner=None) -> str:
    spec = f.metadata.get("cli") or {}
    prefix = "--image-" if owner is ImageOptions else "--"
    return spec.get("flag") or prefix + f.name.replace("_", "-")


def _dest(f, owner=None) -> str:
    return ("image_" if owner is ImageOptions else "") + f.name
