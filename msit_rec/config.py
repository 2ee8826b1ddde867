"""Strict YAML → dataclass loading: an unknown key or a wrong type is an error that names the key.

Every config in the project (dataset, generator, model, trainer) is a dataclass; this module is the one
place that turns YAML into those dataclasses, so all of them validate the same way.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from msit_rec.errors import ConfigError, DataError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with an error naming the file when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` overrides (values parsed as YAML) to a config mapping, e.g. `users=1000`."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value (dotted keys reach nested sections)")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(text)
    return data


def load_config(
    path: str | Path, cls: type[T], section: str | None = None, overrides: list[str] | None = None
) -> T:
    """Load `cls` from a YAML file (optionally from one top-level `section` of it), with key=value overrides."""
    data = read_yaml(path)
    if section is not None and overrides:
        data.setdefault(section, {})
    if overrides:
        apply_overrides(data[section] if section is not None else data, overrides)
    where = str(path)
    if section is not None:
        if section not in data:
            raise ConfigError(f"config file {path}: missing top-level key '{section}'")
        extra = sorted(set(data) - {section})
        if extra:
            raise ConfigError(f"config file {path}: unknown top-level key(s) {extra}; expected only '{section}'")
        data = data[section]
        where = f"{path}:{section}"
    return from_dict(cls, data, where)


def load_versioned_json(path: Path, cls: type[T], version_key: str, version: int, what: str, oldest: int | None = None) -> T:
    """Load one of the project's JSON files (dataset.json, metrics.json) into `cls`, checking its format version:
    `version`, or any from `oldest` up to it when older files stay readable (their new fields take defaults)."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    found = raw.get(version_key) if isinstance(raw, dict) else None
    readable = range(oldest if oldest is not None else version, version + 1)
    if not isinstance(found, int) or found not in readable:
        reads = f"version {version}" if len(readable) == 1 else f"versions {readable.start}–{version}"
        raise DataError(f"{path}: {what} version {found!r} ('{version_key}'), this msit-rec reads {reads}")
    return from_dict(cls, raw, str(path))


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass `cls` from plain data, checking every key and type; `where` prefixes error messages."""
    return _convert(cls, data, where)


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML/JSON-ready) form of a config dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return " | ".join(repr(m.value) for m in tp)
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        key_tp, val_tp = args if args else (Any, Any)
        return {_convert(key_tp, k, f"{where}"): _convert(val_tp, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{where}: expected one of {[m.value for m in tp]}, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in a config dataclass, not user input


def _convert_dataclass(cls: Any, value: Any, where: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(value).__name__} {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(fields)}")
    kwargs = {}
    for name, field in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], f"{where}.{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{name}' ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except (ValueError, ConfigError) as exc:  # __post_init__ cross-field checks
        raise ConfigError(f"{where}: {exc}") from None
