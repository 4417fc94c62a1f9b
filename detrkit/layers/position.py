# SPDX-License-Identifier: Apache-2.0
"""2-D positional embeddings of feature maps (docs/methods.md#positional-encoding)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Added to the cumulative-sum denominator by every original implementation.
_NORMALISE_EPS = 1e-6
# The learned variant's table size in DETR (maps wider or taller than this are not supported).
_LEARNED_TABLE_SIZE = 50


class SinePositionEmbedding(nn.Module):
    """Sine/cosine embedding of normalised (y, x) pixel coordinates.

    Output channels are [y | x], each half interleaving sin and cos of the same frequency.

    Args:
        dim: output channels (half for y, half for x).
        temperature: T in T^(2*floor(i/2)/(dim/2)).
        offset: added to the cumulative coordinate before normalising (-0.5 in Deformable DETR).
    """

    def __init__(self, dim: int, temperature: float = 10000.0, offset: float = 0.0) -> None:
        super().__init__()
        self.num_feats = dim // 2
        self.temperature = temperature
        self.offset = offset

    def forward(self, padding_mask: Tensor) -> Tensor:
        """padding_mask: [B, H, W] bool (True = pad) -> [B, dim, H, W] float32."""
        not_mask = ~padding_mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        # Coordinates are relative to each image's own valid extent, so padding never changes them.
        scale = 2 * math.pi
        y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + _NORMALISE_EPS) * scale
        x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + _NORMALISE_EPS) * scale
        dim_t = torch.arange(self.num_feats, dtype=torch.float32, device=padding_mask.device)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class LearnedPositionEmbedding(nn.Module):
    """Learned row/column embeddings, concatenated as [x | y] (DETR's ``learned`` option)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(_LEARNED_TABLE_SIZE, dim // 2)
        self.col_embed = nn.Embedding(_LEARNED_TABLE_SIZE, dim // 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, padding_mask: Tensor) -> Tensor:
        """padding_mask: [B, H, W] bool -> [B, dim, H, W]."""
        batch, height, width = padding_mask.shape
        x_emb = self.col_embed.weight[:width]
        y_emb = self.row_embed.weight[:height]
        grid = torch.cat(
            (x_emb[None].expand(height, -1, -1), y_emb[:, None].expand(-1, width, -1)), dim=-1
        )
        return grid.permute(2, 0, 1)[None].expand(batch, -1, -1, -1)
