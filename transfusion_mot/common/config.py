"""Strict configs: dataclasses loaded from YAML, unknown keys and ill-typed values rejected by key path.

Loading is strict on purpose: a misspelt key in a week-long run's config must fail at start-up with the key's
full path in the message, not be silently ignored. `a.b=c` overrides (values parsed as YAML) reach any key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

T = TypeVar("T")


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _allows_none(tp: Any) -> bool:
    return tp is Any or (typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if value is None:
        if _allows_none(tp):
            return None
        name = getattr(_strip_optional(tp), "__name__", str(tp))
        raise ConfigError(f"{where}: expected {'a value' if name == 'Any' else name}, got null")
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or int(value) != value):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; every user means the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # no option of ours means anything at nan or inf
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and ill-typed values by key path."""
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            raise ConfigError(f"unknown config key {path!r} (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as err:  # e.g. a missing required field
        raise ConfigError(f"{where or cls.__name__}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; a missing file or bad YAML is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def load_yaml_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Load `cls` from a YAML file, then apply `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    data = read_yaml_mapping(path)
    apply_overrides(data, overrides or [])
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | Mapping[str, Any]) -> None:
    """Apply overrides in place: `a.b=c` strings, whose value is parsed as YAML so `x=3`, `x=[a,b]` work, or a
    {"a.b": value} mapping whose values are taken as they are (a path that looks like a number stays a string)."""
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} must look like key.path=value")
            key, raw = item.split("=", 1)
            items.append((key, yaml.safe_load(raw)))
    for key, value in items:
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part!r} is not a section")
        node[parts[-1]] = value


def save_yaml_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def shipped_configs_dir() -> Path:
    """The configs shipped with the package: inside it when installed from a wheel, at the root of a source
    checkout (an editable install) otherwise."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "configs", package.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"the shipped configs are missing (looked in {package / 'configs'} and "
                      f"{package.parent / 'configs'}): reinstall transfusion-mot")


def shipped_config_names(kind: str) -> list[str]:
    """Names of the shipped configs of one kind ("train", "model", "vae")."""
    return sorted(p.stem for p in (shipped_configs_dir() / kind).glob("*.yaml"))


def resolve_config_path(spec: str | Path, kind: str) -> Path:
    """A config file as given, or the name of a shipped config of `kind` (`shapes-tiny` ->
    configs/train/shapes-tiny.yaml). Neither: a ConfigError listing the shipped names."""
    path = Path(spec)
    if path.is_file():
        return path
    if len(path.parts) == 1:
        shipped = shipped_configs_dir() / kind / f"{path.stem}.yaml"
        if path.suffix in ("", ".yaml") and shipped.is_file():
            return shipped
    raise ConfigError(f"config not found: {spec} (give a YAML file, or the name of a shipped {kind} config: "
                      f"{', '.join(shipped_config_names(kind))})")


def require_ranges(config: Any, section: str, positive: tuple[str, ...] = (),
                   non_negative: tuple[str, ...] = ()) -> None:
    """ConfigError naming the first of `positive` that is not > 0, or of `non_negative` that is < 0 (a
    field left at None, "use the default", passes)."""
    for name in positive:
        if getattr(config, name) is not None and not getattr(config, name) > 0:
            raise ConfigError(f"{section}: {name} must be positive, got {getattr(config, name)}")
    for name in non_negative:
        if getattr(config, name) is not None and getattr(config, name) < 0:
            raise ConfigError(f"{section}: {name} must be >= 0, got {getattr(config, name)}")
