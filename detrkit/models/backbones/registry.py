# SPDX-License-Identifier: Apache-2.0
"""Backbones by name: every family registers a factory here; ``build_backbone`` builds one.

The contract every backbone keeps (the neck relies on nothing else):

* ``forward(pixels [B, 3, H, W]) -> {stage: [B, C_s, H / s, W / s]}`` for the requested stages,
  in increasing stride; stages are named by stride: "c2" (4), "c3" (8), "c4" (16), "c5" (32;
  16 with DC5), whatever the family calls them;
* ``out_channels`` and ``strides``: stage -> channels / stride of the returned stages, known
  before the first forward;
* ``load_pretrained(path)``: local ImageNet weights in the family's usual formats, with a
  ``UserError`` naming missing/unexpected keys when the file does not fit; never a download.

Padding masks at each stride are derived by the neck from the image mask.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

from torch import nn

from detrkit.errors import UserError
from detrkit.models.backbones.spec import BackboneSpec

BackboneFactory = Callable[[BackboneSpec, Sequence[str]], nn.Module]
_REGISTRY: dict[str, BackboneFactory] = {}


def register(*names: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register a factory ``(config, stages) -> backbone`` under ``names``."""

    def decorate(factory: BackboneFactory) -> BackboneFactory:
        for name in names:
            if name in _REGISTRY:
                raise ValueError(f"backbone {name} registered twice")
            _REGISTRY[name] = factory
        return factory

    return decorate


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def check_backbone_name(name: str) -> None:
    """``UserError`` for an unknown name, listing the closest known ones."""
    if name in _REGISTRY:
        return
    # The same ordering as ``nearest`` of the configuration's validation, kept local so that
    # the model side does not import the configuration package.
    ratio = {c: difflib.SequenceMatcher(None, name, c).ratio() for c in backbone_names()}
    close = sorted(ratio, key=lambda c: (-ratio[c], c))
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UserError(
        f"unknown model.backbone.name '{name}'{hint} (known: {', '.join(backbone_names())})"
    )


def resolved_frozen_stages(cfg: BackboneSpec, family_default: int) -> int:
    """``cfg.frozen_stages``, or the family's original setting when it is None."""
    return family_default if cfg.frozen_stages is None else cfg.frozen_stages


def build_backbone(cfg: BackboneSpec, stages: Sequence[str]) -> nn.Module:
    """The backbone ``cfg.name`` returning ``stages``, with ``cfg.weights`` loaded if set."""
    check_backbone_name(cfg.name)
    backbone = _REGISTRY[cfg.name](cfg, tuple(stages))
    if cfg.weights:
        backbone.load_pretrained(cfg.weights)
    return backbone
