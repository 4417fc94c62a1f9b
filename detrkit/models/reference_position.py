# SPDX-License-Identifier: Apache-2.0
"""Query positions recomputed from the current reference boxes in every decoder layer (DAB-DETR
and DINO's ``ref_point_head``), instead of a constant learned position per query."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from detrkit.layers.ffn import MLP
from detrkit.ops.boxes import at_least_float32

SINE_TEMPERATURE = 10000.0


def box_sine_embedding(boxes: Tensor, num_feats: int) -> Tensor:
    """Sine embedding of each coordinate, concatenated in (y, x, w, h) order.

    Args:
        boxes: [..., 2 | 4] cxcywh (or cxcy) in [0, 1].
        num_feats: features per coordinate (interleaved sin, cos).

    Returns:
        [..., num_feats * boxes.shape[-1]].
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = SINE_TEMPERATURE ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    boxes = at_least_float32(boxes)
    dim_t = dim_t.to(boxes.dtype)
    scaled = boxes[..., None] * (2 * math.pi) / dim_t
    embedded = torch.stack((scaled[..., 0::2].sin(), scaled[..., 1::2].cos()), -1).flatten(-2)
    order = [1, 0, *range(2, boxes.shape[-1])]
    return torch.cat([embedded[..., index, :] for index in order], -1)


class ReferencePositionHead(nn.Module):
    """sine(reference box, scaled by the finest level's valid ratio) -> 2-layer MLP.

    Args:
        dim: width D; the sine embedding has 2 * D features for a 4-d box.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = MLP(2 * dim, dim, dim, 2)

    def forward(self, reference: Tensor, valid_ratios: Tensor) -> Tensor:
        """reference: [B, Q, 4] cxcywh in [0, 1]; valid_ratios: [B, L, 2] (w, h) -> [B, Q, D]."""
        if reference.shape[-1] != 4:
            raise ValueError("query positions from references need 4-d reference boxes")
        scale = torch.cat((valid_ratios[:, 0], valid_ratios[:, 0]), -1)[:, None]
        embedded = box_sine_embedding(reference * scale, self.dim // 2)
        return self.mlp(embedded.to(self.mlp.layers[0].weight.dtype))
