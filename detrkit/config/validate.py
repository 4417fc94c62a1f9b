# SPDX-License-Identifier: Apache-2.0
"""Strict validation of plain dicts against the config dataclasses, and the way back.

``config_from_dict`` walks the dataclasses with ``typing.get_type_hints`` and accepts only keys
and value types the schema declares; errors name the dotted key, the source and, for unknown
keys, the nearest valid key. ``config_to_dict`` is its inverse (tuples become YAML lists).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

from detrkit.config.schema import ExperimentConfig
from detrkit.errors import UserError

__all__ = [
    "accepts",
    "config_from_dict",
    "config_to_dict",
    "check_minimums",
    "describe_value",
    "field_type",
    "nearest",
]

T = TypeVar("T")


# Smallest allowed value of integer keys whose type alone admits nonsense (0 epochs, no batch).
MINIMUMS = {
    "model.hidden_dim": 1,
    "model.num_heads": 1,
    "model.num_queries": 1,
    "model.encoder.num_layers": 0,
    "model.decoder.num_layers": 1,
    "data.batch_size": 1,
    "data.eval_batch_size": 1,
    "data.num_workers": 0,
    "train.epochs": 1,
    "train.grad_accum_steps": 1,
    "train.eval_every": 0,
    "train.checkpoint_every": 0,
    "train.keep_last": 1,
    "train.log_every": 1,
    "train.max_nonfinite_steps": 1,
}


def check_minimums(cfg: ExperimentConfig, source: str) -> None:
    """Raise ``UserError`` naming the first key in ``MINIMUMS`` below its minimum."""
    for key, minimum in MINIMUMS.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value < minimum:
            raise UserError(f"{key}={value} in {source} must be at least {minimum}")


def config_from_dict(data: Mapping, cls: type[T] = ExperimentConfig, *, source: str) -> T:
    """Build a (nested) config dataclass from a plain mapping, strictly.

    Missing keys take the dataclass defaults. Lists become tuples, an int is accepted for a float
    field (a bool is never accepted as a number), ``X | None`` accepts null and ``Literal`` fields
    accept only their listed values.

    Args:
        data: mapping of field names to values, e.g. parsed YAML.
        cls: the dataclass to build.
        source: where ``data`` came from (a file name or ``"--set"``), quoted in errors.

    Raises:
        UserError: unknown key (with the nearest valid key) or a value of the wrong type.
    """
    return _build_dataclass(data, cls, prefix="", source=source, root=cls)


def _build_dataclass(data: Any, cls: type, *, prefix: str, source: str, root: type) -> Any:
    """Validate ``data`` against dataclass ``cls``; ``prefix`` is its dotted key in ``root``."""
    if not isinstance(data, Mapping):
        where = f"config key '{prefix[:-1]}'" if prefix else "config"
        raise UserError(f"{where} in {source} must be a mapping, got {describe_value(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in names:
            raise UserError(_unknown_key_message(str(dotted), source, root))
        kwargs[key] = _coerce(value, hints[key], dotted, source, root)
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str, source: str, root: type) -> Any:
    """Check ``value`` against type ``tp`` and return it in canonical form (lists → tuples)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(value, tp, prefix=f"{key}.", source=source, root=root)
    if _is_config_mapping(tp):
        return _build_mapping(value, tp, key, source, root)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key, source, root)
    if origin is Literal:
        choices = typing.get_args(tp)
        if any(type(value) is type(c) and value == c for c in choices):
            return value
        allowed = ", ".join(repr(c) for c in choices)
        raise UserError(
            f"config key '{key}' in {source} must be one of {allowed}; got {describe_value(value)}"
        )
    if origin is tuple:
        return _coerce_tuple(value, tp, key, source, root)
    if _scalar_ok(value, tp):
        return float(value) if tp is float else value
    raise _type_error(value, tp, key, source)


def _is_config_mapping(tp: Any) -> bool:
    """A mapping of names to typed sections, each name's type looked up by the class
    (``model.schemes``)."""
    return isinstance(tp, type) and getattr(tp, "config_mapping", False)


def _build_mapping(data: Any, tp: type, key: str, source: str, root: type) -> Any:
    """Validate ``{name: section}``; a null section is left out (turned off)."""
    if data is None:
        return tp()
    if not isinstance(data, Mapping):
        raise UserError(
            f"config key '{key}' in {source} must be a mapping, got {describe_value(data)}"
        )
    sections = {}
    for name, section in data.items():
        section_type = tp.value_type(str(name), source)
        if section is not None:
            sections[name] = _build_dataclass(
                section, section_type, prefix=f"{key}.{name}.", source=source, root=root
            )
    return tp(sections)


