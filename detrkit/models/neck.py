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
    """1x1 projections of each backbone stage to ``dim`` channels, plus stride-2 extra levels.

    Args:
        in_channels: channels of each input stage, in the order the backbone returns them.
        dim: output width D.
        position: module mapping a padding mask [B, h, w] to an embedding [B, D, h, w].
        group_norm: follow every projection with GroupNorm(32, D) (Deformable family, whose convs
            also start from Xavier weights and zero bias).
        num_extra_levels: extra levels from 3x3 stride-2 convs; the first reads the *raw* last
            backbone stage, the next ones the previous extra level
            (docs/methods.md#implementation-notes).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        dim: int,
        *,
        position: nn.Module,
        group_norm: bool = False,
        num_extra_levels: int = 0,
    ) -> None:
        super().__init__()

        def norm() -> list[nn.Module]:
            return [nn.GroupNorm(_NUM_GROUPS, dim)] if group_norm else []

        layers = [nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), *norm()) for c in in_channels]
        for index in range(num_extra_levels):
            source = in_channels[-1] if index == 0 else dim
            layers.append(nn.Sequential(nn.Conv2d(source, dim, 3, stride=2, padding=1), *norm()))
        self.projections = nn.ModuleList(layers)
        self.num_inputs = len(in_channels)
        self.position = position
        if group_norm:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        for projection in self.projections:
            nn.init.xavier_uniform_(projection[0].weight)
            nn.init.zeros_(projection[0].bias)

    def forward(self, features: dict[str, Tensor], padding_mask: Tensor) -> list[FeatureLevel]:
        """features: stage -> [B, C, h, w]; padding_mask: [B, H, W] of the input image."""
        maps = list(features.values())
        outputs = [proj(x) for proj, x in zip(self.projections, maps)]
        source = maps[-1]
        for projection in self.projections[self.num_inputs :]:
            source = projection(source)
            outputs.append(source)
        levels = []
        for feature in outputs:
            mask = resize_padding_mask(padding_mask, feature.shape[-2:])
            levels.append(FeatureLevel(feature, mask, self.position(mask).to(feature.dtype)))
        return levels
