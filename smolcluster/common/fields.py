"""Typed fields from YAML: one checker for every config-like file (configs, topologies, profiles, faults).

A dataclass declares each field's type; `checked(...)` adds its range and the fix to suggest:

    @dataclass(frozen=True)
    class NNConfig:
        batch_size: int = checked(32, min=1, fix="use e.g. 32")
        gradient_clipping: float | None = checked(1.0, above=0, fix="use e.g. 1.0, or null to disable")

`parse_fields(NNConfig, raw, file)` then checks every key of the raw mapping against the type hints
(typing.get_type_hints): ints are whole numbers (not true/false), floats are finite numbers, bools
are true/false, strings are strings, `X | None` also takes null, `Literal[...]` one of its values;
then the range. Every failure is a ConfigError naming the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Union

from smolcluster.common.errors import ConfigError

# Seeds and counters go to numpy/torch generators, which take unsigned 64-bit values at most.
INT64_MAX = 2**63 - 1

# YAML 1.1 (PyYAML) reads 6e-4 as a string: it wants 6.0e-4. A float field takes either spelling.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 6, 6, 3


def shown(value: Any) -> str:
    """A value as an error message shows it: repr, cut short (a huge or deeply nested value stays one line)."""
    return _SHORT.repr(value)


@dataclass(frozen=True)
class Rule:
    """A field's range and the fix to suggest. Bounds are inclusive (min/max) or exclusive (above/below)."""

    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None
    unit: str = ""  # e.g. "seconds", shown after the bound
    fix: str = ""  # default: "use a value <bound>"

    def _bounds(self) -> list[tuple[str, Callable[[float], bool]]]:
        """(the bound in words, whether a value keeps it) for each bound that is set."""
        out: list[tuple[str, Callable[[float], bool]]] = []
        if self.above is not None:
            out.append((f"greater than {self.above:g}", lambda v: v > self.above))
        if self.min is not None:
            out.append((f"at least {self.min:g}", lambda v: v >= self.min))
        if self.below is not None:
            out.append((f"less than {self.below:g}", lambda v: v < self.below))
        if self.max is not None:
            out.append((f"at most {self.max:g}", lambda v: v <= self.max))
        return out

    def _with_unit(self, words: str) -> str:
        return f"{words} {self.unit}" if words and self.unit else words

    def bound(self) -> str:
        """Every bound, e.g. "greater than 0 and at most 604800 seconds" ("" when there is none)."""
        return self._with_unit(" and ".join(words for words, _ in self._bounds()))

    def violated(self, v: float) -> str:
        """The first bound `v` breaks, e.g. "greater than 0 seconds", or "" when it keeps them all."""
        return self._with_unit(next((words for words, keeps in self._bounds() if not keeps(v)), ""))


def checked(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **rule: Any) -> Any:
    """A dataclass field with a Rule in its metadata (see the module docstring)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"rule": Rule(**rule)})


def rule_of(f: dataclasses.Field) -> Rule:
    return f.metadata.get("rule", Rule())


# --------------------------------------------------------------------------- one value


def _members(hint: Any) -> tuple[Any, ...]:
    """The types of a union (`float | Literal["auto"]`), or the type itself."""
    return typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)


def _optional(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed) for `X | None` / Optional[X] (X may be a union)."""
    members = _members(hint)
    rest = tuple(a for a in members if a is not type(None))
    if len(rest) < len(members):
        return (rest[0] if len(rest) == 1 else Union[rest]), True
    return hint, False


def expected(hint: Any) -> str:
    """What a value of this type looks like, in words."""
    base, optional = _optional(hint)
    if len(_members(base)) > 1:
        words = " or ".join(expected(m) for m in _members(base))
    elif typing.get_origin(base) is Literal:
        choices = typing.get_args(base)
        words = str(choices[0]) if len(choices) == 1 else "one of " + ", ".join(str(c) for c in choices)
    else:
        words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(base, str(base))
    return words + (" or null" if optional else "")


def is_scalar(hint: Any) -> bool:
    base, _ = _optional(hint)
    return all(m in (int, float, bool, str) or typing.get_origin(m) is Literal for m in _members(base))


