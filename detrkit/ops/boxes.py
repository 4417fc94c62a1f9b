# SPDX-License-Identifier: Apache-2.0
"""Box format conversions and pairwise overlaps.

``cxcywh`` = (centre x, centre y, width, height); ``xyxy`` = (x1, y1, x2, y2). Overlaps come from
torchvision; only the conversions DETR needs with its exact arithmetic are written here.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "box_iou",
    "generalized_box_iou",
    "paired_generalized_box_iou",
    "batched_generalized_box_iou",
    "inverse_sigmoid",
    "at_least_float32",
    "paired_box_iou",
]

# Clamp of the inverse sigmoid used by every DETR-style codebase (spec, notation).
INVERSE_SIGMOID_EPS = 1e-5


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or unchanged when float64: box arithmetic and score ranking never run
    in bf16/fp16 (which ties many scores), and a float64 model stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] cxcywh -> [..., 4] xyxy (same units)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [..., 4] cxcywh (same units)."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of corresponding rows: [N, 4] xyxy, [N, 4] xyxy -> [N].

    Computed element-wise rather than as the diagonal of the [N, N] matrix, so memory is O(N).
    """
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter_wh = (bottom_right - top_left).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / union
    hull_wh = torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return iou - (hull - union) / hull


def batched_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of every pair in each batch element: [..., N, 4], [..., M, 4] xyxy -> [..., N, M].

    torchvision's ``generalized_box_iou`` has no batch dimension; matching needs one so that
    each image's queries are compared with that image's targets only.
    """
    a, b = boxes1[..., :, None, :], boxes2[..., None, :, :]
    area1 = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area2 = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    inter_wh = (torch.min(a[..., 2:], b[..., 2:]) - torch.max(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area1 + area2 - inter
    hull_wh = (torch.max(a[..., 2:], b[..., 2:]) - torch.min(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return inter / union - (hull - union) / hull


def inverse_sigmoid(x: Tensor, eps: float = INVERSE_SIGMOID_EPS) -> Tensor:
    """Clamped logit: log(max(x, eps) / max(1 - x, eps)) with x clamped to [0, 1]."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def paired_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of matching rows: [N, 4], [N, 4] xyxy -> [N]; the union is clamped at ``eps``
    (mmdetection's aligned ``bbox_overlaps``)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    overlap = (bottom_right - top_left).clamp(min=0).prod(-1)
    union = (area1 + area2 - overlap).clamp(min=eps)
    return overlap / union
