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


# H-DETR suffixes its one-to-many outputs and losses with "_one2many".
_O2M = "_one2many"


def _group_of(suffixed: bool) -> str:
    return "o2m" if suffixed else "main"


def official_output(path: str, num_layers: int) -> OutputRef | None:
    """``pred_logits`` / ``aux_outputs.{i}.pred_boxes`` / ``enc_outputs.pred_logits`` /
    ``aux_outputs_one2many.{i}.pred_logits`` ... -> OutputRef; None when not mapped."""
    if path == "enc_outputs.anchors":
        return OutputRef("enc", 0, "anchors")
    if path.startswith("o2m_outputs."):  # MS-DETR's one-to-many predictions
        inner = official_output(path[len("o2m_outputs.") :], num_layers)
        return None if inner is None else OutputRef("ms_o2m", inner.layer, inner.field)
    match = re.fullmatch(
        r"(?:aux_outputs(_one2many)?\.(\d+)\.|(enc_outputs)\.)?(pred_logits|pred_boxes)(_one2many)?",
        path,
    )
    if not match:
        return None
    field = _FIELDS[match.group(4)]
    if match.group(3):
        return OutputRef("enc", 0, field)
    group = _group_of(bool(match.group(1) or match.group(5)))
    layer = int(match.group(2)) if match.group(2) is not None else num_layers - 1
    return OutputRef(group, layer, field)


def official_loss(name: str, num_layers: int) -> str | None:
    """``loss_ce`` / ``loss_giou_2`` / ``loss_bbox_enc`` / ``loss_ce_0_one2many`` -> detrkit
    names (``main/cls/d{L-1}``, ``main/giou/d2``, ``enc/l1/d0``, ``o2m/cls/d0``); else None."""
    match = re.fullmatch(r"(loss_ce|loss_bbox|loss_giou)(?:_(\d+|enc))?(_one2many|_o2m)?", name)
    if not match:
        return None
    term = _TERMS[match.group(1)]
    if match.group(2) == "enc":
        return f"enc/{term}/d0"
    layer = int(match.group(2)) if match.group(2) is not None else num_layers - 1
    group = {None: "main", "_one2many": "o2m", "_o2m": "ms_o2m"}[match.group(3)]
    return f"{group}/{term}/d{layer}"


def official_match_path(path: str, num_layers: int) -> tuple[str, int] | None:
    """Matcher-call path ("final", "aux_outputs.{i}", "enc_outputs", "pred_logits_one2many",
    "aux_outputs_one2many.{i}") -> (group, layer)."""
    if path == "final":
        return "main", num_layers - 1
    if path == "enc_outputs":
        return "enc", 0
    if path == "pred_logits_one2many":
        return "o2m", num_layers - 1
    if path == "o2m_outputs":
        return "ms_o2m", num_layers - 1
    if path.startswith("o2m_outputs."):
        inner = official_match_path(path[len("o2m_outputs.") :], num_layers)
        return None if inner is None else ("ms_o2m", inner[1])
    match = re.fullmatch(r"aux_outputs(_one2many)?\.(\d+)", path)
    return (_group_of(bool(match.group(1))), int(match.group(2))) if match else None
