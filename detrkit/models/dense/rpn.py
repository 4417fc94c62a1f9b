# SPDX-License-Identifier: Apache-2.0
"""Region proposal network with mmdetection 2.25 ``RPNHead`` semantics (Faster R-CNN's first
stage; Co-DETR trains one on the encoder's maps as an auxiliary head).

Per level: 3x3 conv + ReLU, then 1x1 convs giving A objectness logits and 4A box deltas per
location (channel ``a`` / ``4a..4a+3`` = base anchor ``a``). Training: anchors inside each image
are assigned (``MaxIoUAssigner``) and sampled (``RandomSampler``); the losses are sigmoid
cross-entropy on the sampled anchors and L1 on the positives' deltas, per level, both divided
by the number of sampled anchors. Proposals: per image and level the ``nms_pre`` best anchors,
decoded and clipped to the image, NMS per level, the best ``max_per_img`` overall. Attribute
names (``rpn_conv``, ``rpn_cls``, ``rpn_reg``) are mmdetection's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from detrkit.matching.max_iou import MaxIoUAssigner, MaxIoUAssignment
from detrkit.matching.sampler import RandomSampler, SamplingResult
from detrkit.models.dense.anchors import AnchorGenerator
from detrkit.models.dense.box_coder import DeltaXYWHCoder
from detrkit.ops.boxes import at_least_float32
from detrkit.schemes.randomness import RandomSource
from detrkit.structures import DenseLoss

# mmcv's batched_nms runs one NMS per level from this many boxes on.
NMS_SPLIT_THRESHOLD = 10000


@dataclass(frozen=True)
class ProposalSettings:
    """How proposals are made from the RPN's outputs (mmdetection's ``rpn_proposal``).

    Attributes:
        nms_pre: best anchors kept per level and image before NMS (<= 0: all).
        max_per_img: proposals kept per image after NMS.
        iou_threshold: NMS threshold (NMS is per level).
        min_bbox_size: proposals must be wider and taller than this (negative: no filter).
    """

    nms_pre: int = 4000
    max_per_img: int = 1000
    iou_threshold: float = 0.7
    min_bbox_size: float = 0.0


@dataclass
class AnchorTargets:
    """Training targets of one image over all its anchors (levels concatenated).

    Attributes:
        assignment: the assigner's result on the image's valid anchors.
        sampling: the sampled valid anchors (indices into the valid anchors).
        objectness: [A] float 1 for sampled positives, 0 elsewhere.
        label_weights: [A] float 1 for sampled anchors, 0 elsewhere.
        deltas: [A, 4] encoded ground truth of the positives (0 elsewhere).
        delta_weights: [A, 4] 1 for positives.
    """

    assignment: MaxIoUAssignment
    sampling: SamplingResult
    objectness: Tensor
    label_weights: Tensor
    deltas: Tensor
    delta_weights: Tensor


@dataclass
class RPNTrainOutput:
    """Losses, proposals and what led to them.

    Attributes:
        losses: ``rpn/cls/{level}`` and ``rpn/bbox/{level}``.
        proposals: per image [n, 5] (x1, y1, x2, y2, score) pixels, detached, best first.
        targets: per image the anchor targets.
        cls_scores, deltas: the head's outputs per level, [B, A, H, W] and [B, 4A, H, W].
    """

    losses: list[DenseLoss]
    proposals: list[Tensor]
    targets: list[AnchorTargets]
    cls_scores: list[Tensor]
    deltas: list[Tensor]


def objectness_loss(logits: Tensor, objectness: Tensor, weights: Tensor) -> Tensor:
    """Summed weighted sigmoid cross-entropy ([N] each)."""
    loss = F.binary_cross_entropy_with_logits(logits, objectness, reduction="none")
    return (loss * weights).sum()


def l1_loss(deltas: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Summed weighted L1 ([N, 4] each)."""
    return ((deltas - targets).abs() * weights).sum()


