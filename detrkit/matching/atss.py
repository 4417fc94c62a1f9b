# SPDX-License-Identifier: Apache-2.0
"""Adaptive Training Sample Selection (ATSS, Zhang et al. 2020) as mmdetection 2.x assigns it.

For every ground-truth box, the ``topk`` anchors of each pyramid level whose centres are
closest (L2) to the box centre are candidates; a candidate is positive when its IoU with the
box reaches the mean + standard deviation (unbiased) of all candidates' IoUs *and* its centre
lies inside the box (by more than 0.01 on every side). An anchor positive for several boxes
takes the one with the highest IoU (the first of equal ones).

Conventions kept from mmdetection so that recorded assignments compare directly:
``gt_inds`` is 0 for a negative anchor and k for ground-truth box k - 1; ``max_overlaps`` is
the IoU with the assigned box, and ``-NEG_INF_IOU`` (-1e8) for negatives (mmdet's ``-INF``
bookkeeping leaks into its result). Boxes are absolute pixel ``xyxy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from detrkit.ops.boxes import box_iou

# mmdetection's INF: non-candidates hold -INF in the IoU table, negatives keep it.
NEG_INF_IOU = 100000000.0
# A positive's centre must be this far inside its box on every side (pixels).
CENTRE_MARGIN = 0.01


@dataclass(frozen=True)
class ATSSAssignment:
    """The assignment of one image's anchors.

    Attributes:
        gt_inds: [N] int64, 0 = negative, k = ground-truth box k - 1.
        max_overlaps: [N] float, IoU with the assigned box; -1e8 for negatives (0 when the
            image has no boxes or no anchors).
        labels: [N] int64 class of the assigned box, -1 for negatives.
    """

    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor

    @property
    def positive(self) -> Tensor:
        """[P] int64 indices of the positive anchors, ascending."""
        return torch.nonzero(self.gt_inds > 0).squeeze(1)

    @property
    def positive_boxes(self) -> Tensor:
        """[P] int64 0-based box index of each positive anchor."""
        return self.gt_inds[self.positive] - 1


class ATSSAssigner:
    """ATSS assignment of anchors to boxes (mmdet 2.x ``ATSSAssigner`` without ignored boxes).

    Args:
        topk: candidates per level and box (fewer when a level has fewer anchors).
    """

    def __init__(self, topk: int = 9) -> None:
        self.topk = topk

    @torch.no_grad()
    def assign(
        self,
        anchors: Tensor,
        num_level_anchors: Sequence[int],
        gt_boxes: Tensor,
        gt_labels: Tensor | None = None,
    ) -> ATSSAssignment:
        """Assign one image.

        Args:
            anchors: [N, 4] xyxy pixels, the image's valid anchors, levels concatenated.
            num_level_anchors: how many of ``anchors`` belong to each level, in order.
            gt_boxes: [G, 4] xyxy pixels.
            gt_labels: [G] int64, or None (then every label is -1).
        """
        num_gt, num_anchors = gt_boxes.shape[0], anchors.shape[0]
        if sum(num_level_anchors) != num_anchors:
            raise ValueError(f"levels hold {sum(num_level_anchors)} anchors, got {num_anchors}")
        overlaps = box_iou(anchors, gt_boxes)
        gt_inds = torch.zeros(num_anchors, dtype=torch.int64, device=anchors.device)
        if num_gt == 0 or num_anchors == 0:
            return ATSSAssignment(gt_inds, overlaps.new_zeros(num_anchors), gt_inds - 1)

        anchor_cx = (anchors[:, 0] + anchors[:, 2]) / 2.0
        anchor_cy = (anchors[:, 1] + anchors[:, 3]) / 2.0
        candidates = self._candidates(anchor_cx, anchor_cy, gt_boxes, num_level_anchors)
        columns = torch.arange(num_gt, device=anchors.device)
        candidate_iou = overlaps[candidates, columns]
        threshold = candidate_iou.mean(0) + candidate_iou.std(0)
        is_pos = candidate_iou >= threshold[None, :]
        is_pos &= _centre_inside(anchor_cx[candidates], anchor_cy[candidates], gt_boxes)

        # The IoU table, box-major, holds -INF except at positive candidates; each anchor
        # takes the best of its column (the first of equal ones).
        flat = (candidates + columns * num_anchors).view(-1)[is_pos.view(-1)]
        table = torch.full_like(overlaps, -NEG_INF_IOU).t().contiguous().view(-1)
        table[flat] = overlaps.t().contiguous().view(-1)[flat]
        max_overlaps, argmax = table.view(num_gt, -1).t().max(dim=1)
        assigned = max_overlaps != -NEG_INF_IOU
        gt_inds[assigned] = argmax[assigned] + 1

        labels = torch.full_like(gt_inds, -1)
        if gt_labels is not None:
            positive = gt_inds > 0
            labels[positive] = gt_labels[gt_inds[positive] - 1].to(labels.dtype)
        return ATSSAssignment(gt_inds, max_overlaps, labels)

    def _candidates(
        self, anchor_cx: Tensor, anchor_cy: Tensor, gt_boxes: Tensor, num_level_anchors
    ) -> Tensor:
        """[sum_l min(k, N_l), G] anchor indices: per level, the ``topk`` closest centres."""
        gt_cx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2.0
        gt_cy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2.0
        gt_points = torch.stack((gt_cx, gt_cy), dim=1)
        points = torch.stack((anchor_cx, anchor_cy), dim=1)
        distances = (points[:, None, :] - gt_points[None, :, :]).pow(2).sum(-1).sqrt()
        chosen, start = [], 0
        for count in num_level_anchors:
            level = distances[start : start + count]
            _, nearest = level.topk(min(self.topk, count), dim=0, largest=False)
            chosen.append(nearest + start)
            start += count
        return torch.cat(chosen, dim=0)


def _centre_inside(cx: Tensor, cy: Tensor, gt_boxes: Tensor) -> Tensor:
    """[K, G] candidate centres (cx, cy [K, G]) strictly inside their box by the margin."""
    sides = torch.stack(
        (
            cx - gt_boxes[:, 0],
            cy - gt_boxes[:, 1],
            gt_boxes[:, 2] - cx,
            gt_boxes[:, 3] - cy,
        ),
        dim=1,
    )
    return sides.min(dim=1).values > CENTRE_MARGIN
