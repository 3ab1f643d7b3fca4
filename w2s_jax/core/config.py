"""Strict typed configuration: dataclasses from YAML plus dotted ``--set`` overrides.

Every section of a run config is a (frozen or regular) dataclass; :func:`from_dict` builds it from
plain data and rejects, naming the dotted key,

- an unknown key (with the nearest valid key: ``unknown key `train.lrr` (did you mean `train.lr`?)``),
- a wrong type (``int`` is accepted for ``float``; ``bool`` and ``int`` are never confused; a string
  such as ``"1e-5"``, which YAML 1.1 reads as a string, is accepted for ``float``),
- a missing required value (a field without a default).

Supported field types: ``int``, ``float``, ``bool``, ``str``, ``pathlib.Path``, ``Any``,
``Optional[...]``/``X | None``, other unions (tried in order), ``Literal[...]``, ``list[T]``,
``tuple[T, ...]``/``tuple[A, B]``, ``dict[K, V]`` and nested dataclasses.

:func:`load_config` layers: dataclass defaults < ``defaults_yaml`` text < the YAML file (which may
name one ``base: other.yaml``, relative to itself, merged below it) < ``a.b.c=value`` overrides (the
value parsed with ``yaml.safe_load``). :func:`dump_yaml` writes the resolved config every run keeps;
:func:`config_hash` is a stable sha256 of its canonical JSON.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from w2s_jax.core.errors import UserError
from w2s_jax.core.jsonl import _atomic_write_text

__all__ = [
    "from_dict",
    "to_dict",
    "load_config",
    "load_yaml_file",
    "parse_overrides",
    "apply_overrides",
    "deep_merge",
    "dump_yaml",
    "config_hash",
]

T = TypeVar("T")

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|infinity|nan)$", re.IGNORECASE)


def _name(key: str) -> str:
    return key or "<config>"


def _typename(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    r = repr(value)
    if len(r) > 60:
        r = r[:57] + "..."
    return f"{type(value).__name__} {r}"


def _convert(tp: Any, value: Any, key: str) -> Any:
    """``value`` checked against (and converted to) the field type ``tp``; errors name ``key``."""
    if tp is Any or tp is typing.Any:
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return _convert_union(tp, value, key)
    if origin is Literal:
        return _convert_literal(tp, value, key)
    if value is None:
        raise UserError(f"`{_name(key)}`: a value is required (got null), expected {_typename(tp)}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return value if isinstance(value, tp) else from_dict(tp, value, key)
    if origin in (list, Sequence, tuple, dict, Mapping) or tp in (list, Sequence, tuple, dict, Mapping):
        return _convert_container(tp, value, key)
    return _convert_scalar(tp, value, key)


def _convert_union(tp: Any, value: Any, key: str) -> Any:
    """``Optional[X]``/``X | None`` and other unions: the first member type that accepts ``value``."""
    args = typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise UserError(f"`{_name(key)}`: a value is required (got null), expected {_typename(tp)}")
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return _convert(a, value, key)
        except UserError as e:
            errors.append(str(e))
    if len(errors) == 1:
        raise UserError(errors[0])
    raise UserError(f"`{_name(key)}`: expected {_typename(tp)}, got {_describe(value)}")


def _convert_literal(tp: Any, value: Any, key: str) -> Any:
    for a in typing.get_args(tp):
        if value == a and type(value) is type(a):
            return a
    choices = ", ".join(repr(a) for a in typing.get_args(tp))
    raise UserError(f"`{_name(key)}`: expected one of {choices}, got {_describe(value)}")


def _convert_container(tp: Any, value: Any, key: str) -> Any:
    """``list[T]``, ``tuple[T, ...]``/``tuple[A, B]`` and ``dict[K, V]``, item by item."""
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise UserError(f"`{_name(key)}`: expected a mapping, got {_describe(value)}")
        kt, vt = args or (Any, Any)
        return {_convert(kt, k, f"{key}.<key>"): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        raise UserError(f"`{_name(key)}`: expected a list, got {_describe(value)}")
    if origin in (list, Sequence):
        (item_tp,) = args or (Any,)
        return [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if not args:
        return tuple(value)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if len(args) != len(value):
        raise UserError(f"`{_name(key)}`: expected a list of {len(args)} items, got {len(value)}")
    return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _convert_scalar(tp: Any, value: Any, key: str) -> Any:
    """``bool``, ``int``, ``float``, ``str``, ``Path`` and other plain classes (an instance of them)."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"`{_name(key)}`: expected bool (true/false), got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"`{_name(key)}`: expected int, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise UserError(f"`{_name(key)}`: expected float, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise UserError(f"`{_name(key)}`: expected str, got {_describe(value)} (quote it in YAML)")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise UserError(f"`{_name(key)}`: expected a path, got {_describe(value)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise UserError(f"`{_name(key)}`: expected {tp.__name__}, got {_describe(value)}")
    raise TypeError(f"config field `{key}` has an unsupported type {tp!r}")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` (recursively), strictly; errors name the dotted key."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UserError(f"`{_name(path)}`: expected a mapping of keys, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            full = f"{path}.{k}" if path else str(k)
            close = difflib.get_close_matches(str(k), list(fields), n=1, cutoff=0.6)
            hint = f" (did you mean `{path + '.' if path else ''}{close[0]}`?)" if close else ""
            valid = ", ".join(fields)
            raise UserError(f"unknown key `{full}`{hint}; valid keys here: {valid}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        tp = hints[name]
        if name in data:
            value = data[name]
            if isinstance(value, Mapping) and not isinstance(value, type) and _is_dc_type(tp):
                default = _field_default(f)
                if dataclasses.is_dataclass(default) and not isinstance(default, type):
                    value = deep_merge(to_dict(default), value)  # partial override of a custom default
            kwargs[name] = _convert(tp, value, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise UserError(f"missing required value `{key}`")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, UserError) as e:
        # a check in the dataclass (``__post_init__``): name the dotted key when the message starts with a field
        msg = str(e)
        first = msg.split(" ", 1)[0].strip("`:")
        if first in fields:
            raise UserError(f"config key `{path + '.' if path else ''}{first}`{msg[len(msg.split(' ', 1)[0]):]}") \
                from None
        raise UserError(f"`{_name(path)}`: {msg}") from None


def _is_dc_type(tp: Any) -> bool:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(_is_dc_type(a) for a in typing.get_args(tp))
    return False


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a dataclass config (tuples as lists, paths as strings)."""
    return _plain(cfg)


def deep_merge(base: Mapping, over: Mapping) -> dict:
    """``over`` merged onto ``base``: mappings merge recursively, everything else replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _safe_load(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{where}: invalid YAML: {e}") from None


def load_yaml_file(path: str | Path, _allow_base: bool = True) -> dict:
    """A YAML mapping from ``path``; a top-level ``base: other.yaml`` (relative to ``path``) is loaded
    first and this file merged onto it (one level only: a base may not have a base)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such config file")
    data = _safe_load(p.read_text(encoding="utf-8"), str(p))
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise UserError(f"{p}: a config file must be a mapping of keys, got {type(data).__name__}")
    data = dict(data)
    base = data.pop("base", None)
    if base is not None:
        if not _allow_base:
            raise UserError(f"{p}: `base` inheritance is one level only (this file is itself a base)")
        if not isinstance(base, str):
            raise UserError(f"{p}: `base` must be a file name, got {_describe(base)}")
        base_path = (p.parent / base).resolve()
        data = deep_merge(load_yaml_file(base_path, _allow_base=False), data)
    return data


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``["a.b=1", "c=x"]`` -> ``[(["a", "b"], 1), (["c"], "x")]``; values parsed with ``yaml.safe_load``."""
    out = []
    for ov in overrides:
        if "=" not in ov:
            raise UserError(f"override `{ov}` must look like key.path=value")
        key, text = ov.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise UserError(f"override `{ov}`: bad key `{key}`")
        out.append((parts, _safe_load(text, f"override `{ov}`")))
    return out


def apply_overrides(data: Mapping, overrides: Sequence[str]) -> dict:
    """A copy of ``data`` with dotted ``key=value`` overrides applied (intermediate mappings created)."""
    out = deep_merge({}, data)
    for parts, value in parse_overrides(overrides):
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                if isinstance(nxt, Mapping):
                    nxt = node[p] = dict(nxt)
                else:
                    raise UserError(f"override `{'.'.join(parts)}`: `{'.'.join(parts[: i + 1])}` is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    defaults_yaml: str | None = None,
) -> T:
    """Resolve a config: dataclass defaults < ``defaults_yaml`` (YAML text, e.g. an embedded default
    config) < the YAML file at ``path`` (with its ``base``) < ``overrides`` (``a.b.c=value``)."""
    data: dict = {}
    if defaults_yaml is not None:
        d = _safe_load(defaults_yaml, "default config")
        if d is not None:
            if not isinstance(d, Mapping):
                raise UserError("default config: must be a mapping of keys")
            d = dict(d)
            if "base" in d:
                raise UserError("default config: `base` is not allowed in embedded defaults")
            data = d
    if path is not None:
        data = deep_merge(data, load_yaml_file(path))
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)


def dump_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), in field order."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
    _atomic_write_text(path, lambda f: f.write(text))


def config_hash(cfg: Any) -> str:
    """Stable sha256 hex digest of the config's canonical JSON (sorted keys, no spaces)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
