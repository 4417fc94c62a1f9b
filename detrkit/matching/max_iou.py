# SPDX-License-Identifier: Apache-2.0
"""Max-IoU assignment of boxes (anchors, proposals) to ground truth, with mmdetection 2.x
``MaxIoUAssigner`` semantics.

Result convention (mmdetection's): ``gt_inds[i] = 0`` negative, ``-1`` ignored (neither), ``k > 0``
positive for ground-truth box ``k - 1``. Boxes are xyxy pixels; only the first four columns of
[N, 5] proposals (box + score) are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MaxIoUAssigner", "MaxIoUAssignment", "box_overlaps"]


def box_overlaps(boxes1: Tensor, boxes2: Tensor, mode: str = "iou", eps: float = 1e-6) -> Tensor:
    """Pairwise IoU (``mode="iou"``) or intersection over the area of ``boxes1`` (``"iof"``):
    [N, 4], [M, 4] xyxy -> [N, M].

    The arithmetic is torchvision's ``box_iou``'s (so IoUs are bitwise the same) except that the
    denominator is clamped at ``eps``, as mmdetection's ``bbox_overlaps``: two empty boxes
    overlap 0, not NaN, and ``iof`` needs the clamp anyway.
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    if mode == "iou":
        denominator = area1[:, None] + area2[None, :] - overlap
    elif mode == "iof":
        denominator = area1[:, None].expand_as(overlap)
    else:
        raise ValueError(f"mode must be 'iou' or 'iof', got {mode!r}")
    return overlap / torch.max(denominator, denominator.new_tensor([eps]))


@dataclass
class MaxIoUAssignment:
    """What a box set was assigned to.

    Attributes:
        num_gts: number of ground-truth boxes.
        gt_inds: [N] int64, 0 = negative, -1 = ignored, k > 0 = ground truth k - 1.
        max_overlaps: [N] the best IoU of each box with any ground truth (0 without GT).
        labels: [N] int64 class of the assigned ground truth, -1 elsewhere; None when no labels
            were given.
    """

    num_gts: int
    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor | None = None

    def with_gt_prepended(self, gt_labels: Tensor | None) -> MaxIoUAssignment:
        """The assignment of ``[gt_boxes; boxes]``: every GT box is a positive of itself with
        overlap 1 (mmdetection's ``AssignResult.add_gt_``, before sampling)."""
        own = torch.arange(1, self.num_gts + 1, dtype=torch.long, device=self.gt_inds.device)
        labels = self.labels
        if labels is not None:
            labels = torch.cat((gt_labels.to(labels.dtype), labels))
        return MaxIoUAssignment(
            num_gts=self.num_gts,
            gt_inds=torch.cat((own, self.gt_inds)),
            max_overlaps=torch.cat((self.max_overlaps.new_ones(self.num_gts), self.max_overlaps)),
            labels=labels,
        )


class MaxIoUAssigner:
    """Assign each box to its best-overlapping ground truth.

    A box is negative when its best IoU is in ``[0, neg_iou_thr)`` (or in the half-open range
    ``neg_iou_thr = (low, high)``), positive when it is ``>= pos_iou_thr``, ignored otherwise.
    With ``match_low_quality`` every ground truth whose best IoU is ``>= min_pos_iou`` then also
    takes its best box (every box tied at that IoU when ``gt_max_assign_all``), overriding
    step 2, in ground-truth order. Boxes overlapping an ignore region by more than
    ``ignore_iof_thr`` (intersection over the box, or over the region when not
    ``ignore_wrt_candidates``) get overlap -1 with every ground truth, i.e. are ignored.
    """

    def __init__(
        self,
        pos_iou_thr: float,
        neg_iou_thr: float | tuple[float, float],
        min_pos_iou: float = 0.0,
        gt_max_assign_all: bool = True,
        ignore_iof_thr: float = -1.0,
        ignore_wrt_candidates: bool = True,
        match_low_quality: bool = True,
    ) -> None:
        self.pos_iou_thr = pos_iou_thr
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = min_pos_iou
        self.gt_max_assign_all = gt_max_assign_all
        self.ignore_iof_thr = ignore_iof_thr
        self.ignore_wrt_candidates = ignore_wrt_candidates
        self.match_low_quality = match_low_quality

    def assign(
        self,
        boxes: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor | None = None,
        gt_ignore: Tensor | None = None,
    ) -> MaxIoUAssignment:
        """[N, 4|5] boxes, [M, 4] ground truth (xyxy), [M] labels, [K, 4] ignore regions."""
        boxes, gt_boxes = boxes[:, :4], gt_boxes[:, :4]
        overlaps = box_overlaps(gt_boxes, boxes)
        if (
            self.ignore_iof_thr > 0
            and gt_ignore is not None
            and gt_ignore.numel() > 0
            and boxes.numel() > 0
        ):
            if self.ignore_wrt_candidates:
                ignore = box_overlaps(boxes, gt_ignore[:, :4], mode="iof").max(dim=1).values
            else:
                ignore = box_overlaps(gt_ignore[:, :4], boxes, mode="iof").max(dim=0).values
            overlaps[:, ignore > self.ignore_iof_thr] = -1
        return self.assign_overlaps(overlaps, gt_labels)

    def assign_overlaps(
        self, overlaps: Tensor, gt_labels: Tensor | None = None
    ) -> MaxIoUAssignment:
        """[M, N] overlaps of M ground truths with N boxes -> the assignment of the boxes."""
        num_gts, num_boxes = overlaps.shape
        gt_inds = overlaps.new_full((num_boxes,), -1, dtype=torch.long)
        if num_gts == 0 or num_boxes == 0:
            if num_gts == 0:
                gt_inds[:] = 0
            labels = None if gt_labels is None else gt_inds.new_full((num_boxes,), -1)
            return MaxIoUAssignment(num_gts, gt_inds, overlaps.new_zeros((num_boxes,)), labels)

        max_overlaps, argmax = overlaps.max(dim=0)
        gt_max_overlaps, gt_argmax = overlaps.max(dim=1)
        if isinstance(self.neg_iou_thr, (tuple, list)):
            low, high = self.neg_iou_thr
            gt_inds[(max_overlaps >= low) & (max_overlaps < high)] = 0
        else:
            gt_inds[(max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)] = 0
        positive = max_overlaps >= self.pos_iou_thr
        gt_inds[positive] = argmax[positive] + 1
        if self.match_low_quality:
            for gt in range(num_gts):
                if gt_max_overlaps[gt] >= self.min_pos_iou:
                    if self.gt_max_assign_all:
                        gt_inds[overlaps[gt, :] == gt_max_overlaps[gt]] = gt + 1
                    else:
                        gt_inds[gt_argmax[gt]] = gt + 1

        labels = None
        if gt_labels is not None:
            labels = gt_inds.new_full((num_boxes,), -1)
            chosen = gt_inds > 0
            labels[chosen] = gt_labels.to(labels.dtype)[gt_inds[chosen] - 1]
        return MaxIoUAssignment(num_gts, gt_inds, max_overlaps, labels)
