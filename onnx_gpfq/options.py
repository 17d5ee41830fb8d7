"""All options of a quantization run: one frozen dataclass, validated once, passed down."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from .errors import UserError
from .gpfq import Alphabet, QuantSpec, Sparsity

WEIGHT_BITS = ("2", "3", "4", "5", "6", "7", "8", "ternary")
METHODS = ("gpfq", "rtn")
GRANULARITIES = ("channel", "tensor")
SCALE_RULES = ("search", "fixed")


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


@dataclass(frozen=True)
class Options:
    """Everything that decides the output model. Same options + same seed -> same bytes.

    weight_bits: 2..8 or "ternary" (levels {-1, 0, 1}); act_bits: 8, or None for weight-only.
    max_patches: conv patches (rows of X) sampled per calibration sample and layer.
    batch_size: calibration samples per onnxruntime run.
    exclude: node-name globs or op types left in float.
    """

    weight_bits: int | str = 4
    act_bits: int | None = 8
    method: str = "gpfq"
    seed: int = 0
    granularity: str = "channel"
    scale_rule: str = "search"
    c: float = 1.0
    sparsity: Sparsity | None = None
    bias_correction: bool = False
    full_range: bool = False
    batch_size: int = 32
    max_patches: int = 256
    exclude: tuple[str, ...] = field(default_factory=tuple)
    quiet: bool = False

    def __post_init__(self) -> None:
        parse_weight_bits(self.weight_bits)
        if self.act_bits not in (8, None):
            raise UserError(f"--act-bits must be 8 or none (got {self.act_bits!r})")
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"--granularity must be one of {', '.join(GRANULARITIES)} (got {self.granularity!r})")
        if self.scale_rule not in SCALE_RULES:
            raise UserError(f"--scale-rule must be one of {', '.join(SCALE_RULES)} (got {self.scale_rule!r})")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise UserError(f"--seed must be a non-negative integer (got {self.seed!r})")
        if not self.c > 0:
            raise UserError(f"the step-size constant C must be > 0 (got {self.c!r})")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise UserError(f"--batch-size must be a positive integer (got {self.batch_size!r})")
        if not (isinstance(self.max_patches, int) and self.max_patches >= 1):
            raise UserError(f"--max-patches must be a positive integer (got {self.max_patches!r})")
        if self.full_range and self.weight_bits == "ternary":
            raise UserError("--full-range does not apply to ternary weights")

    @property
    def alphabet(self) -> Alphabet:
        return Alphabet.from_bits(parse_weight_bits(self.weight_bits), full_range=self.full_range)

    def spec(self) -> QuantSpec:
        """The math core's per-layer spec for these options."""
        return QuantSpec(
            alphabet=self.alphabet,
            method=self.method,
            granularity=self.granularity,
            scale_rule=self.scale_rule,
            c=self.c,
            sparsity=self.sparsity,
            bias_correction=self.bias_correction,
        )

    def is_excluded(self, node_name: str, op_type: str) -> bool:
        return any(pattern == op_type or fnmatch.fnmatchcase(node_name, pattern) for pattern in self.exclude)