def mmcv_batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Indices kept by NMS within each group, best score first, as mmcv 1.x ``batched_nms``:
    the boxes are offset by ``group * (max + 1)``; below ``NMS_SPLIT_THRESHOLD`` boxes one NMS
    runs on all of them, otherwise one per group, then the survivors are sorted. Ties in score
    are ordered as mmcv's (unstable) ``sort``; torchvision's NMS kernel sees them in that order
    (the offsets change the IoUs' rounding, so they are kept even where groups are split)."""
    offsets = groups.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    shifted = boxes + offsets[:, None]
    if boxes.shape[0] < NMS_SPLIT_THRESHOLD:
        return _ordered_nms(shifted, scores, iou_threshold)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(groups):
        members = (groups == group).nonzero().view(-1)
        kept[members[_ordered_nms(shifted[members], scores[members], iou_threshold)]] = True
    keep = kept.nonzero().view(-1)
    return keep[scores[keep].sort(descending=True).indices]


def _ordered_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    order = scores.sort(0, descending=True).indices
    return order[nms(boxes[order], scores[order], iou_threshold)]


class RPNHead(nn.Module):
    """RPN over multi-scale maps.

    Args:
        in_channels, feat_channels: input and hidden channels.
        anchors: the anchor generator (one level per input map).
        coder: the delta coder of the box branch.
        assigner, sampler: training-time anchor assignment and sampling.
        proposal: proposal settings.
        cls_weight, bbox_weight: weights of the two losses.
    """

    def __init__(
        self,
        in_channels: int,
        feat_channels: int,
        anchors: AnchorGenerator,
        coder: DeltaXYWHCoder,
        assigner: MaxIoUAssigner,
        sampler: RandomSampler,
        proposal: ProposalSettings,
        cls_weight: float = 1.0,
        bbox_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.anchors, self.coder, self.proposal = anchors, coder, proposal
        self.assigner, self.sampler = assigner, sampler
        self.cls_weight, self.bbox_weight = cls_weight, bbox_weight
        num_anchors = anchors.num_base_anchors
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, maps: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """[B, C, H_l, W_l] per level -> logits [B, A, H_l, W_l], deltas [B, 4A, H_l, W_l]."""
        hidden = [F.relu(self.rpn_conv(x)) for x in maps]
        return [self.rpn_cls(h) for h in hidden], [self.rpn_reg(h) for h in hidden]

    def train_step(
        self,
        maps: list[Tensor],
        image_sizes: Tensor,
        gt_boxes: list[Tensor],
        random: RandomSource | None = None,
    ) -> RPNTrainOutput:
        """Outputs, losses and proposals of one training step.

        Args:
            maps: [B, C, H_l, W_l] per level.
            image_sizes: [B, 2] (h, w) pixels of each unpadded image: anchors outside it are not
                trained (mmdetection: its ``pad_shape``) and proposals are clipped to it.
            gt_boxes: per image [n, 4] xyxy pixels.
            random: source of the samplers' draws (images in order).
        """
        random = random or RandomSource()
        cls_scores, deltas = self(maps)
        sizes = [tuple(m.shape[-2:]) for m in maps]
        anchors = self.anchors.grid(sizes, dtype=torch.float32, device=maps[0].device)
        flat_anchors = torch.cat(anchors)
        targets = []
        for image, boxes in enumerate(gt_boxes):
            size = tuple(int(v) for v in image_sizes[image])
            valid = torch.cat(self.anchors.valid_flags(sizes, size, device=flat_anchors.device))
            targets.append(self.anchor_targets(flat_anchors, valid, boxes, random))
        losses = self.losses(cls_scores, deltas, targets, [len(a) for a in anchors])
        proposals = self.proposals(cls_scores, deltas, anchors, image_sizes)
        return RPNTrainOutput(losses, proposals, targets, cls_scores, deltas)

    def anchor_targets(
        self, anchors: Tensor, valid: Tensor, gt_boxes: Tensor, random: RandomSource
    ) -> AnchorTargets:
        """Assign and sample one image's valid anchors; targets over all [A, 4] anchors."""
        inside = anchors[valid]
        assignment = self.assigner.assign(inside, gt_boxes)
        sampling = self.sampler.sample(assignment, inside, gt_boxes, random=random)
        valid_index = valid.nonzero().view(-1)
        pos, neg = valid_index[sampling.pos_inds], valid_index[sampling.neg_inds]
        objectness = anchors.new_zeros(anchors.shape[0])
        label_weights = anchors.new_zeros(anchors.shape[0])
        deltas, delta_weights = torch.zeros_like(anchors), torch.zeros_like(anchors)
        if len(pos) > 0:
            deltas[pos] = self.coder.encode(sampling.pos_boxes, sampling.pos_gt_boxes)
            delta_weights[pos] = 1.0
            objectness[pos] = 1.0
            label_weights[pos] = 1.0
        label_weights[neg] = 1.0
        return AnchorTargets(assignment, sampling, objectness, label_weights, deltas, delta_weights)

    def losses(
        self,
        cls_scores: list[Tensor],
        deltas: list[Tensor],
        targets: list[AnchorTargets],
        level_sizes: list[int],
    ) -> list[DenseLoss]:
        """Per-level losses, each divided by the batch's sampled-anchor count (an image with
        no positive or no negative counts 1 for it, as mmdetection)."""
        count = sum(max(t.sampling.pos_inds.numel(), 1) for t in targets) + sum(
            max(t.sampling.neg_inds.numel(), 1) for t in targets
        )
        count = torch.tensor(float(count), device=cls_scores[0].device)
        per_level = {
            name: list(zip(*(getattr(t, name).split(level_sizes) for t in targets)))
            for name in ("objectness", "label_weights", "deltas", "delta_weights")
        }
        per_level = {
            name: [torch.cat(parts) for parts in levels] for name, levels in per_level.items()
        }
        cls_losses, box_losses = [], []
        for level, (logits, level_deltas) in enumerate(zip(cls_scores, deltas)):
            cls_inputs = (
                logits.permute(0, 2, 3, 1).reshape(-1),
                per_level["objectness"][level],
                per_level["label_weights"][level],
            )
            box_inputs = (
                level_deltas.permute(0, 2, 3, 1).reshape(-1, 4),
                per_level["deltas"][level],
                per_level["delta_weights"][level],
            )
            cls_losses.append(
                DenseLoss(f"rpn/cls/{level}", objectness_loss, cls_inputs, count, self.cls_weight)
            )
            box_losses.append(
                DenseLoss(f"rpn/bbox/{level}", l1_loss, box_inputs, count, self.bbox_weight)
            )
        return cls_losses + box_losses

    @torch.no_grad()
    def proposals(
        self,
        cls_scores: list[Tensor],
        deltas: list[Tensor],
        anchors: list[Tensor],
        image_sizes: Tensor,
    ) -> list[Tensor]:
        """Per image [n, 5] (x1, y1, x2, y2, score) pixels: see the module docstring."""
        return [
            self.image_proposals(
                [at_least_float32(c[image]) for c in cls_scores],
                [at_least_float32(d[image]) for d in deltas],
                anchors,
                tuple(int(v) for v in image_sizes[image]),
            )
            for image in range(cls_scores[0].shape[0])
        ]

    def image_proposals(
        self,
        cls_scores: list[Tensor],
        deltas: list[Tensor],
        anchors: list[Tensor],
        image_size: tuple[int, int],
    ) -> Tensor:
        """One image: [A, H, W] logits and [4A, H, W] deltas per level -> [n, 5]."""
        settings = self.proposal
        scores_all, deltas_all, anchors_all, levels = [], [], [], []
        for level, (logits, level_deltas) in enumerate(zip(cls_scores, deltas)):
            scores = logits.permute(1, 2, 0).reshape(-1).sigmoid()
            level_deltas = level_deltas.permute(1, 2, 0).reshape(-1, 4)
            level_anchors = anchors[level]
            if 0 < settings.nms_pre < scores.shape[0]:
                ranked, order = scores.sort(descending=True)
                top = order[: settings.nms_pre]
                scores = ranked[: settings.nms_pre]
                level_deltas, level_anchors = level_deltas[top], level_anchors[top]
            scores_all.append(scores)
            deltas_all.append(level_deltas)
            anchors_all.append(level_anchors)
            levels.append(torch.full_like(scores, level, dtype=torch.long))
        scores = torch.cat(scores_all)
        boxes = self.coder.decode(torch.cat(anchors_all), torch.cat(deltas_all), image_size)
        levels = torch.cat(levels)
        if settings.min_bbox_size >= 0:
            wide = boxes[:, 2] - boxes[:, 0] > settings.min_bbox_size
            tall = boxes[:, 3] - boxes[:, 1] > settings.min_bbox_size
            keep = wide & tall
            if not keep.all():
                boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        if boxes.numel() == 0:
            return boxes.new_zeros((0, 5))
        keep = mmcv_batched_nms(boxes, scores, levels, settings.iou_threshold)
        keep = keep[: settings.max_per_img]
        return torch.cat((boxes[keep], scores[keep, None]), dim=1)
