"""All options of a quantization run: one frozen dataclass, validated once, passed down.

Per-layer control: ``LayerRule``s (from ``--config FILE``) override the weight options of the
layers whose node name matches a glob or whose op type equals ``match``; rules apply in order, a
later rule overriding an earlier one. A rule (or ``--exclude`` entry) that matches no layer is an
error, so a typo never passes silently.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .calib import ImageOptions
from .errors import UserError
from .formats import FORMATS
from .gpfq import Alphabet, QuantSpec, Sparsity

WEIGHT_BITS = ("2", "3", "4", "5", "6", "7", "8", "ternary")
METHODS = ("gpfq", "rtn")
GRANULARITIES = ("channel", "tensor", "block")
SCALE_RULES = ("search", "fixed")
WEIGHT_FORMATS = tuple(FORMATS)  # the registry in formats/
ACT_BITS = (8, 16, None)
ACT_CALIBRATIONS = ("minmax", "percentile", "mse")


def parse_weight_bits(value: str | int) -> int | str:
    """'4' -> 4, 'ternary' -> 'ternary'; anything else is a UserError."""
    text = str(value).strip().lower()
    if text not in WEIGHT_BITS:
        raise UserError(f"--weight-bits must be one of {', '.join(WEIGHT_BITS)} (got {value!r})")
    return text if text == "ternary" else int(text)


def parse_sparsity(value: str | None) -> Sparsity | None:
    """'soft:0.01' / 'hard:0.01' -> Sparsity; None or 'none' -> None."""
    if value is None or str(value).lower() == "none":
        return None
    kind, _, lam = str(value).partition(":")
    try:
        lam_value = float(lam)
    except ValueError:
        lam_value = -1.0
    if kind not in ("soft", "hard") or not lam_value >= 0:
        raise UserError(f"--sparsity must look like soft:LAMBDA or hard:LAMBDA with LAMBDA >= 0 (got {value!r})")
    return Sparsity(kind, lam_value)


def parse_size(value: str) -> int | None:
    """'512M' / '2G' / '1500000' -> bytes; 'none' -> None (no limit)."""
    text = str(value).strip().upper()
    if text == "NONE":
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    factor = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        size = float(number) * factor
    except ValueError:
        raise UserError(f"--memory-budget must be a size like 512M or 2G, or none (got {value!r})") from None
    if size < 0:
        raise UserError(f"--memory-budget must not be negative (got {value!r})")
    return int(size)


def parse_input_shape(value: str) -> tuple[str, tuple[int, ...]]:
    """'input:1x3x224x224' -> ('input', (1, 3, 224, 224))."""
    name, _, dims = str(value).rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
    except ValueError:
        shape = ()
    if not name or not shape or min(shape) < 1:
        raise UserError(f"--input-shape must look like NAME:1x3x224x224 (got {value!r})")
    return name, shape


def parse_batch_axis(value: str) -> tuple[str, int | None]:
    """'state:1' -> ('state', 1); 'sample_rate:none' -> ('sample_rate', None)."""
    name, _, axis = str(value).rpartition(":")
    if not name or not (axis.lower() == "none" or axis.isdigit()):
        raise UserError(f"--batch-axis must look like NAME:AXIS or NAME:none (got {value!r})")
    return name, None if axis.lower() == "none" else int(axis)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(str(c) for c in choices)} (got {value!r})")


@dataclass(frozen=True)
class LayerRule:
    """Overrides for the layers matching ``match`` (a node-name glob, or an op type). None = keep."""

    match: str
    weight_bits: int | str | None = None
    method: str | None = None
    granularity: str | None = None
    block_size: int | None = None
    scale_rule: str | None = None
    c: float | None = None
    exclude: bool = False

    def matches(self, node: str, op_type: str) -> bool:
        return self.match == op_type or fnmatch.fnmatchcase(node, self.match)


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
      point 0 instead of asymmetric uint8/uint16. act_calibration: "minmax", "percentile" (clip at
      the given percentile of each tail) or "mse" (clip range minimising the fake-quant error).
    max_patches: conv patches / tokens (rows of X) sampled per calibration sample and layer.
    max_rows: rows of X per layer over the whole calibration set (after max_patches): beyond it each
      sample gets fewer patches (at least one), then a seeded subset of rows is kept. Bounds the
      cost of the Gram accumulation and of the residual form, and their memory, independently of
      the number of calibration samples.
    memory_budget: bytes of captured activations (both streams) kept in memory; beyond it they go
      to .npy files in a temporary folder, read back one batch at a time. None: no limit.
    batch_size: calibration samples per onnxruntime run.
    exclude: node-name globs or op types left in float. rules: per-layer overrides (--config).
    batch_axes: (input, axis) pairs for inputs whose samples are not stacked on axis 0 (axis None:
      no batch axis, fed whole to every run). input_shapes: (input, dims) for random data.
    fix_inputs: (input, values) pairs: the graph is specialised for these values before anything
      else and the inputs leave its interface (``specialise.fix_inputs``).
    images: preprocessing when the calibration source is a folder of images.
    threads: at most this many threads for onnxruntime, numba and BLAS (0: every core); the output
      does not depend on it.
    """

    weight_bits: int | str = 4
    act_bits: int | None = 8
    method: str = "gpfq"
    seed: int = 0
    granularity: str = "channel"
    block_size: int = 32
    scale_rule: str = "search"
    c: float = 1.0
    c_grid: tuple[float, ...] | None = None  # None: the core's default grid
    full_search: bool = False  # one pass per C of the grid on every layer (default: coarse to fine on large layers)
    sparsity: Sparsity | None = None
    bias_correction: bool = False
    full_range: bool = False
    weight_format: str = "int8"
    act_symmetric: bool = False
    act_calibration: str = "minmax"
    percentile: float = 99.99
    batch_size: int = 32
    max_patches: int = 256
    max_rows: int = 4096
    memory_budget: int | None = 1 << 30
    exclude: tuple[str, ...] = field(default_factory=tuple)
    rules: tuple[LayerRule, ...] = field(default_factory=tuple)
    batch_axes: tuple[tuple[str, int | None], ...] = ()
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    fix_inputs: tuple[tuple[str, tuple[float, ...]], ...] = ()  # also a {name: value} dict
    images: ImageOptions | None = None
    threads: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight_bits", parse_weight_bits(self.weight_bits))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "fix_inputs", parse_fix_inputs(self.fix_inputs))
        if isinstance(self.act_bits, str):
            text = self.act_bits.strip().lower()
            object.__setattr__(self, "act_bits", None if text == "none" else int(text) if text.isdigit() else text)
        if self.act_bits not in ACT_BITS:
            raise UserError(f"--act-bits must be 8, 16 or none (got {self.act_bits!r})")
        _check_choice("--method", self.method, METHODS)
        _check_choice("--granularity", self.granularity, GRANULARITIES)
        _check_choice("--scale-rule", self.scale_rule, SCALE_RULES)
        _check_choice("--weight-format", self.weight_format, WEIGHT_FORMATS)
        _check_choice("--act-calibration", self.act_calibration, ACT_CALIBRATIONS)
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise UserError(f"--seed must be a non-negative integer (got {self.seed!r})")
        if not self.c > 0:
            raise UserError(f"the step-size constant C must be > 0 (got {self.c!r})")
        if not 50.0 < self.percentile <= 100.0:
            raise UserError(f"--percentile must be in (50, 100] (got {self.percentile!r})")
        for name in ("batch_size", "max_patches", "max_rows", "block_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer (got {value!r})")
        if not (isinstance(self.threads, int) and not isinstance(self.threads, bool) and self.threads >= 0):
            raise UserError(f"--threads must be a non-negative integer (0: every core) (got {self.threads!r})")
        if self.memory_budget is not None and not (isinstance(self.memory_budget, int) and self.memory_budget >= 0):
            raise UserError(f"--memory-budget must be a size like 512M or 2G (got {self.memory_budget!r})")
        if self.full_range and self.weight_bits == "ternary":
            raise UserError("--full-range does not apply to ternary weights")
        if self.sparsity is not None and not isinstance(self.sparsity, Sparsity):
            raise UserError("sparsity must be a Sparsity (use parse_sparsity('soft:0.01'))")
        for rule in self.rules:
            self._layer_options(rule_overrides=(rule,))  # validates each rule's values

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
                                     ("scale_rule", layer.scale_rule, SCALE_RULES)):
            if value not in choices:
                raise UserError(f"{name} must be one of {', '.join(choices)} (got {value!r}){where}")
        if not (isinstance(layer.block_size, int) and layer.block_size >= 1):
            raise UserError(f"block_size must be a positive integer (got {layer.block_size!r}){where}")
        if not (isinstance(layer.c, (int, float)) and layer.c > 0):
            raise UserError(f"c must be a number > 0 (got {layer.c!r}){where}")
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
            bias_correction=self.bias_correction,
        )

    @property
    def alphabet(self) -> Alphabet:
        return Alphabet.from_bits(self.weight_bits, full_range=self.full_range)


