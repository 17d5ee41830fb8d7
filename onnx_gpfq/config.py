"""Per-layer configuration (``--config FILE``): rules that override the weight options of the
layers whose node name matches a glob or whose op type equals ``match``.

Rules apply in order, a later rule overriding an earlier one. Every key's type is checked exactly
(a bool is not an integer, "false" is not a bool); the values are checked with the options.
"""

from __future__ import annotations

import fnmatch
import json
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path

from .choices import parse_weight_bits
from .errors import UserError

# the exact type of each config-rule key (bool is not an int, "false" is not a bool)
RULE_TYPES = {"match": (str,), "weight_bits": (int, str), "method": (str,), "granularity": (str,),
              "block_size": (int,), "scale_rule": (str,), "c": (int, float), "exclude": (bool,)}


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


RULE_KEYS = {f.name for f in fields(LayerRule)}


def load_config(path: str | Path) -> tuple[tuple[LayerRule, ...], tuple[str, ...]]:
    """Read a JSON or TOML config: ``{"exclude": [globs], "layers": [{"match": ..., overrides}],
    "fix_inputs": {name: value}}``.

    Returns (rules, exclude); ``fix_inputs`` is read by ``load_config_fix_inputs``. Bad syntax, unknown
    keys or bad values are a UserError.
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
        for key, value in entry.items():
            if type(value) not in RULE_TYPES[key] or (type(value) is float and not math.isfinite(value)):
                names = " or ".join({"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false"}[t.__name__]
                                    for t in RULE_TYPES[key])
                raise UserError(f"config file {path}: layers[{i}].{key} must be {names} (got {json.dumps(value)})")
        if "weight_bits" in entry:
            entry = dict(entry, weight_bits=parse_weight_bits(entry["weight_bits"]))
        rules.append(LayerRule(**entry))
    return tuple(rules), tuple(exclude)


def load_config_fix_inputs(path: str | Path) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """The config's ``fix_inputs = {sr = 16000}`` as ``Options.fix_inputs`` pairs."""
    from .specialise import parse_fix_inputs

    fixed = _read_config(Path(path)).get("fix_inputs", {})
    if not isinstance(fixed, dict) or not all(type(v) in (int, float, list) for v in fixed.values()):
        raise UserError(f"config file {path}: 'fix_inputs' must be a table of input name = number (or list of numbers)")
    return parse_fix_inputs(fixed)


def _read_config(path: Path) -> dict:
    """The config file's top-level object (JSON or TOML), its keys checked."""
    if not path.is_file():
        raise UserError(f"config file not found (or not a regular file): {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        parse, syntax_error = tomllib.loads, tomllib.TOMLDecodeError
        describe = lambda exc: f"is not valid TOML: {exc}"  # noqa: E731
    else:
        parse, syntax_error = json.loads, json.JSONDecodeError
        describe = lambda exc: f"is not valid JSON: {exc.msg} at line {exc.lineno}"  # noqa: E731
    try:
        data = parse(text)
    except syntax_error as exc:
        raise UserError(f"config file {path} {describe(exc)}") from None
    except RecursionError:
        raise UserError(f"config file {path} is nested too deeply") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold an object with 'layers' and/or 'exclude'")
    unknown = set(data) - {"layers", "exclude", "fix_inputs"}
    if unknown:
        raise UserError(f"config file {path}: unknown key(s) {', '.join(sorted(unknown))} "
                        "(allowed: layers, exclude, fix_inputs)")
    return data
