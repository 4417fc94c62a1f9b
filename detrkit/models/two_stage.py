# SPDX-License-Identifier: Apache-2.0
"""Two-stage query selection: encoder tokens propose boxes, the best become the queries."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from detrkit.layers.ffn import MLP
from detrkit.models.heads import PRIOR_PROB
from detrkit.models.queries import MAIN_GROUP
from detrkit.ops.boxes import at_least_float32
from detrkit.structures import (
    EncoderMemory,
    PredictionGroup,
    QueryGroup,
    QuerySet,
    Supervision,
)

# Proposal sizes are 0.05 * 2^level of the valid image
# (docs/methods.md#deformable-detr-architecture).
BASE_PROPOSAL_SIZE = 0.05
# Proposals touching the border band are invalid (docs/methods.md#implementation-notes).
PROPOSAL_BORDER = 0.01
ENCODER_GROUP = "enc"


def encoder_proposals(memory: EncoderMemory) -> tuple[Tensor, Tensor]:
    """One anchor box per token and which anchors are usable.

    Returns:
        proposal_logits [B, S, 4]: inverse sigmoid of (cx, cy, w, h), +inf on padding and
        invalid anchors; valid [B, S, 1] bool.
    """
    batch = memory.tokens.shape[0]
    proposals = []
    for level, ((height, width), start) in enumerate(zip(memory.shapes(), memory.level_starts())):
        mask = memory.padding_mask[:, start : start + height * width].view(batch, height, width)
        valid_h, valid_w = (~mask[:, :, 0]).sum(1), (~mask[:, 0, :]).sum(1)
        # arange equals linspace(0, n - 1, n) exactly and stays symbolic under torch.export.
        grid_y, grid_x = torch.meshgrid(
            torch.arange(height, dtype=torch.float32, device=mask.device),
            torch.arange(width, dtype=torch.float32, device=mask.device),
            indexing="ij",
        )
        grid = torch.stack((grid_x, grid_y), -1)
        scale = torch.stack((valid_w, valid_h), -1).view(batch, 1, 1, 2)
        centres = (grid[None].expand(batch, -1, -1, -1) + 0.5) / scale
        sizes = torch.ones_like(centres) * BASE_PROPOSAL_SIZE * (2.0**level)
        proposals.append(torch.cat((centres, sizes), -1).view(batch, -1, 4))
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > PROPOSAL_BORDER) & (proposals < 1 - PROPOSAL_BORDER)).all(
        -1, keepdim=True
    )
    # A plain logit: the proposals are clamped by construction, unlike inverse_sigmoid's inputs.
    logits = torch.log(proposals / (1 - proposals))
    logits = logits.masked_fill(memory.padding_mask[..., None], float("inf"))
    return logits.masked_fill(~valid, float("inf")), valid


def proposal_sine_embedding(proposal_logits: Tensor, dim: int) -> Tensor:
    """[B, K, 4] proposal logits -> [B, K, 4 * dim / 2]: sine embedding of (cx, cy, w, h)."""
    num_feats = dim // 2
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=proposal_logits.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
    scaled = proposal_logits.sigmoid() * (2 * math.pi)
    pos = scaled[:, :, :, None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4).flatten(2)


def score_tokens(heads: nn.Module, memory: EncoderMemory, total: int) -> tuple[Tensor, ...]:
    """Every encoder token as a proposal, scored by ``heads`` (its ``enc_output``,
    ``enc_output_norm``, ``class_embed`` and ``bbox_embed``), for a selection of ``total``.

    Returns:
        logits [B, S, C], box logits [B, S, 4] (inverse-sigmoid cxcywh; +inf on padding and
        invalid anchors) and anchor logits [B, S, 4], all at least float32.
    """
    if total > memory.tokens.shape[1]:
        raise ValueError(
            f"query selection needs {total} proposals but the images give only "
            f"{memory.tokens.shape[1]} encoder tokens; use larger images or fewer queries"
        )
    proposal_logits, valid = encoder_proposals(memory)
    hidden = memory.tokens.masked_fill(memory.padding_mask[..., None], 0.0)
    hidden = heads.enc_output_norm(heads.enc_output(hidden.masked_fill(~valid, 0.0)))
    # Ranking and box arithmetic in float32 even under autocast: bf16 ties many scores.
    logits = at_least_float32(heads.class_embed(hidden))
    proposal_logits = proposal_logits.to(logits.dtype)
    coords_logit = at_least_float32(heads.bbox_embed(hidden)) + proposal_logits
    return logits, coords_logit, proposal_logits


class TwoStageQuerySelector(nn.Module):
    """Score every encoder token as a class-agnostic proposal and keep the top-k as queries.

    Args:
        dim: width D.
        num_logits: class logits of the proposal head (only logit 0, "foreground", ranks).
        mixed_selection: learned content queries with proposal positions (H-DETR, DINO).
        num_embeddings: rows of the learned content table (mixed selection only).
        supervision: how the "enc" proposal group is trained (class-agnostic Hungarian).
    """

    def __init__(
        self,
        dim: int,
        num_logits: int,
        *,
        mixed_selection: bool = False,
        num_embeddings: int = 0,
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__()
        self.supervision = supervision or Supervision(class_agnostic=True)
        self.enc_output = nn.Linear(dim, dim)
        self.enc_output_norm = nn.LayerNorm(dim)
        self.pos_trans = nn.Linear(2 * dim, 2 * dim)
        self.pos_trans_norm = nn.LayerNorm(2 * dim)
        self.class_embed = nn.Linear(dim, num_logits)
        self.bbox_embed = MLP(dim, dim, 4, 3)
        self.query_embed = nn.Embedding(num_embeddings, dim) if mixed_selection else None
        self.dim = dim
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.enc_output, self.pos_trans):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def rank(self, memory: EncoderMemory, total: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Score every token by its first ("foreground") logit and pick the best ``total``.

        Returns:
            top [B, K] int64 token indices (best first), logits [B, S, C] of every token,
            box logits [B, S, 4] (inverse-sigmoid cxcywh; +inf on padding and invalid
            anchors) and anchor logits [B, S, 4], all at least float32.
        """
        logits, coords_logit, proposal_logits = score_tokens(self, memory, total)
        top = torch.topk(logits[..., 0], total, dim=1)[1]
        return top, logits, coords_logit, proposal_logits

    def forward(
        self, memory: EncoderMemory, num_queries: int, num_extra: int = 0
    ) -> tuple[QuerySet, list[PredictionGroup]]:
        """Top ``num_queries + num_extra`` proposals; also the "enc" prediction group."""
        total = num_queries + num_extra
        top, logits, coords_logit, proposal_logits = self.rank(memory, total)
        # The selected boxes become fixed starting references: no gradient through the ranking.
        chosen = torch.gather(coords_logit, 1, top[..., None].expand(-1, -1, 4)).detach()
        embedding = self.pos_trans_norm(self.pos_trans(proposal_sine_embedding(chosen, self.dim)))
        pos, content = embedding.split(self.dim, dim=2)
        if self.query_embed is not None:
            content = self.query_embed.weight[:total][None].expand(pos.shape[0], -1, -1)
        main = QueryGroup(MAIN_GROUP, 0, num_queries, at_inference=True)
        queries = QuerySet(content=content, pos=pos, reference=chosen.sigmoid(), groups=(main,))
        encoder_group = PredictionGroup(
            ENCODER_GROUP,
            logits[None],
            coords_logit.sigmoid()[None],
            supervision=self.supervision,
            anchors=proposal_logits.sigmoid()[None],
        )
        return queries, [encoder_group]