RULE_KEYS = {f.name for f in fields(LayerRule)}


def load_config(path: str | Path) -> tuple[tuple[LayerRule, ...], tuple[str, ...]]:
    """Read a JSON or TOML config: ``{"exclude": [globs], "layers": [{"match": ..., overrides}]}``.

    Returns (rules, exclude). Bad syntax, unknown keys or bad values are a UserError. The config's
    ``fix_inputs`` table ({name: value}) is read by ``load_config_fix_inputs``.
    """
    path = Path(path)
    data = _read_config(path)
    exclude = data.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
        raise UserError(f"config file {path}: 'exclude' must be a list of strings")
    rules = []
    layers = data.get("layers", [])
    if not isinstance(layers, list):
        raise UserError(f"config file {path}: 'layers' must be a list of objects")
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict) or not isinstance(entry.get("match"), str):
            raise UserError(f"config file {path}: layers[{i}] must be an object with a string 'match'")
        bad = set(entry) - RULE_KEYS
        if bad:
            raise UserError(f"config file {path}: layers[{i}] has unknown key(s) {', '.join(sorted(bad))} "
                            f"(allowed: {', '.join(sorted(RULE_KEYS))})")
        if "weight_bits" in entry:
            entry = dict(entry, weight_bits=parse_weight_bits(entry["weight_bits"]))
        rules.append(LayerRule(**entry))
    return tuple(rules), tuple(exclude)


