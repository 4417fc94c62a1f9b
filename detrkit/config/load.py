# SPDX-License-Identifier: Apache-2.0
"""Load, validate, override and dump experiment configs.

A config is YAML read by a *safe* loader (no tag can construct Python objects) and validated
strictly against the frozen dataclasses of ``config/schema.py``: every key must exist, every value
must have the declared type. Errors are ``UserError`` messages that name the dotted key, the file
(or ``--set``) it came from and the nearest valid key.

Presets live in ``detrkit/configs/*.yaml`` and are found by name; a preset (or a user file) may name
``base: other_preset`` and override a few keys. ``--set a.b.c=value`` overrides are applied to the
merged dictionary before the final validation.
"""

from __future__ import annotations

import difflib
import importlib.resources
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from detrkit.config.data_checks import validate_data_config
from detrkit.config.schema import ExperimentConfig
from detrkit.config.validate import (
    accepts,
    check_minimums,
    config_from_dict,
    config_to_dict,
    describe_value,
    field_type,
)
from detrkit.errors import UserError

__all__ = [
    "config_from_dict",
    "PresetInfo",
    "config_to_dict",
    "describe_preset",
    "dump_config",
    "list_presets",
    "load_config",
]

PRESET_PACKAGE = "detrkit.configs"
BASE_KEY = "base"
OVERRIDE_SOURCE = "--set"
_YAML_SUFFIXES = (".yaml", ".yml")
_FLOAT_TAG = "tag:yaml.org,2002:float"
_SUGGESTED_PRESETS = 5  # names an unknown preset's message suggests


class _SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (``1e-4`` would be the *string* "1e-4"),
    which surprises everyone writing learning rates. Only the float resolver changes; the
    constructors are SafeLoader's, so no tag can build a Python object.
    """


_SafeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SafeLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
        |\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


# --------------------------------------------------------------------------- YAML files


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path``, readable again by :func:`load_config`."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def list_presets() -> list[str]:
    """Names of the presets shipped in ``detrkit/configs`` (sorted)."""
    folder = importlib.resources.files(PRESET_PACKAGE)
    return sorted(
        entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml")
    )


@dataclass(frozen=True)
class PresetInfo:
    """What ``detrkit presets`` shows of a preset, read from the comment lines heading its file.

    Attributes:
        name: the preset name (``--config NAME``).
        description: the first sentence of the heading comment, without the AP and references.
        published_ap: COCO box AP the preset reproduces from its paper or repository; None when
            it reproduces no published number (the comment gives none, or one measured with a
            different backbone, "... AP with Swin-L").
    """

    name: str
    description: str
    published_ap: float | None


# "46.9 AP", but not "60.3 AP50" nor an AP measured on another set-up ("56.1 AP with Swin-L").
_PUBLISHED_AP = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?) AP\b(?!\s+with\b)")
_SENTENCE_END = re.compile(r"(?<=[.;])\s+(?=[A-Z(])|;\s+")
_REFERENCE = re.compile(r"\s*\([^()]*(?:docs/|COCO val5k)[^()]*\)")
_AP_CLAUSE = re.compile(r":\s*\d+(?:\.\d+)? AP\b.*$")


def describe_preset(name: str) -> PresetInfo:
    """Description and published AP of preset ``name``, from its heading comment lines.

    Raises:
        UserError: no such preset (the message lists the nearest names).
    """
    text, _ = _read_preset(name)
    heading = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        heading.append(line.lstrip("#").strip())
    comment = " ".join(heading)
    found = _PUBLISHED_AP.search(comment)
    first = _SENTENCE_END.split(comment, maxsplit=1)[0].rstrip(".")
    description = _AP_CLAUSE.sub("", _REFERENCE.sub("", first)).strip()
    return PresetInfo(name, description, float(found.group(1)) if found else None)


def _parse_yaml(text: str, source: str) -> Any:
    """Parse YAML safely; syntax errors and object-constructing tags become UserErrors."""
    try:
        return yaml.load(text, Loader=_SafeLoader)  # a SafeLoader subclass: safe
    except yaml.constructor.ConstructorError as err:
        raise UserError(
            f"{source}{_mark(err)}: YAML tag not allowed ({err.problem}); configs may only "
            "contain plain mappings, lists, strings, numbers, booleans and null"
        ) from None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"invalid YAML in {source}{_mark(err)}: {problem}") from None


def _mark(err: yaml.YAMLError) -> str:
    """The ``, line L, column C`` suffix of a YAML error message, when PyYAML knows it."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return ""
    return f", line {mark.line + 1}, column {mark.column + 1}"


def _read_preset(name: str) -> tuple[str, str]:
    """Text and display name of preset ``name``; UserError listing presets if unknown."""
    entry = importlib.resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml")
    if not entry.is_file():
        raise UserError(f"unknown config preset '{name}'; {_suggest_presets(name)}")
    return entry.read_text(encoding="utf-8"), f"{name}.yaml"


