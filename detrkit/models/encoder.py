# SPDX-License-Identifier: Apache-2.0
"""Transformer encoders over flattened feature levels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from detrkit.layers.attention import SelfAttention
from detrkit.layers.ffn import FFN
from detrkit.layers.residual import AddNorm
from detrkit.structures import EncoderMemory, FeatureLevel


def flatten_levels(levels: Sequence[FeatureLevel]) -> EncoderMemory:
    """Concatenate levels row-major into an ``EncoderMemory`` (tokens = projected features)."""
    tokens = torch.cat([lvl.features.flatten(2).transpose(1, 2) for lvl in levels], dim=1)
    pos = torch.cat([lvl.pos.flatten(2).transpose(1, 2) for lvl in levels], dim=1)
    mask = torch.cat([lvl.padding_mask.flatten(1) for lvl in levels], dim=1)
    shapes = torch.tensor([lvl.features.shape[-2:] for lvl in levels], device=tokens.device)
    level_start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
    valid_ratios = torch.stack([valid_ratio(lvl.padding_mask) for lvl in levels], dim=1)
    level_shapes = tuple((lvl.features.shape[-2], lvl.features.shape[-1]) for lvl in levels)
    return EncoderMemory(
        tokens, mask, pos, shapes, level_start, valid_ratios, level_shapes=level_shapes
    )


def valid_ratio(padding_mask: Tensor) -> Tensor:
    """[B, H, W] bool -> [B, 2] (w, h) valid fraction: columns of row 0, rows of column 0."""
    _, height, width = padding_mask.shape
    valid_h = (~padding_mask[:, :, 0]).sum(1)
    valid_w = (~padding_mask[:, 0, :]).sum(1)
    return torch.stack((valid_w.float() / width, valid_h.float() / height), dim=-1)


def run_layer(layer: nn.Module, checkpointing: bool, *args):
    """``layer(*args)``, under gradient checkpointing when asked and gradients are recorded.

    Non-reentrant checkpointing accepts any arguments and outputs (dataclasses, dicts) and
    replays dropout with the same random state, so results and gradients are unchanged.
    """
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class EncoderLayer(nn.Module):
    """Global self-attention + FFN, each with residual dropout and LayerNorm (post- or pre-norm).

    Shapes: tokens, pos [B, S, D]; padding_mask [B, S] -> [B, S, D].
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        *,
        dropout: float = 0.1,
        activation: str = "relu",
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads, dropout)
        self.ffn = FFN(dim, ffn_dim, dropout, activation)
        self.self_attn_norm = AddNorm(dim, dropout, pre_norm=pre_norm)
        self.ffn_norm = AddNorm(dim, dropout, pre_norm=pre_norm)
        self.pre_norm = pre_norm

    def forward(self, tokens: Tensor, pos: Tensor, padding_mask: Tensor) -> Tensor:
        """tokens, pos: [B, S, D]; padding_mask: [B, S] -> [B, S, D]."""
        attend = lambda x: self.self_attn(x, pos, key_padding_mask=padding_mask)  # noqa: E731
        tokens = self.self_attn_norm(tokens, attend)
        return self.ffn_norm(tokens, self.ffn)


class DetrEncoder(nn.Module):
    """DETR's encoder: global self-attention over the flattened tokens of every level.

    Args:
        layers: the encoder layers.
        final_norm: LayerNorm applied to the output (pre-norm models), or None.
        checkpointing: recompute each layer's activations in the backward pass (training only).
    """

    def __init__(
        self,
        layers: Sequence[EncoderLayer],
        final_norm: nn.Module | None = None,
        checkpointing: bool = False,
    ):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.final_norm = final_norm
        self.checkpointing = checkpointing

    def forward(self, levels: Sequence[FeatureLevel]) -> EncoderMemory:
        """levels: projected feature levels with masks and positions -> encoded memory."""
        memory = flatten_levels(levels)
        tokens = memory.tokens
        for layer in self.layers:
            tokens = run_layer(
                layer, self.checkpointing and self.training, tokens, memory.pos, memory.padding_mask
            )
        if self.final_norm is not None:
            tokens = self.final_norm(tokens)
        memory.tokens = tokens
        return memory
