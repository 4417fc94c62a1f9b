# SPDX-License-Identifier: Apache-2.0
"""Swin backbones inside official DETR-style checkpoints (H-DETR,
docs/methods.md#h-detr-checkpoints).

The official detection Swin stores ``backbone.0.body.layers.{i}.downsample`` at the end of stage
i; detrkit's Swin (timm's modules) keeps it at the start of stage i + 1. The relative position
index is a buffer rebuilt from the window size, so it is dropped. Every other Swin key, the
extra output norms ``norm{1,2,3}`` included, keeps its name under ``backbone.`` (the generic
``backbone.0.body.`` rule that follows these).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from detrkit.convert.rules import RenameRule

_BODY = r"backbone\.0\.body"
# Patch merging sits between the four Swin stages.
_NUM_MERGES = 3


def is_swin(args: Mapping[str, Any]) -> bool:
    """Whether an official run's ``--backbone`` is a Swin (swin_tiny, swin_large_window12, ...)."""
    return str(args.get("backbone", "")).startswith("swin")


def swin_rules(args: Mapping[str, Any], prefix: str = _BODY) -> tuple[RenameRule, ...]:
    """Rename rules for the Swin part of an official checkpoint; none for other backbones.

    They must come before the generic ``backbone.0.body.(.+)`` rule (the first match wins).

    Args:
        prefix: regex of where the checkpoint keeps the Swin (DINO: ``backbone\\.0``).
    """
    if not is_swin(args):
        return ()
    shifts = tuple(
        RenameRule(
            rf"{prefix}\.layers\.{stage}\.downsample\.(.+)",
            rf"backbone.layers.{stage + 1}.downsample.\1",
        )
        for stage in range(_NUM_MERGES)
    )
    buffers = RenameRule(
        rf"{prefix}\.layers\.\d+\.blocks\.\d+\.(attn\.relative_position_index|attn_mask)", None
    )
    return (buffers, *shifts)
