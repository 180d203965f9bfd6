"""Command configs: dataclasses loaded from YAML and overridden with ``key=value`` pairs.

Also the parsers for values whose misuse silently changes a number (budgets, step counts).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-facing configuration error; its message is one line naming the problem and the fix."""


SHORT_LIST = 12  # longer lists of valid names are not printed in full, only their closest few


def suggest(name: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean X?)' for the closest of ``choices``; else the valid names (the closest few of many)."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if close:
        return f" (did you mean {', '.join(repr(c) for c in close)}?)"
    if len(choices) <= SHORT_LIST:
        return f" (choose from {', '.join(choices)})"
    nearest = difflib.get_close_matches(name, choices, n=3, cutoff=0.0)
    return f" (closest of {len(choices)}: {', '.join(nearest)})"


def parse_eps(value: str | float | int, unit: float | None = None) -> float:
    """A perturbation budget in pixel units ([0, 1] images).

    Accepts ``"4/255"``, ``"1.5/255"``, ``"0.0157"`` or, with an explicit ``unit=255``, ``"4"``. A bare value
    above 1 without a unit is refused: it would silently mean "every pixel may change completely".
    """
    text = str(value).strip()
    try:
        numerator, slash, denominator = text.partition("/")
        eps = float(numerator) / float(denominator) if slash else float(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"eps {text!r} is not a number; write e.g. 4/255 or 0.0157") from None
    if unit is not None:
        if unit <= 0:
            raise ConfigError(f"eps unit {unit} must be positive, e.g. --eps-unit 255")
        eps = eps / unit
    if not eps == eps or eps < 0:  # NaN or negative
        raise ConfigError(f"eps {text!r} must be a non-negative number, e.g. 4/255")
    if eps > 1:
        raise ConfigError(
            f"eps {text!r} is above 1 but images live in [0, 1]; write {text}/255 or pass --eps-unit 255"
        )
    return eps


def parse_eps_list(values: str | typing.Sequence[str | float], unit: float | None = None) -> list[float]:
    """Comma-separated or listed budgets, each through :func:`parse_eps`."""
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    if not values:
        raise ConfigError("empty eps list; give at least one budget, e.g. --eps 4/255")
    return [parse_eps(v, unit) for v in values]


def positive_int(value: Any, name: str = "value") -> int:
    """An integer >= 1 (steps, batch sizes), or a one-line error naming ``name``."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ConfigError(f"{name} {value!r} is not an integer; give a whole number >= 1") from None
    if number <= 0:
        raise ConfigError(f"{name} must be >= 1, got {number}")
    return number


def _yaml_value(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        reason = str(error).splitlines()[0]
        raise ConfigError(f"{key}={text!r} is not a valid value ({reason}); e.g. {key}=[1, 2]") from None


def _coerce(text: str, annotation: Any, key: str) -> Any:
    """Turn an override's text into the field's type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", "~") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(text, inner[0], key) if len(inner) == 1 else _yaml_value(text, key)
    if annotation is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected true or false")
    if annotation in (int, float):
        try:
            return annotation(float(Fraction(text))) if annotation is float else int(text)
        except (ValueError, ZeroDivisionError):
            kind = "an int" if annotation is int else "a number"
            raise ConfigError(f"{key}={text!r}: expected {kind}") from None
    if annotation is str:
        return text
    if origin in (list, tuple):
        loaded = _yaml_value(text, key) if text.startswith("[") else [t for t in text.split(",") if t]
        if not isinstance(loaded, list):
            raise ConfigError(f"{key}={text!r} is not a list; write {key}=a,b or {key}=[a, b]")
        item = args[0] if args else str
        return [_coerce(str(v), item, key) for v in loaded]
    return _yaml_value(text, key)


_KINDS = {bool: "true or false", int: "an int", float: "a number", str: "a string", list: "a list",
          tuple: "a list", dict: "a mapping"}


def _check_value(value: Any, annotation: Any, key: str) -> Any:
    """A YAML value of any type checked against the field's type: the override errors, one line each.

    Strings go through the override parser (YAML reads `lr: 5e-6` and `eps: 4/255` as strings);
    numbers are accepted where a string is expected, as an override's text would be.
    """
    if isinstance(value, str):
        return _coerce(value, annotation, key)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for inner in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, inner, key)
            except ConfigError:
                continue
        inner = [a for a in args if a is not type(None)]
        kinds = " or ".join(_KINDS.get(typing.get_origin(a) or a, str(a)) for a in inner)
        raise ConfigError(f"{key}={value!r}: expected {kinds}")
    if annotation is Any:
        return value
    kind = origin or annotation
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and number and float(value).is_integer():
        return int(value)
    if kind is float and number:
        return float(value)
    if kind is str and number:
        return str(value)
    if kind in (list, tuple) and isinstance(value, list):
        item = args[0] if args else Any
        return [_check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if kind is dict and isinstance(value, dict):
        return value
    raise ConfigError(f"{key}={value!r}: expected {_KINDS.get(kind, str(kind))}")


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> T:
    """Build dataclass ``cls`` from an optional YAML file, then ``key=value`` overrides.

    Unknown keys are errors with the closest valid name suggested, never silently ignored.
    """
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            kind = type(loaded).__name__
            raise ConfigError(f"config file {path} must hold a mapping of key: value, not a {kind}")
        values.update(loaded)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {key!r} in {path}{suggest(key, names)}")
        values[key] = _check_value(value, hints[key], key)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value, e.g. steps=100")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in names:
            raise ConfigError(f"unknown config key {key!r}{suggest(key, names)}")
        values[key] = _coerce(text.strip(), hints[key], key)
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON/YAML-able values."""
    return dataclasses.asdict(config)
