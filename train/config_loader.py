"""YAML -> typed dataclass configs: `extends:` chains, dotted overrides, strict validation, diffs.

    cfg = load_config("launch/configs/pretrain/tiny_clip.yaml", ["optim.lr=1e-3", "schedule.steps=20"])

An unknown key raises ConfigError naming the closest valid key; a value of the wrong type
names the key and the expected type. Works for any dataclass tree (the VLM stage reuses it).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Optional, TypeVar, Union

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem explained in one line."""


# ----------------------------------------------------------------------------- YAML files
def read_yaml_with_extends(path: str | Path, _seen: Optional[set] = None) -> dict:
    """Read a YAML file; `extends: other.yaml` (relative to the file) is merged underneath it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    ancestors = _seen or set()  # the chain above this file only: two parents may share a base (a diamond)
    if path.resolve() in ancestors:
        raise ConfigError(f"config `extends` cycle through {path}")
    seen = ancestors | {path.resolve()}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    parents = data.pop("extends", None)
    if parents is None:
        return data
    merged: dict = {}
    for parent in [parents] if isinstance(parents, str) else parents:
        merged = deep_merge(merged, read_yaml_with_extends(path.parent / parent, seen))
    return deep_merge(merged, data)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        elif value is None and isinstance(out.get(key), dict):
            continue  # an empty section (`model:` with its keys commented out) changes nothing
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-3` -> (["optim", "lr"], 0.001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override `{text}` is not of the form key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override `{text}` has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-3" as a string
    if value is not None and not isinstance(value, (str, list, dict)):
        value = OverrideScalar(raw.strip(), value)  # a str field takes the text as typed ("0123", "1:30", "off")
    return key.split("."), value


class OverrideScalar:
    """A command-line scalar: YAML's reading of it (int, float, bool, date) and the text as typed."""

    def __init__(self, raw: str, parsed: Any):
        self.raw, self.parsed = raw, parsed

    def __eq__(self, other: Any) -> bool:
        return self.parsed == (other.parsed if isinstance(other, OverrideScalar) else other)

    def __repr__(self) -> str:
        return repr(self.parsed)


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[path[-1]] = value
    return data


# ----------------------------------------------------------------------------- dict -> dataclass
def from_dict(cls: type[T], data: dict, prefix: str = "", choices: Optional[dict] = None) -> T:
    """Build dataclass `cls` from `data`, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' expects a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'{_suggest(str(key), names, prefix, cls)}")
        kwargs[key] = _convert(hints[key], value, full, choices or {})
    return cls(**kwargs)


def _suggest(key: str, names: list[str], prefix: str, cls: type) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    for path in all_keys(cls):  # the key may belong in another section
        if path.split(".")[-1] == key:
            return f" (did you mean '{path}'?)" if not prefix else f" (did you mean '{path}' at the top level?)"
    return f"; valid keys here: {', '.join(names)}"


def _convert(tp: Any, value: Any, key: str, choices: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key, choices)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value or {}, key + ".", choices)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list of {_tname(item_tp)}, got {value!r}")
        return [_convert(item_tp, v, f"{key}[{i}]", choices) for i, v in enumerate(value)]
    out = _scalar(tp, value, key)
    allowed = choices.get(key)
    if allowed is not None and out not in allowed:
        close = difflib.get_close_matches(str(out), [str(a) for a in allowed], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}; got {out!r}{hint}")
    return out


def _scalar(tp: Any, value: Any, key: str) -> Any:
    if isinstance(value, OverrideScalar):
        value = value.raw if tp is str else value.parsed
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _looks_like_float(value):
            return float(value)  # `lr: 1e-3` in a YAML file (YAML 1.1 reads it as a string)
    elif tp is str:
        if isinstance(value, str):
            return os.path.expandvars(value)  # ${DATACOMP_DIR}/... in shipped configs
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"config key '{key}' expects {_tname(tp)}, got {type(value).__name__} {value!r}")


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a dataclass tree."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += all_keys(tp, prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


# ----------------------------------------------------------------------------- public API
def load_config(path: str | Path | None, overrides: Iterable[str] = (), cls: type[T] | None = None,
                choices: Optional[dict] = None) -> T:
    """Load `path` (with its `extends:` chain), apply dotted `overrides`, validate into `cls`."""
    if cls is None:
        from train.config import CHOICES, PretrainConfig

        cls, choices = PretrainConfig, CHOICES if choices is None else choices
    data = read_yaml_with_extends(path) if path else {}
    data = apply_overrides(data, overrides)
    cfg = from_dict(cls, data, choices=choices)
    check_combinations(cfg)
    return cfg


def check_combinations(cfg: Any) -> None:
    """Settings that are valid one by one but not together (ConfigError at load time, before any model is built)."""
    from train.deepspeed_config import check_clip_mode

    try:
        check_clip_mode(cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def diff_configs(a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """Every leaf key whose value differs between two configs (dataclasses or dicts)."""
    fa = flatten(a if isinstance(a, dict) else to_dict(a))
    fb = flatten(b if isinstance(b, dict) else to_dict(b))
    missing = object()
    rows = []
    for key in sorted(set(fa) | set(fb)):
        va, vb = fa.get(key, missing), fb.get(key, missing)
        if va != vb:
            rows.append((key, "<absent>" if va is missing else va, "<absent>" if vb is missing else vb))
    return rows
