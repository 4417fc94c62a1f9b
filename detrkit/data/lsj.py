# SPDX-License-Identifier: Apache-2.0
"""Large-scale jitter (LSJ), the training pipeline of Co-DINO's ``*_lsj_*`` configs.

What the reference does (Sense-X/Co-DETR, mmdetection 2,
``projects/configs/co_dino/co_dino_5scale_lsj_r50_1x_coco.py``, read for this module;
``image_size = (1024, 1024)``):

* train: ``Resize(img_scale=image_size, ratio_range=(0.1, 2.0), multiscale_mode='range',
  keep_ratio=True)`` -> ``RandomCrop(crop_type='absolute_range', crop_size=image_size,
  recompute_bbox=True, allow_negative_crop=True)`` -> ``FilterAnnotations(min_gt_bbox_wh=(1e-2,
  1e-2))`` -> ``RandomFlip(flip_ratio=0.5)`` -> ``Pad(size=image_size, pad_val=114)`` ->
  ``Normalize`` (ImageNet mean/std x 255, RGB). The COCO config also runs ``CopyPaste
  (max_num_pasted=100)`` through ``MultiImageMixDataset`` (it needs instance masks); the
  box-only variant given in the config's comments, implemented here, has no copy-paste.
* test: ``Resize(img_scale=image_size, keep_ratio=True)`` -> ``Pad(size=image_size, 114)``.
* the detector sets ``with_attn_mask=False``: Co-DETR then overwrites every image's
  ``img_shape`` with the padded batch shape, so the gray padding is *not* masked and boxes are
  normalised by the 1024 x 1024 canvas.

How detrkit reproduces it (``data.augmentation: lsj``):

1. ``ScaleJitter`` (torchvision): longer side ~ ``lsj_size x U(scale_range)``, i.e. scale factor
   ``min(S / h, S / w) x U(lo, hi)``, which for a square canvas equals mmdet's
   ``int(S x ratio) / max(h, w)``.
2. ``RandomSizeCrop(S, S)`` (the DETR recipe's crop): a ``min(h, S) x min(w, S)`` window at a
   uniform origin, which is mmdet's ``absolute_range`` crop with ``crop_size=(S, S)``; boxes are
   clipped and those left with zero width or height dropped, as mmdet's crop does.
3. ``sanitize_bounding_boxes(min_size=1e-2)`` (torchvision) for ``FilterAnnotations``.
4. ``RandomHorizontalFlip(0.5)``, then bottom/right padding to ``S x S`` with (114, 114, 114)
   (torchvision ``pad``), so every training image is the full canvas and, as with
   ``with_attn_mask=False``, boxes are normalised by ``S`` and nothing is masked.

Every draw uses torch's or Python's global RNG, which ``SeededDataset`` seeds per sample
(``detrkit.data.seeding.sample_seed``), so LSJ replays exactly on resume like the DETR recipe.

Known differences from mmdetection 2, all small:

* The scale is drawn with ``torch.rand`` (mmdet: ``np.random``); torchvision truncates the new
  size (``int(w x r)``) where mmcv rounds (``int(w x r + 0.5)``) after truncating ``S x ratio``.
* Resizing is PIL bilinear with antialiasing (as the DETR recipe); mmcv uses cv2 bilinear.
* ``FilterAnnotations`` keeps ``w > 1e-2 and h > 1e-2``; torchvision keeps ``>= 1e-2``.
* An image whose boxes are all cropped or filtered away is *kept* (empty target; the set
  criterion handles it). mmdet 2's ``FilterAnnotations`` (``keep_empty=True``) returns None
  and the dataset draws another image instead.
* No copy-paste (needs masks, see above).
* Evaluation resizes the longer side to ``S`` (rounded as mmcv) but does not pad: the collate
  pads with zeros (the ImageNet mean after normalisation, close to 114 gray) and masks the
  padding, where Co-DINO pads to ``S`` with 114 unmasked.
"""

from __future__ import annotations

from dataclasses import replace

