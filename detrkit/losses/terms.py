# SPDX-License-Identifier: Apache-2.0
"""Loss terms over matched (query, target) pairs (docs/methods.md#losses).

Every term has the signature ``(logits [B, Q, C], boxes [B, Q, 4] cxcywh, targets, matches,
num_boxes, valid=None) -> scalar``; ``matches`` holds, per image, (query indices, target
indices); ``valid`` [B, Q] bool marks padding queries (False), which take no loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from detrkit.ops.boxes import box_cxcywh_to_xyxy, paired_generalized_box_iou
from detrkit.structures import Target

Match = tuple[Tensor, Tensor]
# Cross-entropy's ignore_index: padding queries take no loss.
IGNORED = -100


def matched_pairs(
    boxes: Tensor, targets: Sequence[Target], matches: Sequence[Match]
) -> tuple[Tensor, Tensor]:
    """Gather matched predictions and targets: -> ([M, 4], [M, 4]) cxcywh."""
    predicted = torch.cat([boxes[i, src] for i, (src, _) in enumerate(matches)])
    wanted = torch.cat([t.boxes[tgt] for t, (_, tgt) in zip(targets, matches)])
    return predicted, wanted.to(predicted.dtype)


def class_targets(
    logits: Tensor, targets: Sequence[Target], matches: Sequence[Match], fill: int
) -> Tensor:
    """[B, Q] int64 labels: the matched target's label, ``fill`` for unmatched queries."""
    labels = torch.full(logits.shape[:2], fill, dtype=torch.int64, device=logits.device)
    for image, (target, (src, tgt)) in enumerate(zip(targets, matches)):
        labels[image, src.to(labels.device)] = target.labels[tgt]
    return labels


class SoftmaxCrossEntropyTerm(nn.Module):
    """Cross-entropy over C + 1 logits; unmatched queries target "no object" (the last index).

    A weighted mean over all queries, *not* divided by num_boxes (as DETR).

    Args:
        num_classes: C (real classes).
        eos_coef: weight of the no-object class.
    """

    def __init__(self, num_classes: int, eos_coef: float = 0.1) -> None:
        super().__init__()
        weight = torch.ones(num_classes + 1)
        weight[-1] = eos_coef
        self.register_buffer("class_weight", weight, persistent=False)
        self.num_classes = num_classes

    def forward(self, logits, boxes, targets, matches, num_boxes, valid=None) -> Tensor:
        labels = class_targets(logits, targets, matches, fill=self.num_classes)
        if valid is not None:
            labels = labels.masked_fill(~valid, IGNORED)
        return F.cross_entropy(
            logits.transpose(1, 2), labels, self.class_weight, ignore_index=IGNORED
        )


class SigmoidFocalTerm(nn.Module):
    """Sigmoid focal loss against one-hot targets, summed and divided by num_boxes."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha, self.gamma = alpha, gamma

    def forward(self, logits, boxes, targets, matches, num_boxes, valid=None) -> Tensor:
        num_classes = logits.shape[-1]
        labels = class_targets(logits, targets, matches, fill=num_classes)
        one_hot = F.one_hot(labels, num_classes + 1)[..., :-1].to(logits.dtype)
        if valid is None:
            loss = sigmoid_focal_loss(logits, one_hot, self.alpha, self.gamma, reduction="sum")
        else:
            loss = sigmoid_focal_loss(logits, one_hot, self.alpha, self.gamma, reduction="none")
            loss = (loss * valid[..., None]).sum()
        return loss / num_boxes


class L1Term(nn.Module):
    """Sum of |predicted - target| over matched cxcywh boxes, divided by num_boxes."""

    def forward(self, logits, boxes, targets, matches, num_boxes, valid=None) -> Tensor:
        predicted, wanted = matched_pairs(boxes, targets, matches)
        return F.l1_loss(predicted, wanted, reduction="sum") / num_boxes


class GIoUTerm(nn.Module):
    """Sum of (1 - GIoU) over matched boxes, divided by num_boxes."""

    def forward(self, logits, boxes, targets, matches, num_boxes, valid=None) -> Tensor:
        predicted, wanted = matched_pairs(boxes, targets, matches)
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(predicted), box_cxcywh_to_xyxy(wanted))
        return (1 - giou).sum() / num_boxes
