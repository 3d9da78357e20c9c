"""YAML → frozen dataclass configs, strict: unknown keys and wrong types are errors naming file and key.

Every stage owns its config dataclass (next to the code that reads it); this module only knows how to
fill a dataclass tree from YAML and ``--set a.b=c`` overrides, so a typo never silently becomes a default.
"""

from __future__ import annotations

import dataclasses
import re
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match its dataclass; the message names file and key."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        """The dotted key at fault, when there is one (lets `load_config` name the `--set` that gave it)."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build ``cls`` from a YAML file (or defaults when ``path`` is None) plus ``key.sub=value`` overrides."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found (pass an existing YAML file, e.g. configs/pretrain/cpu-small.yaml)")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    for item in overrides:
        _apply_override(data, item)
    try:
        return from_dict(cls, data, source=source)
    except ConfigError as e:
        item = _override_of(e.key, str(e), overrides)
        if item is None:
            raise
        raise ConfigError(str(e).replace(source, f"--set {item!r} (over {source})", 1), e.key) from None


def _override_of(key: str | None, message: str, overrides: list[str] | tuple[str, ...]) -> str | None:
    """The last ``--set`` that wrote ``key``, a section above it, or a key inside it (a section's own check);
    for a top-level check (no key), the last ``--set`` whose key the message names."""
    for item in reversed(overrides):
        set_key = item.split("=", 1)[0].strip()
        if key is None:
            if re.search(rf"\b{re.escape(set_key)}\b", message):
                return item
            continue
        base = key.split("[")[0]
        if set_key == base or base.startswith(set_key + ".") or set_key.startswith(base + "."):
            return item
    return None


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set optim.base_lr=0.3")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {part!r} is not a section")
        node = child
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    node[parts[-1]] = value


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Fill dataclass ``cls`` from ``data``; ``source``/``prefix`` only make error messages precise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {type(data).__name__}",
                          prefix.rstrip(".") or None)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = prefix + str(unknown[0])
        raise ConfigError(f"{source}: unknown key '{key}' (allowed here: {', '.join(sorted(fields))})", key)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, source, prefix + name)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {e}", prefix.rstrip(".") or None) from None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    def fail() -> ConfigError:
        return ConfigError(f"{source}: key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}", key)

    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        return from_dict(tp, value, source, key + ".")
    if origin is Literal:
        if value not in get_args(tp):
            raise fail()
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError:
                continue
        raise fail()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{source}: key '{key}': expected {len(args)} values, got {len(value)}", key)
            return tuple(_coerce(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail()


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict (lists for tuples) for checkpoints, logs and YAML dumps."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = ["ConfigError", "load_config", "from_dict", "to_dict", "dump_yaml"]