def _read_config(path: Path) -> dict:
    """The config file's top-level object (JSON, or TOML by suffix), its keys checked."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"config file {path} is not valid TOML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold an object with 'layers' and/or 'exclude'")
    unknown = set(data) - {"layers", "exclude", "fix_inputs"}
    if unknown:
        raise UserError(f"config file {path}: unknown key(s) {', '.join(sorted(unknown))} "
                        "(allowed: layers, exclude, fix_inputs)")
    return data


def load_config_fix_inputs(path: str | Path) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """The config's ``fix_inputs = {sr = 16000}`` as ``Options.fix_inputs`` pairs."""
    fixed = _read_config(Path(path)).get("fix_inputs", {})
    if not isinstance(fixed, dict):
        raise UserError(f"config file {path}: 'fix_inputs' must be a table of input name = value")
    return parse_fix_inputs(fixed)


def parse_fix_inputs(values) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """{name: scalar or list} or (name, value) pairs -> ((name, (values...)), ...), sorted by name."""
    pairs = values.items() if isinstance(values, dict) else values
    out = {}
    for name, value in pairs:
        try:
            flat = tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))
        except (TypeError, ValueError):
            raise UserError(f"fix_inputs[{name!r}] must be a number or a list of numbers (got {value!r})") from None
        if not flat:
            raise UserError(f"fix_inputs[{name!r}] is empty")
        out[str(name)] = flat
    return tuple(sorted(out.items()))
