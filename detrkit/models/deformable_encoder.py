# SPDX-License-Identifier: Apache-2.0
"""Deformable DETR's encoder: every token samples a few points around itself on every level."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detrkit.layers.deformable import MSDeformAttention
from detrkit.layers.ffn import FFN
from detrkit.layers.residual import AddNorm
from detrkit.models.encoder import flatten_levels, run_layer
from detrkit.structures import EncoderMemory, FeatureLevel


def encoder_reference_points(
    spatial_shapes: Tensor | Sequence[tuple[int, int]], valid_ratios: Tensor
) -> Tensor:
    """Pixel centres of every token, for sampling on every level.

    Args:
        spatial_shapes: [L, 2] (H_l, W_l), or the same as Python pairs
            (``EncoderMemory.shapes()``, which keep export sizes symbolic).
        valid_ratios: [B, L, 2] (w, h) valid fraction of each level.

    Returns:
        [B, S, L, 2] (x, y): each token's centre in its own level's valid extent, then scaled
        by every level's valid ratio (docs/methods.md#deformable-detr-architecture).
    """
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    points = []
    device = valid_ratios.device
    for level, (height, width) in enumerate(spatial_shapes):
        # arange + 0.5 equals linspace(0.5, n - 0.5, n) exactly, and unlike linspace it keeps a
        # symbolic n symbolic under torch.export (dynamic ONNX height and width).
        ys, xs = torch.meshgrid(
            torch.arange(height, dtype=torch.float32, device=device) + 0.5,
            torch.arange(width, dtype=torch.float32, device=device) + 0.5,
            indexing="ij",
        )
        ys = ys.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
        xs = xs.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((xs, ys), -1))
    reference = torch.cat(points, 1)
    return reference[:, :, None] * valid_ratios[:, None]


class DeformableEncoderLayer(nn.Module):
    """Deformable self-attention + FFN, each followed by residual dropout and LayerNorm.

    Shapes: tokens, pos [B, S, D]; reference [B, S, L, 2] -> [B, S, D].
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        num_levels: int,
        num_points: int,
        dropout: float = 0.1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.self_attn = MSDeformAttention(dim, num_heads, num_levels, num_points)
        self.ffn = FFN(dim, ffn_dim, dropout, activation)
        self.self_attn_norm = AddNorm(dim, dropout)
        self.ffn_norm = AddNorm(dim, dropout)

    def forward(
        self, tokens: Tensor, pos: Tensor, reference: Tensor, memory: EncoderMemory
    ) -> Tensor:
        """tokens, pos: [B, S, D]; reference: [B, S, L, 2] -> [B, S, D]."""
        attend = lambda x: self.self_attn(  # noqa: E731
            x + pos,
            reference,
            x,
            memory.spatial_shapes,
            memory.level_start,
            memory.padding_mask,
            memory.shapes(),
        )
        tokens = self.self_attn_norm(tokens, attend)
        return self.ffn_norm(tokens, self.ffn)


class DeformableEncoder(nn.Module):
    """Flatten the levels, add a learned embedding per level to the positions, run the layers.

    Args:
        layers: encoder layers.
        num_levels: feature levels L.
        dim: width D.
        checkpointing: recompute each layer's activations in the backward pass (training only).
    """

    def __init__(
        self,
        layers: Sequence[DeformableEncoderLayer],
        num_levels: int,
        dim: int,
        checkpointing: bool = False,
    ):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.checkpointing = checkpointing
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        nn.init.normal_(self.level_embed)

    def forward(self, levels: Sequence[FeatureLevel]) -> EncoderMemory:
        """levels: projected feature levels with masks and positions -> encoded memory."""
        memory = flatten_levels(levels)
        sizes = [height * width for height, width in memory.shapes()]
        level_pos = torch.cat([self.level_embed[i].expand(n, -1) for i, n in enumerate(sizes)])
        memory.pos = memory.pos + level_pos[None]
        reference = encoder_reference_points(memory.shapes(), memory.valid_ratios)
        tokens = memory.tokens
        checkpointing = self.checkpointing and self.training
        for layer in self.layers:
            tokens = run_layer(layer, checkpointing, tokens, memory.pos, reference, memory)
        memory.tokens = tokens
        return memory
