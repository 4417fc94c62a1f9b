# SPDX-License-Identifier: Apache-2.0
"""ATSS dense head (Zhang et al. 2020) as Co-DETR's auxiliary head on the encoder's maps
(``CoATSSHead`` of Sense-X/Co-DETR, mmdetection 2.x semantics).

Per level: a classification tower and a regression tower of ``stacked_convs`` 3x3 conv +
GroupNorm + ReLU blocks, then ``atss_cls`` (C logits), ``atss_reg`` (4 box deltas, times a
learnable per-level ``Scale``) and ``atss_centerness`` (1 logit). One square anchor per
location (``models.dense.anchors``: side ``octave_base_scale`` x stride, centred on the
location's top-left pixel corner), deltas of mmdet's ``DeltaXYWHBBoxCoder``. Boxes are
absolute pixel ``xyxy`` throughout; anchors are listed level by level, each row-major (y, then
x). Module names follow mmdet, so ``bbox_head.{i}.*`` checkpoint keys map by a prefix rename
(``convert.codetr_atss``).

Training (``get_targets`` + ``losses``): ATSS assignment on each image's valid anchors
(inside its unpadded size), then per level a sigmoid focal loss over all valid anchors, a
GIoU loss of the decoded positive boxes weighted by their centreness targets, and a
centreness BCE. Normalisers as in mmdet: the focal and centreness terms by the positives
(each image counts at least 1), the GIoU term by the sum of the centreness targets, both
averaged over ranks and clamped to 1 by the criterion (``DenseLoss.count``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from detrkit.matching.atss import ATSSAssigner, ATSSAssignment
from detrkit.models.dense.anchors import AnchorGenerator
from detrkit.models.dense.box_coder import DeltaXYWHCoder
from detrkit.structures import DenseLoss

# mmdet's GIoULoss epsilon.
GIOU_EPS = 1e-7


def centerness_targets(anchors: Tensor, boxes: Tensor) -> Tensor:
    """[P] sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of each anchor centre in its
    assigned box ([P, 4] xyxy both); the centres lie inside the boxes (ATSS positives)."""
    cx = (anchors[:, 2] + anchors[:, 0]) / 2
    cy = (anchors[:, 3] + anchors[:, 1]) / 2
    left_right = torch.stack((cx - boxes[:, 0], boxes[:, 2] - cx), dim=1)
    top_bottom = torch.stack((cy - boxes[:, 1], boxes[:, 3] - cy), dim=1)
    return torch.sqrt(
        (left_right.min(dim=-1).values / left_right.max(dim=-1).values)
        * (top_bottom.min(dim=-1).values / top_bottom.max(dim=-1).values)
    )


def memory_maps(tokens: Tensor, spatial_shapes: Tensor) -> list[Tensor]:
    """Encoder tokens [B, S, D] (levels concatenated, row-major) -> per level [B, D, h, w]."""
    maps, start = [], 0
    for height, width in spatial_shapes.tolist():
        level = tokens[:, start : start + height * width]
        maps.append(level.transpose(1, 2).reshape(tokens.shape[0], -1, height, width))
        start += height * width
    return maps


class Scale(nn.Module):
    """Multiply by a learnable scalar (mmcv ``Scale``; ``scale`` is a 0-d parameter)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class ConvGNReLU(nn.Module):
    """3x3 conv (no bias) -> GroupNorm -> ReLU (mmcv ``ConvModule`` with a GN norm)."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(num_groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


@dataclass(frozen=True)
class ATSSLossConfig:
    """Loss settings of the ATSS head (weights as the checkpoint's config writes them; in
    Co-DETR they include ``num_dec_layer * lambda_2``)."""

    cls_weight: float = 1.0
    bbox_weight: float = 2.0
    centerness_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    topk: int = 9


@dataclass
class ATSSOutput:
    """Per level: cls_logits [B, C, h, w], deltas [B, 4, h, w] (scaled), centerness
    [B, 1, h, w] logits."""

    cls_logits: list[Tensor]
    deltas: list[Tensor]
    centerness: list[Tensor]

    @property
    def feature_sizes(self) -> list[tuple[int, int]]:
        return [tuple(x.shape[-2:]) for x in self.cls_logits]


@dataclass
class ATSSTargets:
    """Training targets of a batch, over all anchors (N, levels concatenated).

    Attributes:
        anchors: [N, 4] float32 xyxy pixels (shared by the images).
        num_level_anchors: anchors per level.
        valid: [B, N] bool, the anchor lies inside the image.
        labels: [B, N] int64, the class of positives; ``num_classes`` elsewhere.
        label_weights: [B, N] float, 1 on valid anchors, 0 outside the image.
        bbox_targets: [B, N, 4] the assigned box (xyxy pixels) at positives, 0 elsewhere.
        centerness: [B, N] centreness targets at positives, 0 elsewhere.
        positive: [B, N] bool.
        assignments: per image, the assignment of its valid anchors.
        num_positives: 0-d float, sum over images of max(positives, 1) (mmdet's count).
    """

    anchors: Tensor
    num_level_anchors: tuple[int, ...]
    valid: Tensor
    labels: Tensor
    label_weights: Tensor
    bbox_targets: Tensor
    centerness: Tensor
    positive: Tensor
    assignments: list[ATSSAssignment]
    num_positives: Tensor

    def positive_coords(self) -> tuple[Tensor, Tensor, Tensor]:
        """What Co-DETR's positive queries are built from (its ``pos_coords``): anchors
        [B, N, 4] (0 outside the image), labels [B, N], bbox_targets [B, N, 4]."""
        anchors = self.anchors[None] * self.valid[..., None].to(self.anchors.dtype)
        return anchors, self.labels, self.bbox_targets


class ATSSHead(nn.Module):
    """ATSS head over multi-scale maps [B, in_channels, h_l, w_l] (one level per stride).

    Args:
        num_classes: C (sigmoid classes; background is implicit).
        in_channels: channels of every input map.
        strides: pixel stride of every level.
        feat_channels: width of the towers.
        stacked_convs: conv blocks per tower.
        num_groups: GroupNorm groups of the towers.
        octave_base_scale: anchor side in strides.
        target_means, target_stds: delta normalisation of the box coder.
        losses: loss weights, focal parameters and the assigner's top-k.
        index: the head's number in the logged names (``loss_cls{index}.{level}``; Co-DETR
            numbers its auxiliary heads after the RoI heads, so ATSS is 1).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        strides: Sequence[int],
        *,
        feat_channels: int = 256,
        stacked_convs: int = 4,
        num_groups: int = 32,
        octave_base_scale: float = 8.0,
        target_means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        target_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        losses: ATSSLossConfig | None = None,
        index: int = 1,
    ) -> None:
        super().__init__()
        self.num_classes, self.strides, self.index = num_classes, tuple(strides), index
        self.prior_generator = AnchorGenerator(
            self.strides, ratios=(1.0,), octave_base_scale=octave_base_scale, scales_per_octave=1
        )
        self.bbox_coder = DeltaXYWHCoder(target_means, target_stds)
        self.loss_config = losses or ATSSLossConfig()
        self.assigner = ATSSAssigner(self.loss_config.topk)
        widths = [in_channels] + [feat_channels] * stacked_convs
        self.cls_convs = nn.ModuleList(
            ConvGNReLU(i, o, num_groups) for i, o in zip(widths[:-1], widths[1:])
        )
        self.reg_convs = nn.ModuleList(
            ConvGNReLU(i, o, num_groups) for i, o in zip(widths[:-1], widths[1:])
        )
        self.atss_cls = nn.Conv2d(widths[-1], num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(widths[-1], 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(widths[-1], 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        self.reset_parameters()

    def reset_parameters(self, prior_prob: float = 0.01) -> None:
        """mmdet's init: convs N(0, 0.01) with zero bias, the class bias at ``prior_prob``."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.atss_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, levels: Sequence[Tensor]) -> ATSSOutput:
        """Maps [B, in_channels, h_l, w_l], one per stride -> the per-level predictions."""
        if len(levels) != len(self.strides):
            raise ValueError(f"{len(levels)} maps for {len(self.strides)} strides")
        out = ATSSOutput([], [], [])
        for x, scale in zip(levels, self.scales):
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            out.cls_logits.append(self.atss_cls(cls_feat))
            out.deltas.append(scale(self.atss_reg(reg_feat)))
            out.centerness.append(self.atss_centerness(reg_feat))
        return out

    def get_targets(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        image_sizes: Tensor,
        gt_boxes: Sequence[Tensor],
        gt_labels: Sequence[Tensor],
    ) -> ATSSTargets:
        """Assign every image (``image_sizes`` [B, 2] (h, w) unpadded pixels; ``gt_boxes``
        per image [G, 4] xyxy pixels, ``gt_labels`` [G] int64) -> the batch's targets."""
        device = gt_boxes[0].device
        priors = self.prior_generator.grid(feature_sizes, device=device)
        anchors = torch.cat(priors)
        per_image = [
            self._image_targets(anchors, feature_sizes, size, boxes, labels)
            for size, boxes, labels in zip(image_sizes.tolist(), gt_boxes, gt_labels)
        ]
        fields = list(zip(*per_image))
        assignments = list(fields[-1])
        num_pos = sum(max(int(a.positive.numel()), 1) for a in assignments)
        return ATSSTargets(
            anchors,
            tuple(p.shape[0] for p in priors),
            *(torch.stack(f) for f in fields[:-1]),
            assignments=assignments,
            num_positives=torch.tensor(float(num_pos), device=device),
        )

    def _image_targets(self, anchors, feature_sizes, size, boxes, labels) -> tuple:
        """(valid, labels, label_weights, bbox_targets, centerness, positive, assignment)
        of one image over all anchors; the assigner sees the valid anchors only."""
        flags = self.prior_generator.valid_flags(feature_sizes, tuple(size), anchors.device)
        valid = torch.cat(flags)
        boxes = boxes.to(anchors.dtype)
        assignment = self.assigner.assign(
            anchors[valid], [int(f.sum()) for f in flags], boxes, labels
        )
        where = torch.nonzero(valid).squeeze(1)[assignment.positive]
        assigned = boxes[assignment.positive_boxes]
        num = anchors.shape[0]
        target_labels = torch.full((num,), self.num_classes, dtype=torch.int64, device=valid.device)
        target_labels[where] = labels[assignment.positive_boxes].to(torch.int64)
        bbox_targets = anchors.new_zeros(num, 4)
        bbox_targets[where] = assigned
        centerness = anchors.new_zeros(num)
        centerness[where] = centerness_targets(anchors[where], assigned)
        positive = torch.zeros(num, dtype=torch.bool, device=valid.device)
        positive[where] = True
        weights = valid.to(anchors.dtype)
        return valid, target_labels, weights, bbox_targets, centerness, positive, assignment

    def losses(self, output: ATSSOutput, targets: ATSSTargets) -> list[DenseLoss]:
        """Per level ``loss_cls{i}.{l}``, ``loss_bbox{i}.{l}``, ``loss_centerness{i}.{l}``
        (unweighted sums; ``weight`` and ``count`` carry mmdet's weights and normalisers).
        A level without positives gives ``0 * sum(predictions)`` for its box and centreness
        terms, as mmdet (it keeps the graph, and the box term is -0.0 for a negative sum)."""
        dense, start = [], 0
        counts = (targets.num_positives, targets.centerness.sum())
        for level, count in enumerate(targets.num_level_anchors):
            dense += self._level_losses(output, targets, level, slice(start, start + count), counts)
            start += count
        return dense

    def _level_losses(self, output, targets, level, span, counts) -> list[DenseLoss]:
        """The three terms of one level; ``counts`` = (positives, centreness sum)."""
        config, (num_pos, centerness_sum) = self.loss_config, counts
        deltas, centerness = _flat(output.deltas[level]), _flat(output.centerness[level])[:, 0]
        positive = targets.positive[:, span].reshape(-1)
        focal = partial(
            _focal_sum,
            labels=targets.labels[:, span].reshape(-1),
            alpha=config.focal_alpha,
            gamma=config.focal_gamma,
        )
        cls_inputs = (_flat(output.cls_logits[level]), targets.label_weights[:, span].reshape(-1))
        if positive.any():
            anchors = targets.anchors[span].repeat(targets.labels.shape[0], 1)[positive]
            boxes = targets.bbox_targets[:, span].reshape(-1, 4)[positive]
            quality = targets.centerness[:, span].reshape(-1)[positive]
            bbox_fn = partial(_giou_sum, coder=self.bbox_coder)
            bbox_inputs = (deltas[positive], anchors, boxes, quality)
            centerness_fn, centerness_inputs = _bce_sum, (centerness[positive], quality)
        else:
            bbox_fn, bbox_inputs = _zero_sum, (deltas,)
            centerness_fn, centerness_inputs = _zero_sum, (centerness,)
        return [
            DenseLoss(self._name("loss_cls", level), focal, cls_inputs, num_pos, config.cls_weight),
            DenseLoss(
                self._name("loss_bbox", level),
                bbox_fn,
                bbox_inputs,
                centerness_sum,
                config.bbox_weight,
            ),
            DenseLoss(
                self._name("loss_centerness", level),
                centerness_fn,
                centerness_inputs,
                num_pos,
                config.centerness_weight,
            ),
        ]

    def _name(self, term: str, level: int) -> str:
        return f"{term}{self.index}.{level}"


def _flat(x: Tensor) -> Tensor:
    """[B, K, h, w] -> [B * h * w, K], rows in anchor order (image, y, x)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _focal_sum(logits: Tensor, weights: Tensor, *, labels: Tensor, alpha: float, gamma: float):
    """Sigmoid focal loss [M, C] against one-hot ``labels`` [M] (C = background), weighted
    per anchor, summed."""
    num_classes = logits.shape[-1]
    one_hot = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)
    loss = sigmoid_focal_loss(logits, one_hot, alpha, gamma, reduction="none")
    return (loss * weights[:, None]).sum()


def _giou_sum(deltas, anchors, boxes, quality, *, coder: DeltaXYWHCoder) -> Tensor:
    """Sum of (1 - GIoU(decoded, target)) weighted by the centreness targets."""
    decoded = coder.decode(anchors, deltas)
    loss = generalized_box_iou_loss(decoded, boxes, reduction="none", eps=GIOU_EPS)
    return (loss * quality).sum()


def _bce_sum(logits: Tensor, quality: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, quality, reduction="sum")


def _zero_sum(x: Tensor) -> Tensor:
    return x.sum() * 0
