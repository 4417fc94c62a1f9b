# SPDX-License-Identifier: Apache-2.0
"""R-CNN box deltas (dx, dy, dw, dh) with mmdetection 2.x ``DeltaXYWHBBoxCoder`` semantics.

Boxes are xyxy pixels. ``encode`` gives ``((g_c - p_c) / p_wh, log(g_wh / p_wh))``, normalised by
``(delta - means) / stds``; ``decode`` inverts it with the log-size deltas clamped to
``|log(wh_ratio_clip)|`` and, when ``max_shape = (h, w)`` is given, the corners clamped to the
image. Class-specific deltas [N, 4K] decode against the same N boxes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_WH_RATIO_CLIP = 16 / 1000


class DeltaXYWHCoder:
    """Encode / decode box deltas.

    Args:
        means, stds: per-coordinate normalisation of the deltas.
        wh_ratio_clip: smallest size ratio a decoded delta may express (and the inverse, largest).
    """

    def __init__(
        self,
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        wh_ratio_clip: float = DEFAULT_WH_RATIO_CLIP,
    ) -> None:
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.max_ratio = abs(math.log(wh_ratio_clip))

    def encode(self, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        """[N, 4] reference boxes, [N, 4] targets (xyxy) -> [N, 4] float32 normalised deltas."""
        boxes, gt_boxes = boxes.float(), gt_boxes.float()
        px, py = (boxes[..., 0] + boxes[..., 2]) * 0.5, (boxes[..., 1] + boxes[..., 3]) * 0.5
        pw, ph = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        gx, gy = (
            (gt_boxes[..., 0] + gt_boxes[..., 2]) * 0.5,
            (gt_boxes[..., 1] + gt_boxes[..., 3]) * 0.5,
        )
        gw, gh = gt_boxes[..., 2] - gt_boxes[..., 0], gt_boxes[..., 3] - gt_boxes[..., 1]
        deltas = torch.stack(
            ((gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)), dim=-1
        )
        means, stds = deltas.new_tensor(self.means), deltas.new_tensor(self.stds)
        return (deltas - means) / stds

    def decode(
        self, boxes: Tensor, deltas: Tensor, max_shape: tuple[int, int] | None = None
    ) -> Tensor:
        """[N, 4] reference boxes, [N, 4K] deltas -> [N, 4K] xyxy boxes (clamped to
        ``max_shape = (h, w)`` when given)."""
        num_boxes, num_classes = deltas.shape[0], deltas.shape[1] // 4
        if num_boxes == 0:
            return deltas
        deltas = deltas.reshape(-1, 4)
        denorm = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        dxy, dwh = denorm[:, :2], denorm[:, 2:]
        refs = boxes.repeat(1, num_classes).reshape(-1, 4)
        pxy = (refs[:, :2] + refs[:, 2:]) * 0.5
        pwh = refs[:, 2:] - refs[:, :2]
        dwh = dwh.clamp(min=-self.max_ratio, max=self.max_ratio)
        gxy = pxy + pwh * dxy
        gwh = pwh * dwh.exp()
        decoded = torch.cat((gxy - gwh * 0.5, gxy + gwh * 0.5), dim=-1)
        if max_shape is not None:
            height, width = max_shape
            decoded = torch.stack(
                (
                    decoded[:, 0].clamp(min=0, max=width),
                    decoded[:, 1].clamp(min=0, max=height),
                    decoded[:, 2].clamp(min=0, max=width),
                    decoded[:, 3].clamp(min=0, max=height),
                ),
                dim=-1,
            )
        return decoded.reshape(num_boxes, -1)
