# SPDX-License-Identifier: Apache-2.0
"""Multi-scale SMCA's encoder (docs/methods.md#smca-detr-multi-scale): convolutions within and
across feature levels, no
attention, then the finest level is downsampled to the next stride for the decoder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.layers.ffn import FFN
from detrkit.layers.residual import AddNorm
from detrkit.models.encoder import flatten_levels
from detrkit.structures import EncoderMemory, FeatureLevel


def depthwise(dim: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """A k x k convolution per channel, padded to keep (stride 1) or halve (stride 2) the size."""
    return nn.Conv2d(dim, dim, kernel_size, stride, kernel_size // 2, groups=dim)


class SmcaConvEncoderLayer(nn.Module):
    """One layer: every level mixes with itself (a depthwise convolution) and with its two
    neighbours (a strided depthwise convolution of the finer one, an upsampled depthwise
    convolution of the coarser one), then an FFN; post-norm residuals as in DETR.

    Args:
        dim: width D.
        ffn_dim: hidden width of the FFN.
        num_levels: feature levels L.
        kernel_size: of the depthwise convolutions (5 or 7 in the originals).
        shared_cross_scale: one down- and one up-convolution for every level pair instead of
            one per pair.
        dropout: residual and FFN dropout.
        activation: FFN activation.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_levels: int,
        kernel_size: int = 5,
        *,
        shared_cross_scale: bool = False,
        dropout: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        num_cross = 1 if shared_cross_scale else num_levels - 1
        self.input_proj = nn.Conv2d(dim, dim, 1)
        self.level_convs = nn.ModuleList(depthwise(dim, kernel_size) for _ in range(num_levels))
        self.down_convs = nn.ModuleList(depthwise(dim, kernel_size, 2) for _ in range(num_cross))
        self.up_convs = nn.ModuleList(depthwise(dim, kernel_size) for _ in range(num_cross))
        self.output_proj = nn.Conv2d(dim, dim, 1)
        self.mix_norm = AddNorm(dim, dropout)
        self.ffn = FFN(dim, ffn_dim, dropout, activation)
        self.ffn_norm = AddNorm(dim, dropout)

    def forward(self, maps: Sequence[Tensor], pos: Sequence[Tensor]) -> list[Tensor]:
        """maps, pos: per level [B, D, H_l, W_l] (finest first) -> the updated maps."""
        mixed = [conv(self.input_proj(x + p)) for conv, x, p in zip(self.level_convs, maps, pos)]
        outputs = []
        for level, x in enumerate(maps):
            total = mixed[level]
            if level > 0:
                total = total + self._pick(self.down_convs, level - 1)(mixed[level - 1])
            if level + 1 < len(maps):
                coarser = self._pick(self.up_convs, level)(mixed[level + 1])
                # F.upsample_bilinear in the original: bilinear with aligned corners.
                total = total + F.interpolate(
                    coarser, size=x.shape[-2:], mode="bilinear", align_corners=True
                )
            outputs.append(self._residuals(x, self.output_proj(total)))
        return outputs

    def _residuals(self, x: Tensor, mixed: Tensor) -> Tensor:
        """x, mixed [B, D, H, W] -> mixing residual + norm, FFN residual + norm -> [B, D, H, W].

        The norms run over the channels, so both residuals work on [B, H*W, D] tokens; the
        mixing update depends on every level, hence ``add`` with the precomputed update.
        """
        tokens = self.mix_norm.add(_tokens(x), _tokens(mixed))
        tokens = self.ffn_norm(tokens, self.ffn)
        return tokens.transpose(1, 2).reshape(x.shape)

    @staticmethod
    def _pick(convs: nn.ModuleList, pair: int) -> nn.Module:
        return convs[pair if len(convs) > 1 else 0]


def _tokens(maps: Tensor) -> Tensor:
    """[B, D, H, W] -> [B, H*W, D]."""
    return maps.flatten(2).transpose(1, 2)


class SmcaConvEncoder(nn.Module):
    """Runs the layers over every level, then hands the decoder the finest level downsampled
    to the next level's stride (with that level's positions and mask) followed by the others.

    Args:
        layers: encoder layers.
        num_levels: feature levels L.
        dim: width D.
    """

    def __init__(self, layers: Sequence[SmcaConvEncoderLayer], num_levels: int, dim: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        self.downsample = nn.Conv2d(dim, dim, 3, stride=2, padding=1)
        nn.init.normal_(self.level_embed)

    def forward(self, levels: Sequence[FeatureLevel]) -> EncoderMemory:
        """levels: projected feature levels with masks and positions -> the decoder's memory
        (L levels: the downsampled finest one, then levels 1..L-1)."""
        pos = [lvl.pos + embed[None, :, None, None] for lvl, embed in zip(levels, self.level_embed)]
        maps = [lvl.features for lvl in levels]
        for layer in self.layers:
            maps = layer(maps, pos)
        encoded = [replace(lvl, features=x, pos=p) for lvl, x, p in zip(levels, maps, pos)]
        # The downsampled finest level reuses the next level's positions and mask.
        first = replace(encoded[1], features=self.downsample(maps[0]))
        return flatten_levels([first, *encoded[1:]])