def _coerce_union(value: Any, tp: Any, key: str, source: str, root: type) -> Any:
    """Try the members of a ``Union``/``X | None`` in order."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    if len(members) == 1 and dataclasses.is_dataclass(members[0]):
        # Errors inside an optional section name the inner key; keep them.
        return _coerce(value, members[0], key, source, root)
    if len(members) == 1:
        try:
            return _coerce(value, members[0], key, source, root)
        except UserError:
            raise _type_error(value, tp, key, source) from None
    for member in members:
        try:
            return _coerce(value, member, key, source, root)
        except UserError:
            continue
    raise _type_error(value, tp, key, source)


def _coerce_tuple(value: Any, tp: Any, key: str, source: str, root: type) -> tuple:
    """Validate a list (YAML) or tuple against ``tuple[X, ...]`` or a fixed ``tuple[X, Y]``."""
    if not isinstance(value, (list, tuple)):
        raise _type_error(value, tp, key, source)
    args = typing.get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        element_types = [args[0]] * len(value)
    elif len(args) == len(value):
        element_types = list(args)
    else:
        raise _type_error(value, tp, key, source)
    try:
        return tuple(
            _coerce(item, item_tp, f"{key}[{i}]", source, root)
            for i, (item, item_tp) in enumerate(zip(value, element_types, strict=True))
        )
    except UserError:
        raise _type_error(value, tp, key, source) from None


def _scalar_ok(value: Any, tp: Any) -> bool:
    """Strict scalar check: bool is not an int, an int is a float, None only for NoneType."""
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is type(None):
        return value is None
    raise TypeError(f"config schema uses an unsupported type {tp!r}")


def _type_error(value: Any, tp: Any, key: str, source: str) -> UserError:
    """The wrong-type error for ``key``."""
    return UserError(
        f"config key '{key}' in {source} expects {_type_name(tp)}; got {describe_value(value)}"
    )


def _type_name(tp: Any) -> str:
    """Human-readable name of a schema type, in YAML terms (tuples are lists)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} values [{', '.join(_type_name(a) for a in args)}]"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp) or _is_config_mapping(tp):
        return "a mapping"
    return getattr(tp, "__name__", repr(tp))


def describe_value(value: Any) -> str:
    """``repr`` of a user value with its YAML-level type, shortened."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


# --------------------------------------------------------------------------- key look-up


def _schema_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of dataclass ``cls``, nested sections included."""
    if _is_config_mapping(cls):
        keys = []
        for name in cls.known_names():
            keys.append(prefix + name)
            keys.extend(_schema_keys(cls.value_type(name, ""), f"{prefix}{name}."))
        return keys
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        keys.append(prefix + name)
        nested = _nested_dataclass(tp)
        if nested is not None:
            keys.extend(_schema_keys(nested, f"{prefix}{name}."))
    return keys


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass (or config mapping) inside ``tp`` (``C`` or ``C | None``), else None."""
    if dataclasses.is_dataclass(tp) or _is_config_mapping(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def nearest(word: str, candidates: Sequence[str]) -> list[str]:
    """Candidates sorted by similarity to ``word``, most similar first."""
    ratio = {c: difflib.SequenceMatcher(None, word, c).ratio() for c in candidates}
    return sorted(candidates, key=lambda c: (-ratio[c], c))


def _unknown_key_message(key: str, source: str, root: type) -> str:
    """Message for an unknown key, naming the nearest dotted key of the schema."""
    keys = _schema_keys(root)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        # A key put in the wrong section (``train.batch_size``): match on the last name.
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in nearest(leaf, keys) if k.rsplit(".", 1)[-1] == leaf][:1]
    if not close:
        close = nearest(key, keys)[:1]
    return f"unknown key '{key}' in {source}; did you mean '{close[0]}'?"


def field_type(root: type, key: str, source: str) -> Any:
    """Schema type of dotted ``key``; UserError naming the nearest key if it does not exist."""
    cls: Any = root
    tp: Any = None
    for part in key.split("."):
        if cls is not None and _is_config_mapping(cls):
            section = cls.value_type(part, source)
            tp, cls = section | None, section
            continue
        hints = typing.get_type_hints(cls) if cls is not None else {}
        if part not in hints:
            raise UserError(_unknown_key_message(key, source, root))
        tp = hints[part]
        cls = _nested_dataclass(tp)
    return tp


# --------------------------------------------------------------------------- to dict / YAML


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-able dict of a config dataclass (tuples become lists)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _plain(value: Any) -> Any:
    """Recursive helper of :func:`config_to_dict`."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if _is_config_mapping(type(value)):
        return {name: _plain(section) for name, section in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def accepts(value: Any, tp: Any) -> bool:
    """Whether ``value`` validates against ``tp``."""
    try:
        _coerce(value, tp, "", "", ExperimentConfig)
    except UserError:
        return False
    return True
