# SPDX-License-Identifier: Apache-2.0
"""Neck: project backbone stages to the transformer width and attach masks and positions."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from detrkit.layers.masks import resize_padding_mask
from detrkit.structures import FeatureLevel

# GroupNorm groups of the Deformable-DETR input projections.
_NUM_GROUPS = 32


class ChannelMapper(nn.Module):
    """1x1 projections of each backbone stage to ``dim`` channels (+ optional GroupNorm).

    Args:
        in_channels: channels of each input stage, in the order the backbone returns them.
        dim: output width D.
        group_norm: follow every projection with GroupNorm(32, D) (Deformable family).
        position: module mapping a padding mask [B, h, w] to an embedding [B, D, h, w].
    """

    def __init__(
        self, in_channels: Sequence[int], dim: int, *, position: nn.Module, group_norm: bool = False
    ) -> None:
        super().__init__()
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), *self._norm(dim, group_norm))
            for c in in_channels
        )
        self.position = position

    @staticmethod
    def _norm(dim: int, group_norm: bool) -> list[nn.Module]:
        return [nn.GroupNorm(_NUM_GROUPS, dim)] if group_norm else []

    def forward(self, features: dict[str, Tensor], padding_mask: Tensor) -> list[FeatureLevel]:
        """features: stage -> [B, C, h, w]; padding_mask: [B, H, W] of the input image."""
        levels = []
        for projection, feature in zip(self.projections, features.values()):
            mask = resize_padding_mask(padding_mask, feature.shape[-2:])
            pos = self.position(mask).to(feature.dtype)
            levels.append(FeatureLevel(projection(feature), mask, pos))
        return levels
