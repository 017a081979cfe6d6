"""How moa reads every config file: YAML 1.2, typed fields, dotted overrides.

- `load_yaml` reads a YAML (or JSON, a subset of YAML 1.2) file with YAML 1.2 numbers: `1e-4` is a
  float (PyYAML's YAML 1.1 reads it as a string).
- `from_mapping` builds a config dataclass from a parsed mapping: every value is checked against its
  field's annotation (nested dataclasses, lists, optional values, `Literal` choices, a union of
  dataclasses told apart by their `backend`), an int is accepted where a float is expected and an
  integral float where an int is, and unknown or missing keys are refused. Errors name the file, the
  key path (`optim.weight_decay`, `stages.0.lr`) and what was expected.
- `apply_overrides` sets dotted `key=value` pairs from the command line on a parsed mapping, each
  value read as a YAML 1.2 scalar, each key checked against the dataclass (the closest valid key is
  suggested for an unknown one); the mapping is then read by `from_mapping` like any file.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path

import yaml

from moa.errors import UsageError

FLOAT_TAG, INT_TAG = "tag:yaml.org,2002:float", "tag:yaml.org,2002:int"
# YAML 1.2 core schema numbers: a dot or an exponent makes a float (`1e-4`, `1.`, `.5`, `-1E+3`), plus .inf and
# .nan; an int is decimal or 0x hex (YAML 1.1's `1_000`, `0b101` and `1:30` are strings)
YAML12_INT = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+)$")
YAML12_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?
                                |[-+]?[0-9]+[eE][-+]?[0-9]+
                                |[-+]?\.(?:inf|Inf|INF)
                                |\.(?:nan|NaN|NAN))$""", re.X)


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the number resolvers of YAML 1.2."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (FLOAT_TAG, INT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Yaml12Loader.add_implicit_resolver(INT_TAG, YAML12_INT, list("-+0123456789"))
Yaml12Loader.add_implicit_resolver(FLOAT_TAG, YAML12_FLOAT, list("-+0123456789."))


def parse_yaml(text: str, source: str):
    """The YAML 1.2 document `text`; a syntax error is a UsageError naming `source`."""
    try:
        return yaml.load(text, Loader=Yaml12Loader)
    except yaml.YAMLError as err:
        raise UsageError(f"{source}: not valid YAML: {err}") from None


def load_yaml(path: str | Path):
    """The parsed YAML (or JSON) file `path`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    return parse_yaml(path.read_text(encoding="utf-8"), str(path))


# ------------------------------------------------------------------------------------------ typed fields
def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _optional(hint):
    """(the hint without None, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) < len(typing.get_args(hint)):
            return (members[0] if len(members) == 1 else typing.Union[tuple(members)]), True
    return hint, False


def describe(hint) -> str:
    """A type annotation as a user reads it: `float`, `list[str]`, `one of 'fp32', 'bf16'`, `str or null`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is list:
        return f"list[{describe(args[0])}]"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {type(None): "null", dict: "a mapping", list: "a list", Path: "a path", typing.Any: "any value"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _tagged(members) -> dict | None:
    """{backend name: dataclass} when `members` are dataclasses told apart by a `backend: Literal[...]` field."""
    if not all(dataclasses.is_dataclass(m) for m in members):
        return None
    return {typing.get_args(typing.get_type_hints(m)["backend"])[0]: m for m in members}


def check_value(value, hint, source: str, key: str):
    """`value` as the annotation `hint` wants it; a UsageError naming `source`, `key` and `hint` if it does not fit."""
    hint, nullable = _optional(hint)
    if value is None and nullable or hint is typing.Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    bad = UsageError(f"{source}: {key}: expected {describe(hint)}{' or null' * nullable}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, source, key)
    if origin in (typing.Union, types.UnionType):
        tags = _tagged(args)
        if tags is not None:
            if isinstance(value, args):
                return value
            tag = value.get("backend") if isinstance(value, dict) else None
            if tag not in tags:
                raise UsageError(f"{source}: {_join(key, 'backend')}: expected one of {sorted(tags)}, got {tag!r}")
            return from_mapping(tags[tag], value, source, key)
        for member in args:
            try:
                return check_value(value, member, source, key)
            except UsageError:
                pass
        raise bad
    if origin is typing.Literal:
        if value in args:
            return value
        raise bad
    if origin is list or hint is list:
        item = args[0] if args else typing.Any
        if isinstance(value, str) and item is str:  # one name where a list of names is expected
            return [value]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [check_value(v, item, source, _join(key, i)) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
    elif hint in (str, dict):
        if isinstance(value, hint):
            return value
    else:
        raise TypeError(f"config field {key}: annotation {hint!r} is not supported by moa.config_loader")
    raise bad


def _suggest(key: str, candidates: list[str]) -> str:
    """' (did you mean ...?)' naming the candidate closest to `key`: one with the same last component, else the
    closest by difflib; '' when nothing is close."""
    last = key.rpartition(".")[2]
    close = [c for c in candidates if c.rpartition(".")[2] == last] or difflib.get_close_matches(key, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def from_mapping(cls, data, source: str, path: str = ""):
    """`cls(**data)` for a config dataclass, every value checked against its field's annotation.

    `source` (the file) and `path` (where `data` sits in it, e.g. 'optim') name the place in every error.
    `data` None reads as an empty mapping; an instance of `cls` is returned as it is. The dataclass's
    own checks (`__post_init__`) raise UsageError; their messages get `source` and `path` in front.
    """
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{source}: {path or 'the file'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    for key in data:
        if key not in known:
            raise UsageError(f"{source}: unknown key {_join(path, key)!r}"
                             f"{_suggest(_join(path, key), [_join(path, k) for k in known])}; "
                             f"known keys{' of ' + path if path else ''}: {sorted(known)}")
    missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in data]
    if missing:
        raise UsageError(f"{source}: missing required key(s) {[_join(path, k) for k in missing]}")
    values = {key: check_value(value, hints[key], source, _join(path, key)) for key, value in data.items()}
    try:
        return cls(**values)
    except UsageError as err:  # a check of __post_init__: "<field> must be ..." reads as "<path>.<field> must be ..."
        message = str(err)
        if not message.startswith(source):
            joint = "." if message.split(" ", 1)[0] in known else ": "
            message = f"{source}: {path + joint if path else ''}{message}"
        raise UsageError(message) from None


# ------------------------------------------------------------------------------------------ overrides
def config_keys(cls, path: str = "") -> list[str]:
    """Every dotted key of the dataclass `cls` (a list's entries as index 0, a backend union's fields merged)."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        key = _join(path, name)
        keys.append(key)
        for inner in _inner_dataclasses(hint):
            keys += [k for k in config_keys(inner[0], _join(key, "0") if inner[1] else key) if k not in keys]
    return keys


