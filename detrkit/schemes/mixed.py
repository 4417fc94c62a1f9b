# SPDX-License-Identifier: Apache-2.0
"""MS-DETR mixed supervision: one-to-many supervision of the primary queries
(docs/methods.md#ms-detr)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from detrkit.layers.ffn import FFN
from detrkit.layers.residual import AddNorm
from detrkit.schemes.base import TrainingScheme
from detrkit.structures import DecoderOutput, PredictionGroup, QuerySet

MIXED_GROUP = "ms_o2m"
TAP = "cross_attn"


class AuxiliaryFFN(nn.Module):
    """A second FFN block (residual + LayerNorm) on the tapped hidden state of one layer."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.ffn = FFN(dim, ffn_dim, dropout)
        self.norm = AddNorm(dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, Q, D] -> [B, Q, D]."""
        return self.norm(x, self.ffn)


class MixedSupervision(TrainingScheme):
    """Predict again from the inference queries' decoder states and supervise those predictions
    one-to-many with the quality assigner (no extra queries).

    The root implementation reads each layer's state right after cross-attention (the decoder
    must run cross-attention first and tap it), optionally through an auxiliary FFN, and predicts
    with the detection head. Implementation (a) reads the layer outputs themselves and predicts
    with its own class heads (copies of the head's, taken after initialisation) and the shared
    box heads.

    Args:
        dim, ffn_dim, dropout: shape of the auxiliary FFNs.
        num_layers: decoder layers.
        predict_from: "cross_attn" (the tap, root) or "layer_output" (implementation (a)).
        aux_ffn: use an auxiliary FFN per layer (``--use_aux_ffn``).
        class_heads: separate class predictors for the one-to-many predictions, or None to use
            the detection head's.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_layers: int,
        dropout: float,
        *,
        predict_from: Literal["cross_attn", "layer_output"] = "cross_attn",
        aux_ffn: bool = True,
        class_heads: nn.ModuleList | None = None,
    ) -> None:
        super().__init__()
        self.predict_from = predict_from
        self.tap_points = (TAP,) if predict_from == "cross_attn" else ()
        self.aux_ffn = (
            nn.ModuleList(AuxiliaryFFN(dim, ffn_dim, dropout) for _ in range(num_layers))
            if aux_ffn
            else None
        )
        self.class_heads = class_heads

    def tap_groups(
        self, decoded: DecoderOutput, queries: QuerySet, head: nn.Module
    ) -> list[PredictionGroup]:
        main = next(g for g in queries.groups if g.at_inference)
        states = decoded.taps[TAP] if self.predict_from == "cross_attn" else decoded.hidden
        states = states[:, :, main.start : main.stop]
        if self.aux_ffn is not None:
            states = torch.stack([ffn(layer) for ffn, layer in zip(self.aux_ffn, states)])
        references = None
        if decoded.references is not None:
            references = tuple(r[:, main.start : main.stop] for r in decoded.references)
        logits, boxes = head.predict(states, references, class_embed=self.class_heads)
        return [PredictionGroup(MIXED_GROUP, logits, boxes, assigner="topk_quality")]