from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from detrkit.config.schema import DataConfig
from detrkit.data.transforms import (
    Compose,
    DetectionSample,
    RandomHorizontalFlip,
    RandomSizeCrop,
    ToNormalizedTensor,
)

# mmdet's FilterAnnotations(min_gt_bbox_wh=(1e-2, 1e-2)) in the LSJ configs.
MIN_BOX_SIDE = 1e-2
# mmdet's Pad(pad_val=dict(img=(114, 114, 114))), in 0-255 RGB before normalisation.
PAD_VALUE = (114, 114, 114)


class ScaleJitter:
    """torchvision's ``ScaleJitter`` on a ``DetectionSample`` (one ``torch.rand`` draw)."""

    def __init__(self, size: int, scale_range: tuple[float, float]) -> None:
        self.size = size
        self.scale_range = tuple(scale_range)
        self._jitter = v2.ScaleJitter(target_size=(size, size), scale_range=self.scale_range)

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        image, boxes = self._jitter(sample.image, sample.boxes)
        return replace(sample, image=image, boxes=boxes)

    def __repr__(self) -> str:
        return f"ScaleJitter(size={self.size}, scale_range={self.scale_range})"


class FilterSmallBoxes:
    """Drop boxes (and labels) narrower or shorter than ``min_size`` pixels (torchvision's
    ``sanitize_bounding_boxes``, no area threshold)."""

    def __init__(self, min_size: float = MIN_BOX_SIDE) -> None:
        self.min_size = min_size

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        boxes, keep = F.sanitize_bounding_boxes(sample.boxes, min_size=self.min_size, min_area=0.0)
        return DetectionSample(
            sample.image, tv_tensors.wrap(boxes, like=sample.boxes), sample.labels[keep]
        )

    def __repr__(self) -> str:
        return f"FilterSmallBoxes(min_size={self.min_size})"


class PadToSquare:
    """Pad at the bottom/right to ``size x size`` with ``PAD_VALUE``; boxes do not move."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        height, width = sample.size
        padding = [0, 0, max(self.size - width, 0), max(self.size - height, 0)]
        if not any(padding):
            return sample
        fill = list(PAD_VALUE) if not isinstance(sample.image, Tensor) else 0
        return replace(
            sample,
            image=F.pad(sample.image, padding, fill=fill),
            boxes=F.pad(sample.boxes, padding),
        )

    def __repr__(self) -> str:
        return f"PadToSquare({self.size})"


def lsj_eval_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the longer side ``size``, rounded as mmcv's ``rescale_size``."""
    factor = size / max(height, width)
    return int(height * factor + 0.5), int(width * factor + 0.5)


class ResizeLonger:
    """Resize (bilinear) so the longer side is ``size``, keeping the aspect ratio."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, sample: DetectionSample) -> DetectionSample:
        new_size = list(lsj_eval_size(*sample.size, self.size))
        if tuple(new_size) == sample.size:
            return sample
        return replace(
            sample, image=F.resize(sample.image, new_size), boxes=F.resize(sample.boxes, new_size)
        )

    def __repr__(self) -> str:
        return f"ResizeLonger({self.size})"


def build_lsj_train_transforms(cfg: DataConfig) -> Compose:
    """LSJ training: jitter -> crop to at most S x S -> drop tiny boxes -> flip(0.5) -> pad to
    S x S -> normalise (see the module docstring)."""
    size = cfg.lsj_size
    return Compose(
        [
            ScaleJitter(size, cfg.lsj_scale_range),
            RandomSizeCrop(size, size),
            FilterSmallBoxes(MIN_BOX_SIDE),
            RandomHorizontalFlip(0.5),
            PadToSquare(size),
            ToNormalizedTensor(),
        ]
    )


def build_lsj_eval_transforms(cfg: DataConfig) -> Compose:
    """LSJ evaluation: longer side to ``lsj_size`` (the collate pads), then normalise."""
    return Compose([ResizeLonger(cfg.lsj_size), ToNormalizedTensor()])
