# SPDX-License-Identifier: Apache-2.0
"""Soft-NMS (Bodla et al., 2017) in plain torch ops, with mmcv's visiting order and tie-breaking:
torchvision has none (docs/methods.md#co-dino-inference).

The algorithm is sequential: step i picks the best remaining box, then decays the scores of the
boxes after it by their overlap with it; a box whose score falls below ``min_score`` is
dropped by moving the last remaining box into its place (which decides ties in later steps).
Each step is vectorised over the remaining boxes, so N kept boxes cost N steps.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

# Columns of the working table: the box, its current score, its area.
_X1, _Y1, _X2, _Y2, _SCORE, _AREA = range(6)


def _decay(table: Tensor, picked: Tensor, method: str, iou_threshold: float, sigma: float) -> None:
    """Multiply the scores of ``table`` [M, 6] in place by the decay of their IoU with
    ``picked`` [6] (each elementwise operation rounded in the table's dtype)."""
    width = (torch.min(table[:, _X2], picked[_X2]) - torch.max(table[:, _X1], picked[_X1])).clamp(
        min=0
    )
    height = (torch.min(table[:, _Y2], picked[_Y2]) - torch.max(table[:, _Y1], picked[_Y1])).clamp(
        min=0
    )
    inter = width * height
    iou = inter / (picked[_AREA] + table[:, _AREA] - inter)
    if method == "linear":
        weight = torch.where(iou >= iou_threshold, 1 - iou, torch.ones_like(iou))
    else:
        weight = torch.exp(-(iou * iou) / sigma)
    table[:, _SCORE] *= weight


def _drop_order(failed: Tensor) -> Tensor:
    """Positions [K] of the survivors after dropping ``failed`` [M] bool one by one, each
    replaced by the last remaining box: a dropped position among the first K (K = survivors)
    takes the survivors after K, the last one first."""
    survivors = int((~failed).sum())
    positions = torch.arange(failed.numel(), device=failed.device)
    order = positions[:survivors].clone()
    holes = failed[:survivors]
    tail = positions[survivors:][~failed[survivors:]]
    order[holes] = tail.flip(0)
    return order


def soft_nms(
    boxes_xyxy: Tensor,
    scores: Tensor,
    *,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    min_score: float = 1e-3,
    method: Literal["linear", "gaussian"] = "linear",
) -> tuple[Tensor, Tensor]:
    """Soft-NMS of one set of boxes (all of one class, or offset apart: ``batched_soft_nms``).

    Args:
        boxes_xyxy: [N, 4] (x1, y1, x2, y2), any units.
        scores: [N].
        iou_threshold: "linear" decays boxes with IoU >= this by 1 - IoU.
        sigma: "gaussian" decays every box by exp(-IoU^2 / sigma).
        min_score: boxes whose score falls below this are dropped.
        method: "linear" or "gaussian".

    Returns:
        keep [K] int64, input indices in the order they were picked, and their decayed scores
        [K] (non-increasing; float32, or float64 for float64 inputs).
    """
    if method not in ("linear", "gaussian"):
        raise ValueError(f"soft-NMS method must be 'linear' or 'gaussian', got {method!r}")
    device = scores.device
    boxes_xyxy, scores = boxes_xyxy.detach().cpu(), scores.detach().cpu()
    # At least float32 (bf16 scores would round the boxes); a float64 input stays float64.
    wide = torch.float64 in (boxes_xyxy.dtype, scores.dtype)
    dtype = torch.float64 if wide else torch.float32
    boxes_xyxy, scores = boxes_xyxy.to(dtype), scores.to(dtype)
    areas = (boxes_xyxy[:, 2] - boxes_xyxy[:, 0]) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1])
    table = torch.cat((boxes_xyxy, scores[:, None], areas[:, None]), 1)
    index = torch.arange(len(scores))
    count, step = len(scores), 0
    while step < count:
        # The first best score wins ties, as in mmcv.
        best = step + int(torch.argmax(table[step:count, _SCORE]))
        swap = torch.tensor([best, step])
        table[[step, best]], index[[step, best]] = table[swap], index[swap]
        rest = table[step + 1 : count]
        _decay(rest, table[step], method, iou_threshold, sigma)
        failed = rest[:, _SCORE] < min_score
        if bool(failed.any()):
            order = _drop_order(failed) + step + 1
            kept = len(order)
            table[step + 1 : step + 1 + kept] = table[order]
            index[step + 1 : step + 1 + kept] = index[order]
            count = step + 1 + kept
        step += 1
    return index[:count].to(device), table[:count, _SCORE].to(device)


def class_offset_boxes(boxes_xyxy: Tensor, labels: Tensor) -> Tensor:
    """[N, 4] boxes shifted by label * (the largest coordinate + 1), so that boxes of different
    classes never overlap (mmcv's ``batched_nms``)."""
    if boxes_xyxy.numel() == 0:
        return boxes_xyxy
    offsets = labels.to(boxes_xyxy) * (boxes_xyxy.max() + torch.ones((), dtype=boxes_xyxy.dtype))
    return boxes_xyxy + offsets.to(boxes_xyxy.device)[:, None]


def batched_soft_nms(
    boxes_xyxy: Tensor, scores: Tensor, labels: Tensor, **options
) -> tuple[Tensor, Tensor]:
    """Class-wise soft-NMS: [N, 4] boxes, [N] scores, [N] int64 labels -> (keep [K] input
    indices in picking order, decayed scores [K]); ``options`` as ``soft_nms``."""
    if scores.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=scores.device), scores
    return soft_nms(class_offset_boxes(boxes_xyxy, labels), scores, **options)
