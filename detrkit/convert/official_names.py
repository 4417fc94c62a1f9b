# SPDX-License-Identifier: Apache-2.0
"""Official output and loss names of the DETR-style repositories, in detrkit terms.

The originals name outputs ``pred_logits`` / ``aux_outputs.{i}.pred_boxes`` and losses
``loss_ce`` / ``loss_bbox_3``; detrkit names a (group, layer, field) and
``{group}/{term}/d{layer}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FIELDS = {"pred_logits": "logits", "pred_boxes": "boxes"}
_TERMS = {"loss_ce": "cls", "loss_bbox": "l1", "loss_giou": "giou"}


@dataclass(frozen=True)
class OutputRef:
    """Where an official output lives in a ``DetectorOutput``."""

    group: str
    layer: int
    field: str


def official_output(path: str, num_layers: int) -> OutputRef | None:
    """``pred_logits`` / ``aux_outputs.{i}.pred_boxes`` -> OutputRef; None when not mapped."""
    match = re.fullmatch(r"(?:aux_outputs\.(\d+)\.|(enc_outputs)\.)?(pred_logits|pred_boxes)", path)
    if not match:
        return None
    if match.group(2):
        return OutputRef("enc", 0, _FIELDS[match.group(3)])
    layer = int(match.group(1)) if match.group(1) is not None else num_layers - 1
    return OutputRef("main", layer, _FIELDS[match.group(3)])


def official_loss(name: str, num_layers: int) -> str | None:
    """``loss_ce`` / ``loss_giou_2`` -> ``main/cls/d{L-1}`` / ``main/giou/d2``; else None."""
    match = re.fullmatch(r"(loss_ce|loss_bbox|loss_giou)(?:_(\d+|enc))?", name)
    if not match:
        return None
    if match.group(2) == "enc":
        return f"enc/{_TERMS[match.group(1)]}/d0"
    layer = int(match.group(2)) if match.group(2) is not None else num_layers - 1
    return f"main/{_TERMS[match.group(1)]}/d{layer}"


def official_match_path(path: str, num_layers: int) -> tuple[str, int] | None:
    """Matcher-call path ("final", "aux_outputs.{i}") -> (group, layer)."""
    if path == "final":
        return "main", num_layers - 1
    if path == "enc_outputs":
        return "enc", 0
    match = re.fullmatch(r"aux_outputs\.(\d+)", path)
    return ("main", int(match.group(1))) if match else None
