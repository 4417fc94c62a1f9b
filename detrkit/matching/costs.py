# SPDX-License-Identifier: Apache-2.0
"""Pairwise matching costs between predictions and targets (docs/methods.md#hungarian-matching),
per image of a batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detrkit.ops.boxes import batched_generalized_box_iou, box_cxcywh_to_xyxy

# Inside the focal cost's logarithms (docs/methods.md#hungarian-matching; mmdet uses 1e-12).
FOCAL_COST_EPS = 1e-8


@dataclass(frozen=True)
class SoftmaxClassCost:
    """-p(label) under a softmax over C + 1 logits (DETR)."""

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        """logits: [B, N, C+1]; labels: [B, G] -> [B, N, G]."""
        return -_gather_classes(logits.softmax(-1), labels)


@dataclass(frozen=True)
class FocalClassCost:
    """Focal-loss difference pos - neg at each target's label (Deformable family)."""

    alpha: float = 0.25
    gamma: float = 2.0

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        """logits: [B, N, C]; labels: [B, G] -> [B, N, G]."""
        # Sigmoid is elementwise: gathering the G labels first spares C - G of them.
        prob = _gather_classes(logits, labels).sigmoid()
        neg = (1 - self.alpha) * prob**self.gamma * -(1 - prob + FOCAL_COST_EPS).log()
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + FOCAL_COST_EPS).log()
        return pos - neg


def _gather_classes(probs: Tensor, labels: Tensor) -> Tensor:
    """probs [B, N, C], labels [B, G] -> [B, N, G]: each query's probability of each label."""
    index = labels[:, None, :].expand(-1, probs.shape[1], -1)
    return torch.gather(probs, 2, index)


def l1_cost(boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """L1 distance of cxcywh vectors: [B, N, 4], [B, G, 4] -> [B, N, G]."""
    return torch.cdist(boxes, target_boxes, p=1)


def giou_cost(boxes: Tensor, target_boxes: Tensor) -> Tensor:
    """-GIoU of cxcywh boxes: [B, N, 4], [B, G, 4] -> [B, N, G]."""
    return -batched_generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(target_boxes))
