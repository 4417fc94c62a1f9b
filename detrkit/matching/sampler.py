# SPDX-License-Identifier: Apache-2.0
"""Random sampling of positives and negatives from a max-IoU assignment, with mmdetection 2.x
``RandomSampler`` semantics (R-CNN's fixed-size minibatch of anchors / RoIs).

Every draw goes through a ``RandomSource`` so that a test can replay the reference's draws: per
call, first the positives' permutation (only when there are more positives than wanted), then the
negatives' (only when there are more negatives than wanted), each ``randperm(#candidates)`` whose
first entries pick the kept candidates. Kept indices are returned sorted (mmdetection applies
``unique`` to them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from detrkit.matching.max_iou import MaxIoUAssignment
from detrkit.schemes.randomness import RandomSource

__all__ = ["RandomSampler", "SamplingResult"]


@dataclass
class SamplingResult:
    """The sampled boxes of one image.

    Attributes:
        pos_inds, neg_inds: [P], [Q] int64 sorted indices into ``candidates``.
        candidates: [num_gts + N, 4] (GT boxes first when they were added) or [N, 4] xyxy.
        pos_assigned_gt_inds: [P] int64 ground-truth index of every positive.
        pos_is_gt: [P] uint8, 1 where the positive is an added ground-truth box.
        pos_gt_boxes: [P, 4] the assigned ground-truth boxes.
        pos_gt_labels: [P] int64 their labels, or None when the assignment has no labels.
        num_gts: number of ground-truth boxes of the image.
    """

    pos_inds: Tensor
    neg_inds: Tensor
    candidates: Tensor
    pos_assigned_gt_inds: Tensor
    pos_is_gt: Tensor
    pos_gt_boxes: Tensor
    pos_gt_labels: Tensor | None
    num_gts: int

    @property
    def pos_boxes(self) -> Tensor:
        return self.candidates[self.pos_inds]

    @property
    def neg_boxes(self) -> Tensor:
        return self.candidates[self.neg_inds]

    @property
    def boxes(self) -> Tensor:
        """[P + Q, 4] the sampled boxes, positives first."""
        return torch.cat((self.pos_boxes, self.neg_boxes))


class RandomSampler:
    """Sample ``num`` boxes, at most ``num * pos_fraction`` of them positive, the rest negative.

    Args:
        num: boxes per image.
        pos_fraction: largest share of positives.
        neg_pos_ub: at most ``neg_pos_ub * max(1, #positives)`` negatives; negative = no bound.
        add_gt_as_proposals: prepend the ground-truth boxes to the candidates (as positives).
    """

    def __init__(
        self,
        num: int,
        pos_fraction: float,
        neg_pos_ub: float = -1,
        add_gt_as_proposals: bool = True,
    ) -> None:
        self.num = num
        self.pos_fraction = pos_fraction
        self.neg_pos_ub = neg_pos_ub
        self.add_gt_as_proposals = add_gt_as_proposals

    def sample(
        self,
        assignment: MaxIoUAssignment,
        boxes: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor | None = None,
        random: RandomSource | None = None,
    ) -> SamplingResult:
        """Sample one image: ``assignment`` of ``boxes`` [N, 4|5] to ``gt_boxes`` [M, 4]."""
        random = random or RandomSource()
        candidates = boxes[:, :4]
        is_gt = candidates.new_zeros((candidates.shape[0],), dtype=torch.uint8)
        if self.add_gt_as_proposals and len(gt_boxes) > 0:
            if gt_labels is None:
                raise ValueError("adding the ground truth as proposals needs its labels")
            candidates = torch.cat((gt_boxes[:, :4].to(candidates.dtype), candidates))
            assignment = assignment.with_gt_prepended(gt_labels)
            is_gt = torch.cat((is_gt.new_ones(gt_boxes.shape[0]), is_gt))

        wanted_pos = int(self.num * self.pos_fraction)
        positives = torch.nonzero(assignment.gt_inds > 0).view(-1)
        pos_inds = self._choose(positives, wanted_pos, random).unique()
        wanted_neg = self.num - pos_inds.numel()
        if self.neg_pos_ub >= 0:
            wanted_neg = min(wanted_neg, int(self.neg_pos_ub * max(1, pos_inds.numel())))
        negatives = torch.nonzero(assignment.gt_inds == 0).view(-1)
        neg_inds = self._choose(negatives, wanted_neg, random).unique()

        assigned = assignment.gt_inds[pos_inds] - 1
        if gt_boxes.numel() == 0:
            pos_gt_boxes = gt_boxes.new_empty((0, 4))
        else:
            pos_gt_boxes = gt_boxes.view(-1, 4)[assigned]
        labels = None if assignment.labels is None else assignment.labels[pos_inds]
        return SamplingResult(
            pos_inds=pos_inds,
            neg_inds=neg_inds,
            candidates=candidates,
            pos_assigned_gt_inds=assigned,
            pos_is_gt=is_gt[pos_inds],
            pos_gt_boxes=pos_gt_boxes,
            pos_gt_labels=labels,
            num_gts=gt_boxes.shape[0],
        )

    @staticmethod
    def _choose(gallery: Tensor, num: int, random: RandomSource) -> Tensor:
        """``gallery`` itself when it has at most ``num`` entries, else ``num`` of them at
        random (the first ``num`` of a permutation)."""
        if gallery.numel() <= num:
            return gallery
        perm = random.randperm(gallery.numel(), gallery.device)[:num]
        return gallery[perm]
