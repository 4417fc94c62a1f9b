# SPDX-License-Identifier: Apache-2.0
"""Reading dataset images as 8-bit RGB PIL images, with EXIF orientation handled."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from detrkit.errors import UserError

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION_TAG = 0x0112  # EXIF "Orientation"; 1 means "stored upright"
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_UINT16_MAX = 65535.0
_UINT8_MAX = 255.0


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Grayscale and palette images are expanded, alpha is dropped, and 16-bit / 32-bit integer or
    float grayscale is rescaled to [0, 255] (plain ``convert("RGB")`` would saturate it).
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode in _SIXTEEN_BIT_MODES or (image.mode == "I" and array.max(initial=0) > 255):
            array = array * (_UINT8_MAX / _UINT16_MAX)
        elif image.mode == "F" and array.max(initial=0) <= 1.0:
            array = array * _UINT8_MAX
        gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P":
        # Palette transparency is only honoured through RGBA; going straight to RGB warns.
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8), 1 when absent or unreadable."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except (OSError, ValueError, SyntaxError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def load_rgb_image(
    path: Path, image_id: int, expected_size: tuple[int, int] | None = None
) -> Image.Image:
    """Open an image file as 8-bit RGB, applying its EXIF orientation when that fits the labels.

    Boxes in a COCO file refer to some orientation of the pixels, and ``width``/``height`` in the
    file tell which: the EXIF-rotated image is returned when its size matches ``expected_size``
    (or nothing is expected); the stored, unrotated pixels when only they match (COCO's own
    files, whose annotations ignore EXIF); otherwise the rotated image (the caller warns about the
    mismatch).

    Args:
        path: image file.
        image_id: dataset image id, for error messages.
        expected_size: (w, h) from the annotation file, or None.

    Raises:
        UserError: the file is missing or cannot be decoded; the message names path and id.
    """
    try:
        with Image.open(path) as handle:
            handle.load()
            stored = handle.copy()
            image = stored if exif_orientation(handle) == 1 else _oriented(handle)
    except FileNotFoundError:
        raise UserError(
            f"image file {path} (image id {image_id}) does not exist; check its 'file_name' in "
            "the annotation file and the images folder"
        ) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(
            f"image file {path} (image id {image_id}) cannot be read as an image: {exc}"
        ) from None
    if expected_size is not None and image.size != expected_size and stored.size == expected_size:
        logger.debug("%s: EXIF orientation ignored, the annotations use stored pixels", path)
        image = stored
    return to_rgb(image)


def _oriented(handle: Image.Image) -> Image.Image:
    oriented = ImageOps.exif_transpose(handle)
    return oriented if oriented is not None else handle.copy()
