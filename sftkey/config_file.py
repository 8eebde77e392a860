"""Typed configs from YAML: a dataclass tree built from a mapping, every value checked against its field's type.

Errors name the file, the line and the key (or the `--set` override that gave the value), and what to write instead.
Generic: the training config (sftkey.train.config) and the pipeline config (orchestration/config.py) both build on it.
Light module: yaml only.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from sftkey.errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the file, line and key, and what to write instead."""


# --------------------------------------------------------------------------- where a key came from


class ConfigSource:
    """Maps a key path to `file line N` (or `--set key`) for error messages."""

    def __init__(self, path: Path | None, root: yaml.Node | None, overridden: set[str]):
        self.path, self.root, self.overridden = path, root, overridden

    def where(self, keys: tuple) -> str:
        dotted = ".".join(str(k) for k in keys)
        for i in range(len(keys), 0, -1):  # an override of a parent covers its children
            if ".".join(str(k) for k in keys[:i]) in self.overridden:
                return f"--set {'.'.join(str(k) for k in keys[:i])}"
        line = self._line(keys)
        place = "config" if self.path is None else (f"{self.path} line {line}" if line else str(self.path))
        inside = sorted(o for o in self.overridden if o.startswith(dotted + ".") or not dotted)
        return place + (f" (with --set {', --set '.join(inside)})" if inside else "")

    def _line(self, keys: tuple) -> int | None:
        node, line = self.root, None
        for key in keys:
            if isinstance(node, yaml.MappingNode):
                match = [(k, v) for k, v in node.value if k.value == str(key)]
                if not match:
                    break
                line, node = match[0][0].start_mark.line + 1, match[0][1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                break
        return line


def _path_text(keys: tuple) -> str:
    out = ""
    for key in keys:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def located_error(source: ConfigSource, keys: tuple, message: str) -> ConfigError:
    return ConfigError(f"{source.where(keys)}: {_path_text(keys)}: {message}")


# --------------------------------------------------------------------------- YAML -> dataclasses


def _convert(value: Any, hint: Any, keys: tuple, source: ConfigSource) -> Any:
    """`value` as type `hint`: nested dataclasses, lists, dicts, optionals and scalars (int -> float allowed)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], keys, source)
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, keys, source)
    if origin is list:
        if not isinstance(value, list):
            raise located_error(source, keys, f"expected a list, got {value!r}")
        return [_convert(v, args[0], keys + (i,), source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise located_error(source, keys, f"expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], keys + (k,), source) for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float:
        # YAML 1.1 reads `2e-5` (no dot) as a string; accept it as the number it obviously is.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise located_error(source, keys, f"expected a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise located_error(source, keys, f"expected an integer, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise located_error(source, keys, f"expected true or false, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise located_error(source, keys, f"expected a string, got {value!r}")
    raise TypeError(f"config field type {hint!r} is not supported")


def build_dataclass(cls, raw: Any, keys: tuple, source: ConfigSource):
    """`cls` from a YAML mapping at `keys`, every field typed and checked; errors name `source`'s file and line."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise located_error(source, keys, f"expected a mapping of {cls.__name__} fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise located_error(source, keys + (key,), f"unknown key; {hint}known keys: {', '.join(known)}")
        kwargs[key] = _convert(value, hints[key], keys + (key,), source)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a __post_init__ check (DataError is one)
        raise located_error(source, keys, str(e)) from None


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """`a.b.0.c=value` -> (["a", "b", 0, "c"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    dotted, value = text.split("=", 1)
    if not dotted:
        raise ConfigError(f"--set {text!r}: empty key")
    keys = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    try:
        return keys, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {dotted}: value {value!r} is not valid YAML ({e})") from None


def apply_override(raw: dict, keys: list, value: Any) -> None:
    node = raw
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not isinstance(key, int) or key >= len(node):
                raise ConfigError(f"--set {'.'.join(map(str, keys))}: no item {key} in {'.'.join(map(str, keys[:i]))}")
            node = node[key]
        else:
            if node.get(key) is None:
                node[key] = {}
            node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise ConfigError(f"--set {'.'.join(map(str, keys))}: no item {last} in the list")
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {'.'.join(map(str, keys))}: {'.'.join(map(str, keys[:-1]))} is not a mapping")


# --------------------------------------------------------------------------- reading and writing


def decode_utf8(data: bytes, path: Path) -> str:
    """`data` as text, or an error naming the line and byte of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path} line {line}: byte {column} (0x{data[e.start]:02x}, offset {e.start}) is not "
                          "UTF-8; re-save the file as UTF-8") from None


def read_yaml(path: Path, what: str) -> tuple[dict, Any]:
    """(values, node tree) of a YAML mapping; the nodes give line numbers for later errors."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}")
    text = decode_utf8(path.read_bytes(), path)
    try:
        raw = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level of the {what}")
    return raw, root


def read_config(path: Path, overrides: list[str], what: str) -> tuple[dict, ConfigSource]:
    """A YAML mapping with `--set KEY=VALUE` overrides applied, and the source that locates each key's value."""
    raw, root = read_yaml(path, what)
    overridden = set()
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
        overridden.add(".".join(map(str, keys)))
    return raw, ConfigSource(path, root, overridden)


def dump_yaml(data: dict, header: str = "") -> str:
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    return (header + "\n" if header else "") + body


def first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    """`train.lr: 2e-05 -> 3e-05` for the first key where two config views differ, else None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if key not in old or key not in new:
                return f"{prefix}{key}: {'added' if key in new else 'removed'}"
            diff = first_difference(old[key], new[key], f"{prefix}{key}.")
            if diff:
                return diff
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            diff = first_difference(a, b, f"{prefix}{i}.")
            if diff:
                return diff
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"
