# SPDX-License-Identifier: Apache-2.0
"""The scheme registry: every training scheme registers its name, typed options, builder,
config checks and a display name here, from its own module in ``detrkit/schemes/``.

``model.schemes: {name: {...}}`` is validated against this registry, so adding a scheme is one
new file: nothing in config, build, criterion, detector or decoder names it.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from detrkit.errors import UserError

# Installed packages declare their schemes' modules under this entry-point group.
ENTRY_POINT_GROUP = "detrkit.schemes"
# Modules of this package that are infrastructure, not schemes.
_NOT_SCHEMES = frozenset({"base", "registry"})


@dataclass(frozen=True)
class SchemeContext:
    """What a scheme builder may read.

    Attributes:
        model: the model config being built (``detrkit.config.schema.ModelConfig``; schemes
            read it, they never import the config package).
        head: the initialised detection head (schemes with their own heads copy it).
        num_classes: object classes.
        num_logits: class logits per query (C, +1 for softmax heads).
    """

    model: Any
    head: nn.Module
    num_classes: int
    num_logits: int


@dataclass(frozen=True)
class SchemeSpec:
    """One registered scheme.

    Attributes:
        name: the key under ``model.schemes``.
        config: a frozen dataclass of the scheme's options (validated like every config section:
            unknown keys are errors naming the nearest valid key).
        build: ``build(context, options) -> TrainingScheme``.
        check: ``check(model_config, options)`` raises ``UserError`` naming the keys to change
            when the scheme cannot work with the rest of the model; None = nothing to check.
        family: how the start-up summary names a model trained with it, e.g. "H-DETR".
    """

    name: str
    config: type
    build: Callable[[SchemeContext, Any], nn.Module]
    check: Callable[[Any, Any], None] | None = None
    family: str = ""


_REGISTRY: dict[str, SchemeSpec] = {}
_loaded = False


def register_scheme(spec: SchemeSpec) -> SchemeSpec:
    """Add ``spec`` to the registry (a scheme module calls this at import)."""
    existing = _REGISTRY.get(spec.name)
    if existing is not None and existing != spec:
        raise ValueError(f"a training scheme named '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_scheme(name: str) -> None:
    """Remove a scheme (tests that register their own)."""
    _REGISTRY.pop(name, None)


def registered_schemes() -> dict[str, SchemeSpec]:
    """Every scheme by name: the modules of this package first (imported once, in name
    order), then those of installed packages that declare a ``detrkit.schemes`` entry point
    (the module is imported; it registers itself), then any registered from elsewhere, in
    registration order."""
    global _loaded
    if not _loaded:
        _loaded = True
        package = importlib.import_module("detrkit.schemes")
        for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            if module.name not in _NOT_SCHEMES:
                importlib.import_module(f"detrkit.schemes.{module.name}")
        for entry in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            entry.load()
    return dict(_REGISTRY)


def scheme_spec(name: str, source: str = "the config") -> SchemeSpec:
    """The registered scheme ``name``; ``UserError`` naming the nearest one otherwise."""
    schemes = registered_schemes()
    if name in schemes:
        return schemes[name]
    close = difflib.get_close_matches(name, list(schemes), n=1, cutoff=0.0)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(
        f"unknown training scheme 'model.schemes.{name}' in {source}{hint} "
        f"(known: {', '.join(schemes)})"
    )
