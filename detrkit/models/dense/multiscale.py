# SPDX-License-Identifier: Apache-2.0
"""The multi-scale maps Co-DETR's dense auxiliary heads run on (its ``x_enc``): the encoder
memory reshaped level by level, plus one extra level, a 3x3 stride-2 convolution + GroupNorm
of the last one (``query_head.downsample`` in the official checkpoints)."""

from __future__ import annotations

from torch import Tensor, nn

from detrkit.models.dense.atss import memory_maps


class MemoryPyramid(nn.Module):
    """Encoder tokens -> per-level maps [B, D, h_l, w_l], the downsampled level last.

    Args:
        dim: width D of the memory.
        num_groups: GroupNorm groups of the extra level.
    """

    def __init__(self, dim: int, num_groups: int = 32) -> None:
        super().__init__()
        # Sequential so the official ``downsample.{0,1}`` keys map by a prefix rename.
        self.downsample = nn.Sequential(
            nn.Conv2d(dim, dim, 3, stride=2, padding=1), nn.GroupNorm(num_groups, dim)
        )

    def forward(self, tokens: Tensor, spatial_shapes: Tensor) -> list[Tensor]:
        """tokens [B, S, D] (levels concatenated, row-major), spatial_shapes [L, 2] ->
        L + 1 maps [B, D, h, w]."""
        maps = memory_maps(tokens, spatial_shapes)
        return maps + [self.downsample(maps[-1])]
