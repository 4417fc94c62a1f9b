# SPDX-License-Identifier: Apache-2.0
"""DINO's mixed query selection: the best encoder proposals give the reference boxes, a learned
table the content, and the decoder derives the positions from the references
(docs/methods.md#dino-architecture)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from detrkit.layers.ffn import MLP
from detrkit.models.heads import PRIOR_PROB
from detrkit.models.queries import MAIN_GROUP
from detrkit.models.two_stage import ENCODER_GROUP, score_tokens
from detrkit.structures import (
    EncoderMemory,
    PredictionGroup,
    QueryGroup,
    QuerySet,
    Supervision,
)


def gather_tokens(values: Tensor, index: Tensor) -> Tensor:
    """values [B, S, C], index [B, K] -> [B, K, C]."""
    return torch.gather(values, 1, index[..., None].expand(-1, -1, values.shape[-1]))


class DinoQuerySelector(nn.Module):
    """Rank every encoder token by its best class logit and keep the top K as queries.

    The proposal heads (``class_embed``, ``bbox_embed``) are separate modules, not the decoder
    heads (DINO's ``two_stage_*_share=False``).

    Args:
        dim: width D.
        num_logits: class logits of the proposal head (C: ranking uses the max over classes).
        num_embeddings: rows of the learned content table ``tgt_embed`` (the inference queries
            plus the rows schemes reserve).
        supervision: how the "enc" group of the selected proposals is trained (default:
            class-aware Hungarian matching on their predicted boxes, the decoder's weights).
    """

    def __init__(
        self,
        dim: int,
        num_logits: int,
        num_embeddings: int,
        *,
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__()
        self.supervision = supervision or Supervision()
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim)
        self.class_embed = nn.Linear(dim, num_logits)
        self.bbox_embed = MLP(dim, dim, 4, 3)
        self.tgt_embed = nn.Embedding(num_embeddings, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DINO's transformer Xavier-initialises every matrix, the content table included.
        for weight in (self.enc_output.weight, self.tgt_embed.weight):
            nn.init.xavier_uniform_(weight)
        nn.init.zeros_(self.enc_output.bias)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def rank(self, memory: EncoderMemory, total: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Score every token and pick the best ``total``.

        Returns:
            top [B, K] int64 token indices (best first), logits [B, S, C] of every token,
            box logits [B, S, 4] (inverse-sigmoid cxcywh; +inf on padding and invalid
            anchors) and anchor logits [B, S, 4], all at least float32.
        """
        logits, coords_logit, proposal_logits = score_tokens(self, memory, total)
        # Padding and invalid tokens are ranked too (all alike), as in the original.
        top = torch.topk(logits.max(-1).values, total, dim=1).indices
        return top, logits, coords_logit, proposal_logits

    def forward(
        self, memory: EncoderMemory, num_queries: int, num_extra: int = 0
    ) -> tuple[QuerySet, list[PredictionGroup]]:
        """Select ``num_queries + num_extra`` proposals.

        Returns:
            The queries (content [B, K, D] from ``tgt_embed``, pos None, reference [B, K, 4]
            cxcywh = sigmoid of the detached selected proposal boxes; the first
            ``num_queries`` form group "main") and the "enc" group: logits [1, B, K, C] and
            undetached boxes [1, B, K, 4] cxcywh of the K selected tokens, their anchors
            [1, B, K, 4].
        """
        total = num_queries + num_extra
        if total > self.tgt_embed.num_embeddings:
            raise ValueError(
                f"{total} query slots requested, the table has {self.tgt_embed.num_embeddings}"
            )
        top, logits, coords_logit, proposal_logits = self.rank(memory, total)
        chosen_logits = gather_tokens(logits, top)
        chosen_coords = gather_tokens(coords_logit, top)
        batch = memory.tokens.shape[0]
        content = self.tgt_embed.weight[:total][None].expand(batch, -1, -1)
        main = QueryGroup(MAIN_GROUP, 0, num_queries, at_inference=True)
        # The selected boxes become fixed starting references: no gradient through them.
        queries = QuerySet(
            content=content, pos=None, reference=chosen_coords.detach().sigmoid(), groups=(main,)
        )
        encoder_group = PredictionGroup(
            ENCODER_GROUP,
            chosen_logits[None],
            chosen_coords.sigmoid()[None],
            supervision=self.supervision,
            anchors=gather_tokens(proposal_logits, top).sigmoid()[None],
        )
        return queries, [encoder_group]
