# SPDX-License-Identifier: Apache-2.0
"""The inference pass: a padded batch in, detections per image in original pixels out; with
test-time augmentation (several scales and a horizontal flip, as ``InferenceConfig`` says) the
passes are merged per image by class-wise NMS. Evaluation, ``Predictor`` and ``detrkit predict``
all detect through :func:`detect`.

Every pass predicts boxes relative to each image's own extent, so the postprocessor scales them
to the original image whatever the pass's scale; a flipped pass's boxes are mirrored back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detrkit.config.schema import InferenceConfig
from detrkit.data.collate import pad_images
from detrkit.data.transforms import resized_size
from detrkit.engine.precision import Precision
from detrkit.structures import Detections, ImageBatch


@torch.no_grad()
def detect(
    model: nn.Module,
    postprocess: nn.Module,
    images: ImageBatch,
    original_sizes: Tensor,
    precision: Precision,
    tta: InferenceConfig | None = None,
) -> list[Detections]:
    """Detections per image: boxes XYXY in absolute pixels of the original image, scores,
    contiguous labels.

    Args:
        model: the detector, in eval mode.
        postprocess: turns the inference prediction group into per-image ``Detections``.
        images: the eval-transformed, padded batch.
        original_sizes: [B, 2] (h, w) of the images before any transform.
        precision: autocast of the forward pass.
        tta: the passes to run (``config.build.build_tta``, which resolves ``tta_max_size``);
            None or no TTA set = the single plain pass.
    """
    if tta is None or not tta.tta_enabled:
        return _single_pass(model, postprocess, images, original_sizes, precision)
    passes: list[list[Detections]] = []
    for scale in (None, *tta.tta_scales):
        batch = images if scale is None else rescale(images, scale, tta.tta_max_size)
        for flipped in (False, True) if tta.tta_flip else (False,):
            found = _single_pass(
                model, postprocess, hflip(batch) if flipped else batch, original_sizes, precision
            )
            if flipped:
                found = [_unflip(d, int(w)) for d, w in zip(found, original_sizes[:, 1])]
            passes.append(found)
    keep = max(len(d.scores) for found in passes for d in found)
    return [
        _merge([found[i] for found in passes], tta.tta_nms_iou, keep) for i in range(len(images))
    ]


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
