# SPDX-License-Identifier: Apache-2.0
"""Multi-scale deformable attention (docs/methods.md#deformable-attention) and its encoder/decoder
wrappers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.ops.ms_deform_attn import ms_deform_attn
from detrkit.structures import EncoderMemory


class MSDeformAttention(nn.Module):
    """Each query attends to ``num_points`` sampled locations per head and level.

    Args:
        dim: width D (divisible by ``num_heads``).
        num_heads: M.
        num_levels: L.
        num_points: P.
    """

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        # Head h starts looking along direction 2*pi*h/M, point p at distance p + 1
        # (docs/methods.md#deformable-attention).
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (
            2.0 * math.pi / self.num_heads
        )
        grid = torch.stack((angles.cos(), angles.sin()), -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start: Tensor,
        padding_mask: Tensor | None,
        level_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> Tensor:
        """Sample ``value`` around ``reference`` for every query.

        Args:
            query: [B, Lq, D], positional embedding already added.
            reference: [B, Lq, L, 2] (x, y) or [B, Lq, L, 4] (cx, cy, w, h), in [0, 1] of each
                level's *padded* map.
            value: [B, S, D] flattened levels.
            spatial_shapes: [L, 2] (H_l, W_l).
            level_start: [L] offsets of the levels in S.
            padding_mask: [B, S] bool, True on padding (those values are zeroed).
            level_shapes: ``spatial_shapes`` as Python pairs (``EncoderMemory.shapes()``), or
                None; the ``grid_sample`` path loops over them (symbolic sizes under export).

        Returns:
            [B, Lq, D].
        """
        batch, num_queries, _ = query.shape
        value = self.value_proj(value)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], self.num_heads, -1)
        shape = (batch, num_queries, self.num_heads, self.num_levels, self.num_points)
        offsets = self.sampling_offsets(query).view(*shape, 2)
        weights = self.attention_weights(query).view(*shape[:3], -1)
        # One softmax over levels and points jointly, per head
        # (docs/methods.md#implementation-notes).
        weights = F.softmax(weights, -1).view(shape)
        locations = sampling_locations(reference, offsets, spatial_shapes, self.num_points)
        out = ms_deform_attn(
            value, spatial_shapes, level_start, locations, weights, level_shapes=level_shapes
        )
        return self.output_proj(out)


def sampling_locations(
    reference: Tensor, offsets: Tensor, spatial_shapes: Tensor, num_points: int
) -> Tensor:
    """reference [B, Lq, L, 2|4] + offsets [B, Lq, M, L, P, 2] -> locations [B, Lq, M, L, P, 2]."""
    if reference.shape[-1] == 2:
        # Offsets are in pixels of each level: x by its width, y by its height
        # (docs/methods.md#implementation-notes).
        normaliser = torch.stack((spatial_shapes[..., 1], spatial_shapes[..., 0]), -1)
        return (
            reference[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        )
    # Box references: offsets scale with half the box size, shared by the P points
    # (docs/methods.md#implementation-notes).
    centre, size = reference[:, :, None, :, None, :2], reference[:, :, None, :, None, 2:]
    return centre + offsets / num_points * size * 0.5


class DeformableCrossAttention(nn.Module):
    """Decoder cross-attention: queries sample the encoder memory around their references."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        self.attn = MSDeformAttention(dim, num_heads, num_levels, num_points)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor | None,
        reference: Tensor,
        memory: EncoderMemory,
        layer_input: Tensor | None = None,
    ) -> Tensor:
        """query, query_pos: [B, Q, D]; reference: [B, Q, 2|4] in valid-image coordinates;
        ``layer_input`` (the decoder layer's input) is unused."""
        ratios = memory.valid_ratios
        if reference.shape[-1] == 4:
            ratios = torch.cat((ratios, ratios), -1)
        # References live in the valid image; sampling happens on each level's padded map.
        reference_input = reference[:, :, None] * ratios[:, None]
        q = query if query_pos is None else query + query_pos
        return self.attn(
            q,
            reference_input,
            memory.tokens,
            memory.spatial_shapes,
            memory.level_start,
            memory.padding_mask,
            memory.shapes(),
        )
