"""Declared parameters of reward functions: their types, parsing and checks.

A reward term carries its parameters as text (``map<string, string>`` in the
proto). Each reward function declares the parameters it accepts as
:class:`ParamSpec` values; :func:`parse_params` turns a term's text values
into typed Python values (defaults filled in) or into field violations.

Types:

* ``"str"``   -- any text, passed on unchanged.
* ``"int"``   -- an optionally signed decimal integer (``"12"``, ``"-3"``).
* ``"float"`` -- a finite decimal number (``"0.5"``, ``"1e-3"``).
* ``"bool"``  -- ``true``/``false``, ``1``/``0`` or ``yes``/``no``
  (case-insensitive).

``minimum``/``maximum`` bound ``int`` and ``float`` values (inclusive);
``choices`` limits a ``str`` parameter to the listed values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

PARAM_TYPES = ("str", "int", "float", "bool")

_INT_RE = re.compile(r"[+-]?[0-9]+")
# Any integer of at most this many digits fits an int64; Python refuses to
# read much longer digit strings (and is slow at it).
MAX_INT_DIGITS = 18
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a reward function accepts.

    ``default`` is the default as text (parsed like a given value); None
    means there is no static default. A parameter without a default that is
    not ``required`` is simply absent from the keyword arguments when not
    given (a builtin may then fall back to a request field).
    """

    name: str
    description: str
    type: str = "str"
    default: str | None = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("parameter name must be a non-empty string")
        if self.type not in PARAM_TYPES:
            raise ValueError(f"parameter {self.name!r}: type must be one of {', '.join(PARAM_TYPES)}")
        if self.required and self.default is not None:
            raise ValueError(f"parameter {self.name!r}: a required parameter has no default")
        if self.choices and self.type != "str":
            raise ValueError(f"parameter {self.name!r}: only a str parameter has choices")
        if self.default is not None:
            _, problem = self.parse(self.default)
            if problem is not None:
                raise ValueError(f"parameter {self.name!r}: default {self.default!r} {problem}")

    def expectation(self) -> str:
        """What a valid value looks like, as the end of an error message."""
        lo, hi = self.minimum, self.maximum
        if self.type == "int":
            if lo is not None and hi is None and lo == 1:
                return "must be a positive integer"
            if lo is not None and hi is None and lo == 0:
                return "must be a non-negative integer"
            what = "an integer"
        elif self.type == "float":
            what = "a finite number"
        elif self.type == "bool":
            return "must be true or false"
        elif self.choices:
            return "must be one of: " + ", ".join(self.choices)
        else:
            return "must be text"
        if lo is not None and hi is not None:
            return f"must be {what} between {_fmt(lo)} and {_fmt(hi)}"
        if lo is not None:
            return f"must be {what} >= {_fmt(lo)}"
        if hi is not None:
            return f"must be {what} <= {_fmt(hi)}"
        return f"must be {what}"

    def parse(self, text: str) -> tuple[Any, str | None]:
        """(value, None) when ``text`` is valid, else (None, problem)."""
        if self.type == "str":
            if self.choices and text not in self.choices:
                return None, self.expectation()
            return text, None
        raw = text.strip()
        if self.type == "bool":
            low = raw.lower()
            if low in _TRUE:
                return True, None
            if low in _FALSE:
                return False, None
            return None, self.expectation()
        value: int | float
        if self.type == "int":
            if not _INT_RE.fullmatch(raw):
                return None, self.expectation()
            if len(raw.lstrip("+-")) > MAX_INT_DIGITS:
                return None, f"{self.expectation()} of at most {MAX_INT_DIGITS} digits"
            value = int(raw)
        else:
            try:
                value = float(raw)
            except ValueError:
                return None, self.expectation()
            if not math.isfinite(value):
                return None, self.expectation()
        if self.minimum is not None and value < self.minimum:
            return None, self.expectation()
        if self.maximum is not None and value > self.maximum:
            return None, self.expectation()
        return value, None


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


def param_field(term_index: int, name: str) -> str:
    """The field path of one parameter of ``rewards[term_index]``."""
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'rewards[{term_index}].params["{escaped}"]'


def parse_params(
    reward_name: str,
    specs: tuple[ParamSpec, ...],
    given: Mapping[str, str],
    term_index: int,
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Typed keyword arguments for one term, and its field violations.

    Unknown names, missing required parameters and unparsable values are
    violations; a default fills in every absent parameter that has one.
    """
    by_name = {spec.name: spec for spec in specs}
    values: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for name in sorted(given):
        spec = by_name.get(name)
        if spec is None:
            accepted = ", ".join(sorted(by_name)) or "none"
            problems.append(
                (param_field(term_index, name), f"unknown parameter of reward '{reward_name}' (accepted: {accepted})")
            )
            continue
        value, problem = spec.parse(given[name])
        if problem is not None:
            problems.append((param_field(term_index, name), problem))
        else:
            values[name] = value
    for spec in specs:
        if spec.name in given:
            continue
        if spec.required:
            problems.append((param_field(term_index, spec.name), f"required by reward '{reward_name}'"))
        elif spec.default is not None:
            values[spec.name], _ = spec.parse(spec.default)
    return values, problems


def param_spec_from_declaration(entry: Any) -> ParamSpec:
    """A :class:`ParamSpec` from a plugin's declaration (a ParamSpec or a mapping).

    Mapping keys: ``name`` (required), ``description``, ``type``, ``default``,
    ``required``, ``minimum``, ``maximum``, ``choices`` (a sequence of text); a
    non-text default is converted with ``str`` (booleans as ``true``/``false``).
    """
    if isinstance(entry, ParamSpec):
        return entry
    if not isinstance(entry, Mapping):
        raise ValueError(f"a parameter declaration must be a mapping or ParamSpec, not {type(entry).__name__}")
    unknown = set(entry) - {"name", "description", "type", "default", "required", "minimum", "maximum", "choices"}
    if unknown:
        raise ValueError(f"unknown keys in parameter declaration: {', '.join(sorted(map(str, unknown)))}")
    choices = entry.get("choices", ())
    if isinstance(choices, (str, bytes)) or not isinstance(choices, Iterable):
        raise ValueError("choices must be a sequence of text values")
    default = entry.get("default")
    if isinstance(default, bool):
        default = "true" if default else "false"
    elif default is not None:
        default = str(default)
    return ParamSpec(
        name=str(entry.get("name", "")),
        description=str(entry.get("description", "")),
        type=str(entry.get("type", "str")),
        default=default,
        required=bool(entry.get("required", False)),
        minimum=None if entry.get("minimum") is None else float(entry["minimum"]),
        maximum=None if entry.get("maximum") is None else float(entry["maximum"]),
        choices=tuple(str(choice) for choice in choices),
    )
