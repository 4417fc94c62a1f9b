# SPDX-License-Identifier: Apache-2.0
"""Quality focal loss (Li et al., Generalized Focal Loss, 2020) as a classification term: the
target of a matched query's class is the IoU of its predicted box with its target, not 1
(Co-DINO's ``QualityFocalLoss``, docs/methods.md#co-dino-losses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.losses.terms import class_targets, matched_pairs
from detrkit.ops.boxes import box_cxcywh_to_xyxy, paired_box_iou


class QualityFocalTerm(nn.Module):
    """Quality focal loss over C sigmoid logits, summed and divided by num_boxes.

    Every (query, class) logit x with target score t in [0, 1] takes
    ``BCE(x, t) * |t - sigmoid(x)|^beta``; t = 0 except at a matched query's target class,
    where t = IoU(detached predicted box, target box). Padding queries (``valid`` False) take
    no loss.

    Args:
        beta: the modulating exponent (2 in GFL and Co-DINO).
    """

    def __init__(self, beta: float = 2.0) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, logits, boxes, targets, matches, num_boxes, valid=None) -> Tensor:
        """logits [B, Q, C]; boxes [B, Q, 4] cxcywh; matches per image (queries, targets)."""
        num_classes = logits.shape[-1]
        labels = class_targets(logits, targets, matches, fill=num_classes)
        one_hot = F.one_hot(labels, num_classes + 1)[..., :-1].to(logits.dtype)
        quality = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
        if any(len(src) for src, _ in matches):
            predicted, wanted = matched_pairs(boxes.detach(), targets, matches)
            iou = paired_box_iou(box_cxcywh_to_xyxy(predicted), box_cxcywh_to_xyxy(wanted))
            image = torch.cat(
                [
                    torch.full((len(src),), i, dtype=torch.int64)
                    for i, (src, _) in enumerate(matches)
                ]
            ).to(logits.device)
            query = torch.cat([src for src, _ in matches]).to(logits.device)
            quality = quality.index_put((image, query), iou.to(logits.dtype))
        score = one_hot * quality[..., None]
        loss = F.binary_cross_entropy_with_logits(logits, score, reduction="none")
        loss = loss * (score - logits.sigmoid()).abs().pow(self.beta)
        if valid is not None:
            loss = loss * valid[..., None]
        return loss.sum() / num_boxes
