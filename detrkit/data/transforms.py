# SPDX-License-Identifier: Apache-2.0
"""DETR's box-aware augmentation recipe (docs/methods.md#augmentation), reproduced draw for draw.

Every transform maps a ``DetectionSample`` to a new ``DetectionSample``. Geometry runs on the PIL
image, with boxes held as ``tv_tensors.BoundingBoxes`` (XYXY, absolute pixels) so that
torchvision moves them together with the image; ``ToNormalizedTensor`` ends the pipeline.

Random draws match the original code: Python's ``random`` for coin flips, scale choices and crop
sizes, torch's RNG for the crop origin. Seeding both reproduces a pipeline exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from detrkit.config.schema import DataConfig

# ImageNet statistics used by every torchvision-pretrained backbone (and by DETR).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Transform = Callable[["DetectionSample"], "DetectionSample"]


@dataclass
class DetectionSample:
    """An image with its boxes while it moves through the transforms.

    Attributes:
        image: RGB PIL image, or a [3, h, w] float tensor once ``ToNormalizedTensor`` has run.
        boxes: [N, 4] ``BoundingBoxes`` in XYXY absolute pixels, ``canvas_size`` = (h, w).
        labels: [N] int64 labels aligned with ``boxes``.
    """

    image: Image.Image | Tensor
    boxes: tv_tensors.BoundingBoxes
    labels: Tensor

    @classmethod
    def from_xyxy(cls, image: Image.Image, boxes_xyxy: Tensor, labels: Tensor) -> DetectionSample:
        """Wrap a PIL image, [N, 4] absolute xyxy boxes and [N] labels."""
        boxes = tv_tensors.BoundingBoxes(
            boxes_xyxy.reshape(-1, 4).float(),
            format=tv_tensors.BoundingBoxFormat.XYXY,
            canvas_size=(image.height, image.width),
        )
        return cls(image, boxes, labels.reshape(-1).long())

    @property
    def size(self) -> tuple[int, int]:
        """(h, w) of the current image."""
        if isinstance(self.image, Tensor):
            return int(self.image.shape[-2]), int(self.image.shape[-1])
        return self.image.height, self.image.width

    @property
    def boxes_xyxy(self) -> Tensor:
        """[N, 4] plain tensor of absolute xyxy boxes."""
        return self.boxes.as_subclass(Tensor)

    def boxes_cxcywh_normalized(self) -> Tensor:
        """[N, 4] cxcywh boxes divided by (w, h, w, h) of the current image (cxcywh-n)."""
        h, w = self.size
        x1, y1, x2, y2 = self.boxes_xyxy.unbind(-1)
        boxes = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)
        return boxes / torch.tensor([w, h, w, h], dtype=torch.float32)


def resized_size(
    height: int, width: int, shorter: int, max_size: int | None = None
) -> tuple[int, int]:
    """Output (h, w) of DETR's aspect-preserving resize (docs/methods.md#augmentation).

    If ``max_size`` is given and the longer side would exceed it, the shorter side becomes
    ``int(round(max_size * min / max))``. An image whose shorter side already equals the target
    is unchanged; otherwise the longer side is ``int(shorter * long / short)`` (truncation).
    """
    if max_size is not None:
        short_side, long_side = float(min(width, height)), float(max(width, height))
        if long_side / short_side * shorter > max_size:
            shorter = int(round(max_size * short_side / long_side))
    if (width <= height and width == shorter) or (height <= width and height == shorter):
        return height, width
    if width < height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


def resize(sample: DetectionSample, shorter: int, max_size: int | None = None) -> DetectionSample:
    """Resize so the shorter side is ``shorter`` (bilinear); boxes scale with the image."""
    new_size = list(resized_size(*sample.size, shorter, max_size))
    if tuple(new_size) == sample.size:
        return sample
    return replace(
        sample, image=F.resize(sample.image, new_size), boxes=F.resize(sample.boxes, new_size)
    )


def crop(sample: DetectionSample, top: int, left: int, height: int, width: int) -> DetectionSample:
    """Crop to the region; boxes are shifted, clipped, and dropped (with labels) when empty."""
    boxes = F.crop(sample.boxes, top=top, left=left, height=height, width=width)
    x1, y1, x2, y2 = boxes.as_subclass(Tensor).unbind(-1)
    # DETR removes boxes with zero width or height after clipping (no minimum size).
    keep = (x2 > x1) & (y2 > y1)
    return DetectionSample(
        F.crop(sample.image, top=top, left=left, height=height, width=width),
        tv_tensors.wrap(boxes[keep], like=boxes),
        sample.labels[keep],
    )


def hflip(sample: DetectionSample) -> DetectionSample:
    """Mirror left-right: x1' = W - x2, x2' = W - x1."""
    return replace(
        sample,
        image=F.horizontal_flip(sample.image),
        boxes=F.horizontal_flip(sample.boxes),
    )


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        for transform in self.transforms:
            sample = transform(sample)
        return sample

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomHorizontalFlip:
    """Flip with probability ``p`` (one ``random.random()`` draw)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        return hflip(sample) if random.random() < self.p else sample

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResize:
    """Resize the shorter side to a size drawn with ``random.choice`` (docs/methods.md#augmentation
    size rule)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        if not sizes:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        return resize(sample, random.choice(self.sizes), self.max_size)

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random w x h region, w in [min_size, min(W, max_size)], h likewise.

    Width is drawn before height (``random.randint``, inclusive), then the origin with torch's
    RNG, top before left, as ``torchvision.transforms.RandomCrop.get_params`` does (no draw when
    the crop covers the whole image). An image smaller than ``min_size`` is cropped to at most
    its own size (the original code would raise there).
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def _draw_side(self, side: int) -> int:
        upper = min(side, self.max_size)
        return random.randint(min(self.min_size, upper), upper)

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        height, width = sample.size
        crop_w = self._draw_side(width)
        crop_h = self._draw_side(height)
        if (crop_h, crop_w) == (height, width):
            return crop(sample, 0, 0, height, width)
        top = int(torch.randint(0, height - crop_h + 1, size=(1,)).item())
        left = int(torch.randint(0, width - crop_w + 1, size=(1,)).item())
        return crop(sample, top, left, crop_h, crop_w)

    def __repr__(self) -> str:
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


class RandomSelect:
    """Apply ``first`` when ``random.random() < p``, else ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5) -> None:
        self.first = first
        self.second = second
        self.p = p

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        return self.first(sample) if random.random() < self.p else self.second(sample)

    def __repr__(self) -> str:
        return f"RandomSelect({self.first!r}, {self.second!r}, p={self.p})"


