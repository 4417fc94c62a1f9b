# SPDX-License-Identifier: Apache-2.0
"""What ``Predictor`` accepts as images, turned into 8-bit RGB PIL images.

Every input becomes the same 8-bit RGB image a decoded file would be, so a path, the PIL image,
its numpy array and its tensor give identical detections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from detrkit.data.images import to_rgb
from detrkit.errors import UserError

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor
"""One image: a file path, a PIL image (any mode), an [H, W, 3] uint8 RGB array, or a
[3, H, W] tensor (uint8, or float in [0, 1])."""

_ACCEPTED = (
    "a file path, a PIL image, an HxWx3 uint8 numpy array, a 3xHxW uint8 or float [0, 1] "
    "tensor, or a list of these"
)


@dataclass(frozen=True)
class ImageBatchInput:
    """Inputs as RGB images, and whether the caller gave one image (not a list or a batch)."""

    images: list[Image.Image]
    single: bool


def open_image(path: str | Path) -> Image.Image:
    """Read an image file as 8-bit RGB, turned upright by its EXIF orientation.

    Raises:
        UserError: the file does not exist or is not an image; the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"image {path} does not exist; give the path of an image file")
    try:
        with Image.open(path) as handle:
            handle.load()
            upright = ImageOps.exif_transpose(handle)
            image = upright if upright is not None else handle.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"image {path} cannot be read as an image: {exc}") from None
    return to_rgb(image)


def as_images(inputs: ImageInput | Sequence[ImageInput]) -> ImageBatchInput:
    """Split ``inputs`` into RGB images: a list or tuple, and a 4-D array or tensor (a batch),
    give several; anything else is one image.

    Raises:
        UserError: an unsupported type, shape, dtype or value range, or an unreadable path.
    """
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise UserError("Predictor got an empty list of images")
        return ImageBatchInput([_as_image(item, i) for i, item in enumerate(inputs)], False)
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 4:
        return ImageBatchInput([_as_image(item, i) for i, item in enumerate(inputs)], False)
    return ImageBatchInput([_as_image(inputs, 0)], True)


def _as_image(item: object, index: int) -> Image.Image:
    if isinstance(item, (str, Path)):
        return open_image(item)
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        return _from_array(item, index)
    if isinstance(item, torch.Tensor):
        return _from_tensor(item, index)
    raise UserError(f"Predictor input {index} is a {type(item).__name__}; give {_ACCEPTED}")


def _from_array(array: np.ndarray, index: int) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise UserError(
            f"Predictor input {index} is a numpy array of shape {tuple(array.shape)} and dtype "
            f"{array.dtype}; give an HxWx3 uint8 RGB array"
        )
    return Image.fromarray(np.ascontiguousarray(array))


def _from_tensor(tensor: torch.Tensor, index: int) -> Image.Image:
    floating = tensor.is_floating_point()
    if tensor.ndim != 3 or tensor.shape[0] != 3 or not (floating or tensor.dtype == torch.uint8):
        raise UserError(
            f"Predictor input {index} is a tensor of shape {tuple(tensor.shape)} and dtype "
            f"{tensor.dtype}; give a 3xHxW RGB tensor, uint8 or float in [0, 1]"
        )
    tensor = tensor.detach().cpu()
    if floating:
        if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1 or tensor.isnan().any()):
            raise UserError(
                f"Predictor input {index} is a float tensor outside [0, 1]; divide 8-bit "
                "pixels by 255 (do not normalise: the model's transforms do)"
            )
        # Quantised like a decoded file, so a tensor and its file give the same detections.
        tensor = (tensor.float() * 255).round().to(torch.uint8)
    return Image.fromarray(tensor.permute(1, 2, 0).contiguous().numpy())
