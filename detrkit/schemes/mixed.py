# SPDX-License-Identifier: Apache-2.0
"""MS-DETR mixed supervision: one-to-many supervision of the primary queries (spec C4.1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.layers.ffn import FFN
from detrkit.schemes.base import TrainingScheme
from detrkit.structures import DecoderOutput, PredictionGroup, QuerySet

MIXED_GROUP = "ms_o2m"
TAP = "cross_attn"


class AuxiliaryFFN(nn.Module):
    """A second FFN block (residual + LayerNorm) on the tapped hidden state of one layer."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.ffn = FFN(dim, ffn_dim, dropout)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, Q, D] -> [B, Q, D]."""
        return self.norm(x + self.dropout(self.ffn(x)))


class MixedSupervision(TrainingScheme):
    """Predict again from each decoder layer's state right after cross-attention (optionally
    through an auxiliary FFN) with the shared heads, and supervise those predictions one-to-many
    with the quality assigner. Needs the decoder to run cross-attention first and tap it.

    Args:
        dim, ffn_dim, dropout: shape of the auxiliary FFNs.
        num_layers: decoder layers.
        aux_ffn: use an auxiliary FFN per layer (``--use_aux_ffn``).
    """

    tap_points = (TAP,)

    def __init__(
        self, dim: int, ffn_dim: int, num_layers: int, dropout: float, *, aux_ffn: bool = True
    ) -> None:
        super().__init__()
        self.aux_ffn = (
            nn.ModuleList(AuxiliaryFFN(dim, ffn_dim, dropout) for _ in range(num_layers))
            if aux_ffn
            else None
        )

    def tap_groups(
        self, decoded: DecoderOutput, queries: QuerySet, head: nn.Module
    ) -> list[PredictionGroup]:
        main = next(g for g in queries.groups if g.at_inference)
        tapped = decoded.taps[TAP][:, :, main.start : main.stop]
        if self.aux_ffn is not None:
            tapped = torch.stack([ffn(layer) for ffn, layer in zip(self.aux_ffn, tapped)])
        references = None
        if decoded.references is not None:
            references = tuple(r[:, main.start : main.stop] for r in decoded.references)
        logits, boxes = head.predict(tapped, references)
        return [PredictionGroup(MIXED_GROUP, logits, boxes, assigner="topk_quality")]
