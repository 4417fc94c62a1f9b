# SPDX-License-Identifier: Apache-2.0
"""Batching images of different sizes into a padded ``ImageBatch``
(docs/methods.md#batching-and-padding)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from detrkit.structures import ImageBatch, Target


def pad_images(images: Sequence[Tensor]) -> ImageBatch:
    """Zero-pad [3, h_i, w_i] images at the bottom/right to the batch's max (H, W).

    Returns:
        ImageBatch with pixels [B, 3, H, W], padding_mask [B, H, W] (True on padding) and
        sizes [B, 2] int64 (h_i, w_i). No size-divisibility padding is added.
    """
    if not images:
        raise ValueError("cannot batch zero images")
    channels = images[0].shape[0]
    height = max(int(image.shape[-2]) for image in images)
    width = max(int(image.shape[-1]) for image in images)
    first = images[0]
    pixels = first.new_zeros((len(images), channels, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    sizes = torch.empty((len(images), 2), dtype=torch.int64)
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        pixels[i, :, :h, :w].copy_(image)
        mask[i, :h, :w] = False
        sizes[i, 0], sizes[i, 1] = h, w
    return ImageBatch(pixels=pixels, padding_mask=mask, sizes=sizes.to(first.device))


def collate(samples: Sequence[tuple[Tensor, Target]]) -> tuple[ImageBatch, list[Target]]:
    """DataLoader ``collate_fn``: [(pixels [3, h, w], Target), ...] -> (ImageBatch, targets)."""
    images = [pixels for pixels, _ in samples]
    return pad_images(images), [target for _, target in samples]