def _of_kind(hint: Any, value: Any) -> bool:
    """Whether `value` is the kind of value `hint` takes (a number for float, a string for a Literal of strings)."""
    if typing.get_origin(hint) is Literal:
        return any(type(value) is type(c) for c in typing.get_args(hint))
    if hint in (int, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def check_value(file: str | Path | None, key: str, value: Any, hint: Any, rule: Rule = Rule()) -> Any:
    """One value against a type hint and a rule; returns it converted (ints given for floats become floats)."""
    base, optional = _optional(hint)
    if value is None and optional:
        return None

    def wrong_type() -> ConfigError:
        return ConfigError(file, key, f"got {shown(value)}, expected {expected(hint)}",
                           rule.fix or f"set '{key.rsplit('.', 1)[-1]}' to {expected(hint)}")

    if len(_members(base)) > 1:  # e.g. float | Literal["auto"]: the member of the value's kind decides
        member = next((m for m in _members(base) if _of_kind(m, value)), None)
        if member is None or (typing.get_origin(member) is Literal and value not in typing.get_args(member)):
            raise wrong_type()
        return check_value(file, key, value, member, rule)

    if typing.get_origin(base) is Literal:
        if not any(value == c and type(value) is type(c) for c in typing.get_args(base)):
            raise ConfigError(file, key, f"got {shown(value)}", rule.fix or f"use {expected(hint)}")
        return value
    if base is bool or base is str:
        if not isinstance(value, base):
            raise wrong_type()
        return value
    if base is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)  # 8192.0 is a whole number
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong_type()
    elif base is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise wrong_type()
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            value = math.inf
        if not math.isfinite(value):
            raise ConfigError(file, key, f"got {shown(value)}, must be a finite number", rule.fix or "use a plain number")
    else:
        raise TypeError(f"check_value does not handle {hint!r} (field {key})")
    bound = rule.violated(value) or ("at most 2**63 - 1 in size" if base is int and abs(value) > INT64_MAX else "")
    if bound:
        raise ConfigError(file, key, f"got {shown(value)}, must be {bound}", rule.fix or f"use a value {bound}")
    return value


def from_text(file: str | Path | None, key: str, text: str, hint: Any, rule: Rule = Rule()) -> Any:
    """A value typed on a command line (`--override training.epochs=5`) read as the field's type, then
    checked like a value from a file: `5` is an int for an int field, `null` is None where allowed."""
    base, optional = _optional(hint)
    raw = text.strip()
    if optional and raw.lower() in ("null", "none", "~"):
        return None
    value: Any = raw
    if base is bool:
        value = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}.get(raw.lower(), raw)
    elif base is int:
        try:
            value = int(raw)
        except ValueError:
            pass
    elif base is float:
        try:
            value = float(raw)
        except ValueError:
            pass
    elif typing.get_origin(base) is Literal:
        value = next((c for c in typing.get_args(base) if str(c) == raw), raw)
    return check_value(file, key, value, hint, rule)


# --------------------------------------------------------------------------- a dataclass


def unknown_key_fix(name: Any, allowed: Any) -> str:
    """'did you mean X? remove it or use one of: ...' for a key that is not allowed."""
    allowed = list(allowed)
    close = difflib.get_close_matches(str(name), [str(a) for a in allowed], n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}remove it or use one of: {', '.join(map(str, allowed))}"


def parse_fields(cls: type, raw: dict, file: str | Path | None, prefix: str = "", *,
                 exclude: tuple[str, ...] = (), required: bool = False) -> dict[str, Any]:
    """Check the scalar fields of dataclass `cls` given in `raw`; return them as keyword arguments.

    Keys that are not fields (or are in `exclude`) are errors. Non-scalar fields (mappings, lists,
    nested dataclasses) are the caller's to parse and are left out of the result. With `required`,
    a scalar field without a default that `raw` lacks is an error ("missing")."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in exclude}
    out: dict[str, Any] = {}
    for name, value in raw.items():
        f = fields.get(name)
        if f is None:
            raise ConfigError(file, f"{prefix}{name}", "unknown key", unknown_key_fix(name, sorted(fields)))
        if is_scalar(hints[name]):
            out[name] = check_value(file, f"{prefix}{name}", value, hints[name], rule_of(f))
    if required:
        for name, f in fields.items():
            if name not in raw and is_scalar(hints[name]) and f.default is dataclasses.MISSING \
                    and f.default_factory is dataclasses.MISSING:
                what = expected(hints[name]) + (f", {rule_of(f).bound()}" if rule_of(f).bound() else "")
                raise ConfigError(file, f"{prefix}{name}", "missing", f"add {name}: <{what}>")
    return out


def check_ranges(obj: Any, file: str | Path | None, prefix: str = "") -> None:
    """Check every scalar field of a dataclass instance against its rule (e.g. after defaults were filled in)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if is_scalar(hints[f.name]):
            check_value(file, f"{prefix}{f.name}", getattr(obj, f.name), hints[f.name], rule_of(f))


def check_field(file: str | Path | None, key: str, value: Any, cls: type, name: str, *, allow_none: bool = True) -> Any:
    """One value checked as field `name` of dataclass `cls` (its type hint and rule) without building `cls`.
    `allow_none=False` refuses null even where the field's type allows it (a key given as null)."""
    hint = typing.get_type_hints(cls)[name]
    if not allow_none:
        hint = _optional(hint)[0]
    return check_value(file, key, value, hint, rule_of(next(f for f in dataclasses.fields(cls) if f.name == name)))
