# SPDX-License-Identifier: Apache-2.0
"""Padding masks at other resolutions."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def resize_padding_mask(padding_mask: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, H, W] bool -> [B, h, w] bool by nearest-neighbour interpolation (as every original)."""
    return F.interpolate(padding_mask[None].float(), size=size).to(bool)[0]