def _inner_dataclasses(hint) -> list[tuple[type, bool]]:
    """(dataclass, inside a list) for each dataclass the annotation holds."""
    hint, _ = _optional(hint)
    if dataclasses.is_dataclass(hint):
        return [(hint, False)]
    if typing.get_origin(hint) is list and typing.get_args(hint) and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        return [(typing.get_args(hint)[0], True)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [(m, False) for m in typing.get_args(hint) if dataclasses.is_dataclass(m)]
    return []


def _check_key(cls, keys: list[str], dotted: str) -> None:
    """A UsageError unless the dotted key `keys` names a field of `cls` (below a mapping field, anything goes)."""
    hint = cls
    for depth, key in enumerate(keys):
        hint, _ = _optional(hint)
        where = ".".join(keys[:depth])
        inner = _inner_dataclasses(hint)
        if typing.get_origin(hint) is list or hint is list:
            if not key.isdigit():
                raise UsageError(f"override {dotted!r}: {where} is a list: expected an index (e.g. {where}.0), got {key!r}")
            args = typing.get_args(hint)
            hint = args[0] if args else typing.Any
        elif inner:
            fields = {name: h for member, _ in inner for name, h in typing.get_type_hints(member).items()}
            if key not in fields:
                raise UsageError(f"override {dotted!r}: unknown key {dotted!r}{_suggest(dotted, config_keys(cls))}")
            hint = fields[key]
        elif hint in (dict, typing.Any) or typing.get_origin(hint) is dict:
            return
        else:
            raise UsageError(f"override {dotted!r}: {where} is {describe(hint)}, which has no key {key!r}")


def apply_overrides(cls, data: dict | None, overrides: list[str]) -> dict:
    """`data` (a parsed config of the dataclass `cls`) with each `key=value` of `overrides` set.

    The key is dotted (`optim.weight_decay`, `stages.0.steps`); the value is read as YAML 1.2
    (`2e-4`, `true`, `null`, `[q_proj, v_proj]`). Sections missing from `data` are created; a list
    index must exist. The result is to be read with `from_mapping`, which checks the values."""
    data = {} if data is None else data
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise UsageError(f"override {override!r}: expected key=value, e.g. optim.weight_decay=0.01")
        keys = key.split(".")
        _check_key(cls, keys, key)
        value = parse_yaml(text, f"override {override!r}")
        node = data
        for depth, part in enumerate(keys[:-1]):
            if isinstance(node, list):
                if int(part) >= len(node):
                    raise UsageError(f"override {override!r}: {'.'.join(keys[:depth])} has {len(node)} entries, "
                                     f"so index {part} is out of range")
                node = node[int(part)]
            else:
                if not isinstance(node.get(part), (dict, list)):
                    node[part] = {}
                node = node[part]
        last = keys[-1]
        if isinstance(node, list):
            if int(last) >= len(node):
                raise UsageError(f"override {override!r}: {'.'.join(keys[:-1])} has {len(node)} entries, "
                                 f"so index {last} is out of range")
            node[int(last)] = value
        else:
            node[last] = value
    return data
