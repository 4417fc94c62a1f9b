# SPDX-License-Identifier: Apache-2.0
"""The class layout of an official checkpoint: its number of classes, read from the class head,
and the label map its converted checkpoint gets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from torch import Tensor

from detrkit.config.schema import ExperimentConfig
from detrkit.data.coco_names import COCO_SLOT_COUNTS, coco_label_names, coco_unused_ids
from detrkit.data.labels import LabelMap

# DETR / SMCA store one class head, the Deformable family one per decoder layer.
_CLASS_HEAD_KEYS = ("class_embed.weight", "class_embed.0.weight")


def head_rows(state: Mapping[str, Tensor]) -> int | None:
    """Rows (logits) of the official class head, None when the state dict has none."""
    for key in _CLASS_HEAD_KEYS:
        weight = state.get(key)
        if isinstance(weight, Tensor) and weight.dim() == 2:
            return int(weight.shape[0])
    return None


def with_head_classes(config: ExperimentConfig, state: Mapping[str, Tensor]) -> ExperimentConfig:
    """``config`` with ``num_classes`` taken from the class head: the originals choose it from
    ``--dataset_file`` (Deformable DETR's ``build()`` uses 20 for anything but COCO), so the
    weights, not the arguments, say what it was. Softmax heads add a no-object row."""
    rows = head_rows(state)
    if rows is None:
        return config
    no_object = 1 if config.model.loss.class_loss == "softmax_ce" else 0
    return replace(config, model=replace(config.model, num_classes=rows - no_object))


def official_label_map(num_classes: int) -> LabelMap:
    """Label i is category id i, as the originals predict raw ids. A COCO-sized head gets the
    COCO names and its "N/A" slots marked unused; any other size plain names "0".."N-1"."""
    if num_classes in COCO_SLOT_COUNTS:
        ids = tuple(range(num_classes))
        return LabelMap(ids, coco_label_names(num_classes), coco_unused_ids(num_classes))
    return LabelMap.identity(num_classes)