def _suggest_presets(name: str) -> str:
    """The presets an unknown name probably meant, else one per family (the shortest name)."""
    presets = list_presets()
    close = difflib.get_close_matches(name, presets, n=_SUGGESTED_PRESETS, cutoff=0.6)
    if close:
        found = "closest names (nearest first): " + ", ".join(close)
    else:
        shortest: dict[str, str] = {}
        for preset in sorted(presets, key=len):
            shortest.setdefault(preset.split("_", 1)[0], preset)
        found = "none is close; one per family: " + ", ".join(sorted(shortest.values()))
    return f"{found}; 'detrkit presets' lists all {len(presets)}"


def _read_path(path: Path) -> tuple[str, str]:
    """Text and display name of config file ``path``."""
    if not path.is_file():
        hint = ""
        if path.stem in list_presets() and not path.parent.name:
            hint = f" (to use the preset, pass its name without '.yaml': {path.stem})"
        raise UserError(f"config file not found: {path}{hint}")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read config file {path}: {err}") from None


def _is_path(name_or_path: str) -> bool:
    """A config argument is a path if it has a YAML suffix or a directory part."""
    return name_or_path.endswith(_YAML_SUFFIXES) or "/" in name_or_path or "\\" in name_or_path


def _load_tree(ref: str, relative_to: Path | None, chain: tuple[str, ...]) -> dict[str, Any]:
    """Read preset or file ``ref`` and its ``base`` chain into one merged dict.

    Each file is validated on its own first, so an error names the file that contains it.
    """
    if _is_path(ref):
        path = Path(ref) if relative_to is None else relative_to / ref
        ident = str(path.resolve())
        text, source = _read_path(path)
        folder: Path | None = path.parent
    else:
        ident, folder = f"preset:{ref}", None
        text, source = _read_preset(ref)
    if ident in chain:
        names = [c.removeprefix("preset:") for c in (*chain, ident)]
        raise UserError("config base cycle: " + " -> ".join(names))
    data = _parse_yaml(text, source)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(f"{source} must contain a YAML mapping, got {describe_value(data)}")
    base = data.pop(BASE_KEY, None)
    config_from_dict(data, source=source)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(
            f"'{BASE_KEY}' in {source} must be a preset name or path; got {describe_value(base)}"
        )
    return _deep_merge(_load_tree(base, folder, (*chain, ident)), data)


def _deep_merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``; nested mappings merge, anything else (lists too) replaces."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------- overrides


def _apply_override(data: dict[str, Any], override: str) -> dict[str, Any]:
    """Apply one ``a.b.c=value`` string to ``data`` (a new dict is returned)."""
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override '{override}' must look like key=value, e.g. train.epochs=50")
    tp = field_type(ExperimentConfig, key, OVERRIDE_SOURCE)
    value = _parse_yaml(raw, f"{OVERRIDE_SOURCE} {key}")
    # ``data.train_split=2017`` means the string "2017": keep the raw text for str fields.
    if isinstance(value, (bool, int, float)) and _accepts_str(tp) and not accepts(value, tp):
        value = raw.strip()
    for part in reversed(key.split(".")):
        value = {part: value}
    return _deep_merge(data, value)


def _accepts_str(tp: Any) -> bool:
    """Whether a field of type ``tp`` takes a plain string."""
    return tp is str or str in typing.get_args(tp)


def load_config(name_or_path: str | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load a preset name or YAML path, resolve ``base`` chains, apply overrides, validate.

    Args:
        name_or_path: a preset name (``detr_r50``, see :func:`list_presets`), a path to a YAML
            file, or None for the schema defaults.
        overrides: ``"a.b.c=value"`` strings; values are parsed as YAML (``true``, ``0.1``,
            ``[1, 2]``, ``null``; ``{}`` turns an optional section, e.g. a training scheme
            under ``model.schemes``, on with its defaults).

    Raises:
        UserError: unknown preset, missing file, bad YAML, unknown key, wrong type, base cycle.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if name_or_path is not None:
        data = _load_tree(name_or_path, None, ())
        source = name_or_path if _is_path(name_or_path) else f"{name_or_path}.yaml"
    return config_from_mapping(data, overrides, source=source)


def config_from_mapping(
    data: Mapping[str, Any], overrides: Sequence[str] = (), *, source: str
) -> ExperimentConfig:
    """Validate a plain config dict (e.g. the one a checkpoint stores), then apply overrides.

    Args:
        data: a ``config_to_dict`` mapping (no ``base`` key).
        overrides: ``"a.b.c=value"`` strings, as for :func:`load_config`.
        source: where ``data`` came from, quoted in errors.
    """
    data = dict(data)
    config = config_from_dict(data, source=source)
    if overrides:
        for override in overrides:
            data = _apply_override(data, override)
        source = OVERRIDE_SOURCE
        config = config_from_dict(data, source=source)
    check_minimums(config, source)
    validate_data_config(config.data, source)
    return config
