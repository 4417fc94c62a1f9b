# SPDX-License-Identifier: Apache-2.0
"""Inference on a padded batch, optionally with test-time augmentation (several scales and a
horizontal flip), merged per image by class-wise NMS.

Every pass predicts boxes relative to each image's own extent, so the postprocessor scales them
to the original image whatever the pass's scale; a flipped pass's boxes are mirrored back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detrkit.data.collate import pad_images
from detrkit.data.transforms import resized_size
from detrkit.engine.precision import Precision
from detrkit.structures import Detections, ImageBatch


@dataclass(frozen=True)
class TTASettings:
    """Which passes to run and how to merge them.

    Attributes:
        scales: shorter sides of the extra passes (the batch's own size always runs).
        max_size: cap on the longer side of a rescaled pass.
        flip: also run every scale horizontally flipped.
        nms_iou: class-wise NMS threshold of the merge.
    """

    scales: tuple[int, ...] = ()
    max_size: int | None = None
    flip: bool = False
    nms_iou: float = 0.6

    @property
    def enabled(self) -> bool:
        return bool(self.scales) or self.flip


@torch.no_grad()
def detect(
    model: nn.Module,
    postprocess: nn.Module,
    images: ImageBatch,
    original_sizes: Tensor,
    precision: Precision,
    tta: TTASettings | None = None,
) -> list[Detections]:
    """Detections per image in original pixels.

    Args:
        images: the eval-transformed, padded batch.
        original_sizes: [B, 2] (h, w) of the images before any transform.
    """
    if tta is None or not tta.enabled:
        return _single_pass(model, postprocess, images, original_sizes, precision)
    passes: list[list[Detections]] = []
    for scale in (None, *tta.scales):
        batch = images if scale is None else rescale(images, scale, tta.max_size)
        for flipped in (False, True) if tta.flip else (False,):
            found = _single_pass(
                model, postprocess, hflip(batch) if flipped else batch, original_sizes, precision
            )
            if flipped:
                found = [_unflip(d, int(w)) for d, w in zip(found, original_sizes[:, 1])]
            passes.append(found)
    keep = max(len(d.scores) for found in passes for d in found)
    return [_merge([found[i] for found in passes], tta.nms_iou, keep) for i in range(len(images))]


def _single_pass(model, postprocess, images, original_sizes, precision) -> list[Detections]:
    with precision.autocast():
        output = model(images)
    group = output.for_inference()
    group.logits, group.boxes = group.logits.float(), group.boxes.float()
    return postprocess(group, original_sizes)


def rescale(images: ImageBatch, shorter: int, max_size: int | None) -> ImageBatch:
    """Resize each image's valid region to ``shorter`` (longer side <= ``max_size``), re-pad."""
    resized = []
    for pixels, (height, width) in zip(images.pixels, images.sizes.tolist()):
        size = resized_size(height, width, shorter, max_size)
        valid = pixels[None, :, :height, :width]
        resized.append(
            F.interpolate(valid, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        )
    return pad_images(resized)


def hflip(images: ImageBatch) -> ImageBatch:
    """Mirror each image inside its valid region (padding stays bottom/right)."""
    pixels = images.pixels.clone()
    for i, (height, width) in enumerate(images.sizes.tolist()):
        pixels[i, :, :height, :width] = images.pixels[i, :, :height, :width].flip(-1)
    return ImageBatch(pixels, images.padding_mask, images.sizes)


def _unflip(found: Detections, width: int) -> Detections:
    x1, y1, x2, y2 = found.boxes_xyxy.unbind(-1)
    boxes = torch.stack((width - x2, y1, width - x1, y2), dim=-1)
    return Detections(boxes, found.scores, found.labels)


def _merge(candidates: Sequence[Detections], iou: float, keep: int) -> Detections:
    boxes = torch.cat([d.boxes_xyxy for d in candidates])
    scores = torch.cat([d.scores for d in candidates])
    labels = torch.cat([d.labels for d in candidates])
    kept = batched_nms(boxes, scores, labels, iou)[:keep]
    return Detections(boxes[kept], scores[kept], labels[kept])
