"""Typed config sections from plain data (YAML, JSON, a checkpoint's recorded config).

One converter for every reader: `launcher.config` builds the whole tree with it, and
`training.checkpoint.store` rebuilds a checkpoint's `model` and `deepspeed` sections with it,
so a section is parsed the same way wherever it comes from.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _parse_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Convert `value` to type `tp`, raising ValueErrors that name `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except ValueError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError(f"{key}: must be one of {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_data(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _convert(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _parse_float(value)  # PyYAML reads 1e6 as a string, 1.0e6 as a float
        if number is not None and number.is_integer():
            return int(number)
    elif tp is float:
        number = _parse_float(value)  # PyYAML reads 3e-4 (no dot) as a string
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"{key}: unsupported config type {tp!r}")
    raise ValueError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def from_data(cls: type[T], data: Any, prefix: str) -> T:
    """Dataclass `cls` (the section at dotted `prefix`) from a plain mapping: values
    converted to the annotated types, unknown keys refused with a did-you-mean, and
    each problem a one-line ValueError naming the dotted key."""
    where = prefix or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"
            raise ValueError(f"{dotted}: unknown key{hint}")
        kwargs[key] = _convert(hints[key], value, dotted)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # __post_init__ says "field: message"
        raise ValueError(f"{prefix}.{exc}" if prefix else str(exc)) from None
