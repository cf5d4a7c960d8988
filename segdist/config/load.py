"""Reading a config: YAML file (nested sections) <- ``key=value`` overrides, typed and validated.

``load_config("configs/demo.yaml", ["train.epochs=3", "lr=3e-4"])`` returns a :class:`Config`.
Override keys are dotted (``optim.lr``) or a leaf name that is unique across sections (``lr``).
Values are parsed as YAML scalars and checked against the field's type, then against the range,
choices and check :mod:`segdist.config.schema` declares for the key. An unknown key or a bad
value raises :class:`~segdist.errors.UserError` naming the key (and the nearest valid key, or
the allowed range), so a typo never silently trains with a default. A key repeated in a YAML
file is an error naming both lines (PyYAML would keep the last one silently).
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import types
import typing
from pathlib import Path

import yaml

from ..atomic import atomic_write_text
from ..errors import UserError
from .schema import Config


# ----------------------------------------------------------------------------- reading the schema
def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def sections() -> dict[str, type]:
    """Section name -> its dataclass, e.g. ``{"data": DataConfig, ...}``."""
    return {name: f.type for name, f in _fields(Config).items()}


def valid_keys() -> list[str]:
    """All dotted keys of the schema, e.g. ``['data.shards', ..., 'track.tags']``."""
    return [f"{s}.{k}" for s, cls in sections().items() for k in _fields(cls)]


def _nearest(key_: str) -> str:
    keys = valid_keys()
    leaves = [k.split(".", 1)[1] for k in keys]
    match = difflib.get_close_matches(key_, keys, n=1, cutoff=0.5)
    if not match:
        leaf = difflib.get_close_matches(key_.split(".")[-1], leaves, n=1, cutoff=0.5)
        match = [keys[leaves.index(leaf[0])]] if leaf else []
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(keys)}"


_KINDS = {"str": "text", "int": "a whole number", "float": "a number", "bool": "true/false", "list": "a list",
          "dict": "a mapping", "date": "a date", "datetime": "a date and time", "bytes": "binary data", "set": "a set",
          "NoneType": "nothing"}
"""How a YAML value's kind is named in messages (not Python's type names)."""


def _shown(value) -> str:
    """A YAML value as the user wrote it, for messages: never a Python repr such as ``datetime.date(2024, 1, 1)``."""
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return f"binary data ({len(value)} bytes)"
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=str)
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    return str(value)


def _coerce(key_: str, value, typ):
    """Check ``value`` against the dataclass field type ``typ``; int -> float is allowed."""
    origin = typing.get_origin(typ)
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise UserError(f"config key '{key_}' expects a list like [0.5, 1.0], got {_shown(value)}")
        return [_coerce(key_, v, item) for v in value]
    if origin in (typing.Union, types.UnionType):  # e.g. image_size: int | list[int]
        options = typing.get_args(typ)
        for option in options:
            try:
                return _coerce(key_, value, option)
            except UserError:
                continue
        names = " or ".join("a list" if typing.get_origin(o) is list else o.__name__ for o in options)
        raise UserError(f"config key '{key_}' expects {names}, got {_shown(value)}")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. resume=123 or name=2024 is meant as text
    if typ is str and isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()  # YAML reads name: 2024-01-01 as a date; it is meant as text too
    if typ is str and value is None:
        return ""
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        kind = "" if isinstance(value, (bytes, bytearray)) else \
            f" ({_KINDS.get(type(value).__name__, type(value).__name__)})"
        raise UserError(f"config key '{key_}' expects {typ.__name__}, got {_shown(value)}{kind}")
    return value


def _resolve(key_: str) -> tuple[str, str]:
    """Map a dotted or unique leaf key to (section, field)."""
    secs = sections()
    if "." in key_:
        sec, _, leaf = key_.partition(".")
        if sec in secs and leaf in _fields(secs[sec]):
            return sec, leaf
        raise UserError(f"unknown config key '{key_}'{_nearest(key_)}")
    owners = [s for s, cls in secs.items() if key_ in _fields(cls)]
    if len(owners) == 1:
        return owners[0], key_
    if len(owners) > 1:
        raise UserError(f"config key '{key_}' is ambiguous; write one of: {', '.join(f'{o}.{key_}' for o in owners)}")
    raise UserError(f"unknown config key '{key_}'{_nearest(key_)}")


RENAMED = {"model.compile": ("train.compile", {True: "default", False: "none"}),
           "train.compile": ("train.compile", {True: "default", False: "none"})}
"""Keys of earlier versions (and yes/no for a key that became a word) -> (the key now, old value -> new
value): old configs and saved runs still load."""


def _set(cfg: Config, key_: str, value) -> None:
    if key_ in RENAMED and isinstance(value, bool):
        new, values = RENAMED[key_]
        if value and new != key_:  # the default (false) is in every saved config: only a choice gets a note
            import sys

            print(f"note: config key '{key_}' is now '{new}'; read {key_}={str(value).lower()} as "
                  f"{new}={values[value]}", file=sys.stderr)
        key_, value = new, values[value]
    sec, leaf = _resolve(key_)
    section = getattr(cfg, sec)
    typ = _fields(type(section))[leaf].type
    setattr(section, leaf, _coerce(f"{sec}.{leaf}", value, typ))


# ----------------------------------------------------------------------------- validation
def validate_section(section) -> None:
    """Check every key of one section (``cfg.augment``, or an ``AugmentConfig(...)`` built in code)
    against its declared range, choices and check; UserError naming the first bad key."""
    name = next(n for n, cls in sections().items() if isinstance(section, cls))
    for leaf, f in _fields(type(section)).items():
        key_, value = f"{name}.{leaf}", getattr(section, leaf)
        rng, allowed, check = f.metadata.get("range"), f.metadata.get("choices"), f.metadata.get("check")
        if rng is not None:
            for v in value if isinstance(value, list) else [value]:
                if not rng.holds(v):
                    why = f" ({rng.why})" if rng.why else ""
                    raise UserError(f"config key '{key_}' must be in {rng}{why}; got {value}")
        if allowed and value not in allowed:
            raise UserError(f"config key '{key_}' must be one of {', '.join(allowed)}; got '{value}'")
        if check is not None:
            check(key_, value, section)


def validate(cfg: Config) -> Config:
    """Every section of ``cfg`` checked (see :func:`validate_section`); returns ``cfg``."""
    for name in sections():
        validate_section(getattr(cfg, name))
    return cfg


# ----------------------------------------------------------------------------- loading
class _DuplicateKey(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key repeated in one mapping (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict = {}
            for key_node, _ in node.value:
                k = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                if k in lines:
                    raise _DuplicateKey(f"key '{k}' appears twice (lines {lines[k]} and {line}); keep one")
                lines[k] = line
        return super().construct_mapping(node, deep=deep)


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise UserError(f"override '{text}' is not key=value (e.g. train.epochs=5)")
    key_, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key_.strip(), value


def read_yaml(path: Path) -> dict:
    """A YAML config file as a mapping of sections; UserError for a missing, unreadable, invalid or
    duplicate-keyed file."""
    if not path.is_file():
        raise UserError(f"config file '{path}' not found; pass an existing YAML file (see configs/)")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader) or {}
    except _DuplicateKey as e:
        raise UserError(f"config file '{path}': {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"config file '{path}' is not valid YAML: {e}".splitlines()[0]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config file '{path}' cannot be read as text ({e}); pass a readable YAML file") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of sections (data:, model:, ...)")
    return data


def _apply(cfg: Config, data: dict, where: str, strict: bool = True) -> list[str]:
    """Set every ``section: {key: value}`` of ``data`` on ``cfg``; returns the keys skipped (``strict=False``)."""
    skipped = []
    for sec, body in data.items():
        if not isinstance(body, dict):
            raise UserError(f"{where}: section '{sec}' must be a mapping"
                            f"{_nearest(str(sec)) if sec not in sections() else ''}")
        for k, v in body.items():
            try:
                _set(cfg, f"{sec}.{k}", v)
            except UserError:
                if strict or f"{sec}.{k}" in valid_keys():
                    raise
                skipped.append(f"{sec}.{k}")
    return skipped


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults <- YAML file (nested sections) <- ``key=value`` overrides; validated."""
    cfg = Config()
    if path:
        _apply(cfg, read_yaml(Path(path)), f"config file '{path}'")
    for text in overrides:
        _set(cfg, *_parse_override(text))
    return validate(cfg)


def config_from_dict(data: dict, strict: bool = True) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. a saved run's config.yaml, a model's
    ``segdist.json``), validated. ``strict=False`` (reading a model saved by another segdist version)
    skips keys this version does not know instead of refusing them."""
    cfg = Config()
    _apply(cfg, data, "saved config", strict)
    return validate(cfg)


def save_config(cfg: Config, path: str | Path, header: str = "") -> None:
    """``cfg`` as YAML (loadable with ``--config``); ``header`` goes first, as ``#`` comment lines."""
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    atomic_write_text(path, comment + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