class ToNormalizedTensor:
    """PIL RGB image -> [3, h, w] float32, scaled to [0, 1] then normalised by mean/std.

    Scaling divides by 255 (as ``torchvision.transforms.functional.to_tensor``) so pixels are
    bit-identical to the original pipeline.
    """

    def __init__(
        self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
    ) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        image = sample.image
        if not isinstance(image, Tensor):
            array = np.array(image.convert("RGB"), dtype=np.uint8, copy=True)
            image = torch.from_numpy(array).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.mean, dtype=image.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=image.dtype)[:, None, None]
        return replace(sample, image=(image - mean) / std)

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean}, std={self.std})"


def denormalize(
    pixels: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """Undo the normalisation for drawing: [..., 3, H, W] normalised -> same shape in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    return (pixels * std_t + mean_t).clamp(0.0, 1.0)


def build_train_transforms(cfg: DataConfig) -> Compose:
    """DETR's training recipe (docs/methods.md#augmentation).

    flip(0.5) -> [p 0.5: RandomResize(train_scales, max_size)
                  else: RandomResize(crop_resize_scales) -> RandomSizeCrop(*crop_size)
                        -> RandomResize(train_scales, max_size)] -> ToNormalizedTensor.
    With ``cfg.crop`` False the middle step is RandomResize(train_scales, max_size) alone.
    ``cfg.augmentation == "lsj"`` builds large-scale jitter instead (``detrkit.data.lsj``).
    """
    if cfg.augmentation == "lsj":
        from detrkit.data.lsj import build_lsj_train_transforms  # lsj imports this module

        return build_lsj_train_transforms(cfg)
    scale = RandomResize(cfg.train_scales, cfg.max_size)
    middle: Transform = scale
    if cfg.crop:
        crop_branch = Compose(
            [
                RandomResize(cfg.crop_resize_scales),
                RandomSizeCrop(*cfg.crop_size),
                RandomResize(cfg.train_scales, cfg.max_size),
            ]
        )
        middle = RandomSelect(scale, crop_branch, p=0.5)
    return Compose([RandomHorizontalFlip(0.5), middle, ToNormalizedTensor()])


def build_eval_transforms(cfg: DataConfig) -> Compose:
    """Evaluation: resize the shorter side to ``val_size`` (longer side <= ``max_size``),
    then normalise. Deterministic. With ``cfg.augmentation == "lsj"``: the longer side to
    ``lsj_size`` (``detrkit.data.lsj``)."""
    if cfg.augmentation == "lsj":
        from detrkit.data.lsj import build_lsj_eval_transforms  # lsj imports this module

        return build_lsj_eval_transforms(cfg)
    return Compose([RandomResize([cfg.val_size], cfg.max_size), ToNormalizedTensor()])
