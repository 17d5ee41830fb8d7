"""The choices of every option and the parsers of option text: declared once, used by the
``Options`` fields' metadata (and so by the generated command line), config rules and the API.

Each choice set is an Enum whose values are what the user types and what ``Options`` holds.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field
from enum import Enum
from typing import Any, Callable

from .errors import UserError
from .core import Sparsity
from .formats import FORMATS


class Method(str, Enum):
    GPFQ = "gpfq"
    RTN = "rtn"


class Granularity(str, Enum):
    CHANNEL = "channel"
    TENSOR = "tensor"
    BLOCK = "block"


class ScaleRule(str, Enum):
    SEARCH = "search"
    FIXED = "fixed"


class ActCalibration(str, Enum):
    AUTO = "auto"
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"


class ActPlacement(str, Enum):
    INTEGER = "integer"
    MINIMAL = "minimal"


class ImageResize(str, Enum):
    CROP = "crop"
    STRETCH = "stretch"


class ImageChannels(str, Enum):
    RGB = "RGB"
    BGR = "BGR"


class ImageLayout(str, Enum):
    NCHW = "NCHW"
    NHWC = "NHWC"


def values(choice: type[Enum]) -> tuple[str, ...]:
    return tuple(m.value for m in choice)


WEIGHT_BITS = ("2", "3", "4", "5", "6", "7", "8", "ternary")
METHODS = values(Method)
GRANULARITIES = values(Granularity)
SCALE_RULES = values(ScaleRule)
WEIGHT_FORMATS = tuple(FORMATS)  # the registry in formats/: a new format is a new module there
ACT_BITS = (8, 16, "auto", None)
ACT_CALIBRATIONS = values(ActCalibration)
PLACEMENTS = values(ActPlacement)
# C scales the step C * max|w| / K: below 1e-6 every code saturates, above 1e6 every code is 0 (the
# computed steps are checked too: finite and > 0 in float32)
C_RANGE = (1e-6, 1e6)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(str(c) for c in choices)} (got {value!r})")


@dataclass(frozen=True)
class Check:
    """What a value must be: one of ``choices``, or an int / a finite number in [low, high]."""

    kind: str  # "choice" | "int" | "number" | "bool" | "bool_or_none"
    choices: tuple = ()
    low: float = -math.inf
    high: float = math.inf
    text: str = ""  # how the message says it, e.g. "a positive integer"

    def ok(self, value) -> bool:
        if self.kind == "choice":
            return value in self.choices
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "bool_or_none":
            return value is None or isinstance(value, bool)
        good = is_int(value) if self.kind == "int" else is_number(value)
        return good and self.low <= value <= self.high


def opt(default: Any, help: str, *, check: Check | None = None, flag: str | None = None, metavar: str | None = None,
        kind: Callable | None = None, action: str | None = None, cli_default: Any = MISSING, repeat: bool = False,
        cli: bool = True, shown: str | None = None):
    """A dataclass field with its command-line declaration and its check. The help gets
    "(default: X)" added: X is ``shown``, else the command-line default; ``shown=""``: nothing added."""
    meta = {"check": check, "cli": cli and dict(help=help, flag=flag, metavar=metavar, kind=kind, action=action,
                                                  cli_default=default if cli_default is MISSING else cli_default,
                                                  repeat=repeat, shown=shown)}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def choice(values) -> Check:
    return Check("choice", tuple(values))


POSITIVE = Check("int", low=1, high=2**31 - 1, text="a positive integer below 2^31")
FLAG = Check("bool", text="True or False")
FLAG_OR_NONE = Check("bool_or_none", text="True, False or None")


def parse_act_bits(value) -> int | None:
    """8 / 16 / "auto" (8 with the costliest tensors at 16, see mixed.py) / None, also from text ('8', 'none')."""
    if isinstance(value, str):
        text = value.strip().lower()
        value = None if text == "none" else int(text) if text.isdigit() else text
    if value not in ACT_BITS or isinstance(value, bool):
        raise UserError(f"--act-bits must be 8, 16, auto or none (got {value!r})")
    return value


def parse_budget(value) -> float:
    """'5%' / 0.05 / '0.05' -> 0.05 (a fraction in [0, 1])."""
    text = str(value).strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        number = math.nan
    if isinstance(value, bool) or not 0.0 <= number <= 1.0:
        raise UserError(f"--act16-budget must be a fraction in [0, 1] or a percentage like 5% (got {value!r})")
    return number


def _word_or_number(value, words: tuple[str, ...], in_range, error: str) -> str | float:
    """One of ``words``, or a number (also as text) for which ``in_range`` holds; else UserError(error)."""
    text = str(value).strip().lower() if isinstance(value, str) else value
    if text in words:
        return text
    try:
        number = float(text) if not isinstance(text, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or not in_range(number):
        raise UserError(f"{error} (got {value!r})")
    return number


def parse_smooth(value) -> str | float:
    """'auto' / 'off' / a fixed migration strength alpha in (0, 1] (also as text)."""
    return _word_or_number(value, ("auto", "off"), lambda a: 0.0 < a <= 1.0, "--smooth must be auto, off or a number in (0, 1]")


def parse_damp(value) -> str | float:
    """'auto', 'rows' or a ridge weight in [0, 1e6] (also as text)."""
    return _word_or_number(value, ("auto", "rows"), lambda d: 0.0 <= d <= 1e6,
                           "--damp must be auto, rows or a number in [0, 1e6]")


def parse_upstream(value) -> str | float:
    """'auto' or the share beta in [0, 1] of the upstream error each layer takes back (also as text)."""
    return _word_or_number(value, ("auto",), lambda b: 0.0 <= b <= 1.0, "--upstream must be auto or a number in [0, 1]")


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
    if kind not in ("soft", "hard") or not (math.isfinite(lam_value) and lam_value >= 0):
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
        size = math.nan
    if not math.isfinite(size):
        raise UserError(f"--memory-budget must be a size like 512M or 2G, or none (got {value!r})")
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
