# SPDX-License-Identifier: Apache-2.0
"""Second stage of Faster R-CNN with mmdetection 2.25 semantics (``StandardRoIHead`` with a
``SingleRoIExtractor`` and a ``Shared2FCBBoxHead``; Co-DETR trains one on the encoder's maps).

Training: each image's proposals are assigned (``MaxIoUAssigner``) and sampled
(``RandomSampler``, usually with the ground truth added); every sampled RoI is pooled by
RoIAlign (7x7, ``aligned=True``, adaptive sampling) from level
``clamp(floor(log2(sqrt(area) / finest_scale + 1e-6)), 0, L - 1)``; two shared FCs feed an
(80 + 1)-way classifier and class-specific box deltas. Losses: softmax cross-entropy over the
sampled RoIs and, with ``reg_decoded_bbox``, GIoU between the decoded box of the positive's
class and its ground truth, divided by the number of sampled RoIs. Attribute names
(``bbox_head.shared_fcs``, ``fc_cls``, ``fc_reg``) are mmdetection's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from detrkit.matching.max_iou import MaxIoUAssigner, MaxIoUAssignment
from detrkit.matching.sampler import RandomSampler, SamplingResult
from detrkit.models.dense.box_coder import DeltaXYWHCoder
from detrkit.ops.boxes import paired_generalized_box_iou
from detrkit.schemes.randomness import RandomSource
from detrkit.structures import DenseLoss


class Shared2FCBBoxHead(nn.Module):
    """Flattened RoI features -> FC+ReLU (x ``num_shared_fcs``) -> class logits and deltas.

    Args:
        in_channels: channels of the pooled features.
        roi_size: side of the pooled features.
        fc_channels: width of the shared FCs.
        num_classes: foreground classes (the logits have one more, the background, last).
        num_shared_fcs: number of shared FCs.
        class_agnostic: one box per RoI instead of one per class.
    """

    def __init__(
        self,
        in_channels: int = 256,
        roi_size: int = 7,
        fc_channels: int = 1024,
        num_classes: int = 80,
        num_shared_fcs: int = 2,
        class_agnostic: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes, self.class_agnostic = num_classes, class_agnostic
        widths = [in_channels * roi_size * roi_size] + [fc_channels] * num_shared_fcs
        self.shared_fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.fc_cls = nn.Linear(widths[-1], num_classes + 1)
        self.fc_reg = nn.Linear(widths[-1], 4 if class_agnostic else 4 * num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """[K, C, S, S] -> logits [K, num_classes + 1], deltas [K, 4 * num_classes | 4]."""
        x = features.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


@dataclass
class RoITargets:
    """Targets of the sampled RoIs of the batch (images concatenated, positives first in each).

    Attributes:
        labels: [K] int64 class of every RoI (``num_classes`` = background).
        label_weights: [K] float.
        boxes: [K, 4] ground-truth xyxy pixels of the positives (0 elsewhere).
        box_weights: [K, 4] 1 for positives.
    """

    labels: Tensor
    label_weights: Tensor
    boxes: Tensor
    box_weights: Tensor


@dataclass
class RoITrainOutput:
    """Losses of one training step and what led to them.

    Attributes:
        losses: ``roi/cls`` and ``roi/bbox``.
        accuracy: top-1 accuracy of the classifier over the sampled RoIs, percent (0-d).
        assignments, samplings: per image.
        rois: [K, 5] (image index, x1, y1, x2, y2) sampled RoIs.
        targets: the RoIs' targets.
        cls_score, bbox_pred: the head's outputs on the RoIs.
        features: [K, C] the RoIs' RoIAlign features averaged over the S x S bins (what
            Co-Deformable-DETR's positive queries start from), or None.
    """

    losses: list[DenseLoss]
    accuracy: Tensor
    assignments: list[MaxIoUAssignment]
    samplings: list[SamplingResult]
    rois: Tensor
    targets: RoITargets
    cls_score: Tensor
    bbox_pred: Tensor
    features: Tensor | None = None


def cross_entropy_loss(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """Summed weighted softmax cross-entropy; ``labels`` may arrive as floats."""
    return (F.cross_entropy(logits, labels.long(), reduction="none") * weights).sum()


def rois_of(boxes: list[Tensor]) -> Tensor:
    """Per image [n_i, 4+] boxes -> [sum n_i, 5] (image index, x1, y1, x2, y2)."""
    rows = [torch.cat((b.new_full((b.shape[0], 1), i), b[:, :4]), 1) for i, b in enumerate(boxes)]
    return torch.cat(rows)


class RoIHead(nn.Module):
    """RoI pooling, box head, targets and losses.

    Args:
        bbox_head: the box head.
        strides: strides of the maps the RoIs are pooled from (the first ``len(strides)`` maps).
        finest_scale: RoI size mapped to the first level.
        coder: delta coder of the box branch.
        assigner, sampler: training-time proposal assignment and sampling.
        cls_weight, bbox_weight: weights of the two losses.
        roi_size: side of the pooled features.
    """

    def __init__(
        self,
        bbox_head: Shared2FCBBoxHead,
        strides: tuple[int, ...],
        finest_scale: float,
        coder: DeltaXYWHCoder,
        assigner: MaxIoUAssigner,
        sampler: RandomSampler,
        cls_weight: float = 1.0,
        bbox_weight: float = 1.0,
        roi_size: int = 7,
    ) -> None:
        super().__init__()
        self.bbox_head = bbox_head
        self.strides, self.finest_scale, self.roi_size = tuple(strides), finest_scale, roi_size
        self.coder, self.assigner, self.sampler = coder, assigner, sampler
        self.cls_weight, self.bbox_weight = cls_weight, bbox_weight

    def levels_of(self, rois: Tensor) -> Tensor:
        """[K, 5] RoIs -> [K] int64 level each is pooled from."""
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return levels.clamp(min=0, max=len(self.strides) - 1).long()

    def pool(self, maps: list[Tensor], rois: Tensor) -> Tensor:
        """[B, C, H_l, W_l] per level, [K, 5] RoIs -> [K, C, S, S] RoIAlign features."""
        size = self.roi_size
        pooled = maps[0].new_zeros(rois.shape[0], maps[0].shape[1], size, size)
        levels = self.levels_of(rois)
        for level, stride in enumerate(self.strides):
            chosen = (levels == level).nonzero().view(-1)
            if chosen.numel() > 0:
                pooled[chosen] = roi_align(
                    maps[level], rois[chosen].to(maps[level].dtype), size, 1 / stride, 0, True
                )
            else:
                # Keeps every level in the graph (as mmdetection does): unused parameters
                # would stall distributed training.
                pooled = pooled + maps[level].sum() * 0.0
        return pooled

    def sample(
        self,
        proposals: list[Tensor],
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
        random: RandomSource,
    ) -> tuple[list[MaxIoUAssignment], list[SamplingResult]]:
        """Assign and sample every image's proposals ([n, 4|5] xyxy pixels), image by image."""
        assignments, samplings = [], []
        for boxes, gts, labels in zip(proposals, gt_boxes, gt_labels):
            assignment = self.assigner.assign(boxes, gts, labels)
            assignments.append(assignment)
            samplings.append(self.sampler.sample(assignment, boxes, gts, labels, random=random))
        return assignments, samplings

    def targets(self, samplings: list[SamplingResult]) -> RoITargets:
        """Class and box targets of the sampled RoIs (box targets are the ground truth itself:
        ``reg_decoded_bbox``)."""
        labels, label_weights, boxes, box_weights = [], [], [], []
        for s in samplings:
            num_pos, total = s.pos_inds.numel(), s.pos_inds.numel() + s.neg_inds.numel()
            image_labels = s.candidates.new_full(
                (total,), self.bbox_head.num_classes, dtype=torch.long
            )
            image_boxes = s.candidates.new_zeros(total, 4)
            image_box_weights = s.candidates.new_zeros(total, 4)
            if num_pos > 0:
                image_labels[:num_pos] = s.pos_gt_labels
                image_boxes[:num_pos] = s.pos_gt_boxes
                image_box_weights[:num_pos] = 1.0
            labels.append(image_labels)
            label_weights.append(s.candidates.new_ones(total))
            boxes.append(image_boxes)
            box_weights.append(image_box_weights)
        cat = torch.cat
        return RoITargets(cat(labels), cat(label_weights), cat(boxes), cat(box_weights))

    def train_step(
        self,
        maps: list[Tensor],
        proposals: list[Tensor],
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
        random: RandomSource | None = None,
    ) -> RoITrainOutput:
        """Sample, pool, classify and compute the losses.

        Args:
            maps: [B, C, H_l, W_l] per level (only the first ``len(strides)`` are used).
            proposals: per image [n, 4|5] xyxy pixels (a score column is ignored).
            gt_boxes, gt_labels: per image [m, 4] xyxy pixels, [m] int64.
            random: source of the sampler's draws (images in order).
        """
        assignments, samplings = self.sample(
            proposals, gt_boxes, gt_labels, random or RandomSource()
        )
        rois = rois_of([s.boxes for s in samplings])
        pooled = self.pool(maps, rois)
        cls_score, bbox_pred = self.bbox_head(pooled)
        targets = self.targets(samplings)
        losses, accuracy = self.losses(cls_score, bbox_pred, rois, targets)
        features = pooled.mean(-1).mean(-1)
        return RoITrainOutput(
            losses, accuracy, assignments, samplings, rois, targets, cls_score, bbox_pred, features
        )

    def losses(
        self, cls_score: Tensor, bbox_pred: Tensor, rois: Tensor, targets: RoITargets
    ) -> tuple[list[DenseLoss], Tensor]:
        """Cross-entropy over the sampled RoIs (divided by their count) and GIoU of the
        positives' decoded boxes (divided by the number of sampled RoIs); and the accuracy."""
        labels, weights = targets.labels, targets.label_weights
        cls_count = torch.tensor(max(float((weights > 0).sum()), 1.0), device=cls_score.device)
        cls = DenseLoss(
            "roi/cls", cross_entropy_loss, (cls_score, labels, weights), cls_count, self.cls_weight
        )
        positive = (labels >= 0) & (labels < self.bbox_head.num_classes)
        deltas = bbox_pred.view(bbox_pred.shape[0], -1, 4)
        if self.bbox_head.class_agnostic:
            pos_deltas = deltas[positive, 0]
        else:
            pos_deltas = deltas[positive, labels[positive]]
        box_inputs = (
            pos_deltas,
            rois[positive, 1:],
            targets.boxes[positive],
            targets.box_weights[positive].mean(-1),
        )
        box_count = torch.tensor(float(targets.boxes.shape[0]), device=bbox_pred.device)
        box = DenseLoss("roi/bbox", self.giou_loss, box_inputs, box_count, self.bbox_weight)
        with torch.no_grad():
            accuracy = (cls_score.argmax(1) == labels).float().mean() * 100.0
        return [cls, box], accuracy

    def giou_loss(self, deltas: Tensor, rois: Tensor, gt_boxes: Tensor, weights: Tensor) -> Tensor:
        """Summed weighted ``1 - GIoU`` of ``decode(rois, deltas)`` and the ground truth
        ([P, 4] each, [P] weights)."""
        decoded = self.coder.decode(rois, deltas)
        return ((1 - paired_generalized_box_iou(decoded, gt_boxes)) * weights).sum()
