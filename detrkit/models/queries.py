# SPDX-License-Identifier: Apache-2.0
"""Query initialisers: turn encoder memory into the decoder's ``QuerySet``."""

from __future__ import annotations

from torch import nn

from detrkit.structures import EncoderMemory, PredictionGroup, QueryGroup, QuerySet

MAIN_GROUP = "main"


class LearnedQueries(nn.Module):
    """DETR's queries: zero content and a learned positional embedding per slot.

    Args:
        num_embeddings: rows of the learned table (inference queries + any extra training slots).
        dim: width D.
    """

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.query_embed = nn.Embedding(num_embeddings, dim)

    def forward(
        self, memory: EncoderMemory, num_queries: int, num_extra: int = 0
    ) -> tuple[QuerySet, list[PredictionGroup]]:
        """Return ``num_queries + num_extra`` slots (the first ``num_queries`` form group "main")
        and no extra prediction groups."""
        batch = memory.tokens.shape[0]
        total = _check_slots(num_queries + num_extra, self.query_embed.num_embeddings)
        pos = self.query_embed.weight[:total][None].expand(batch, -1, -1)
        content = pos.new_zeros(pos.shape)
        main = QueryGroup(MAIN_GROUP, 0, num_queries, at_inference=True)
        return QuerySet(content=content, pos=pos, reference=None, groups=(main,)), []


class LearnedQueriesWithReference(nn.Module):
    """Deformable DETR's queries: a learned (position, content) pair per slot; reference points
    predicted from the position.

    Args:
        num_embeddings: rows of the table (inference queries + extra training slots).
        dim: width D; the table holds 2 * D columns, position first.
    """

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.query_embed = nn.Embedding(num_embeddings, 2 * dim)
        self.reference_points = nn.Linear(dim, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)

    def forward(
        self, memory: EncoderMemory, num_queries: int, num_extra: int = 0
    ) -> tuple[QuerySet, list[PredictionGroup]]:
        """``num_queries + num_extra`` slots with 2-d references (not detached,
        docs/methods.md#implementation-notes)."""
        total = _check_slots(num_queries + num_extra, self.query_embed.num_embeddings)
        batch = memory.tokens.shape[0]
        pos, content = self.query_embed.weight[:total].split(self.reference_points.in_features, 1)
        pos, content = pos[None].expand(batch, -1, -1), content[None].expand(batch, -1, -1)
        main = QueryGroup(MAIN_GROUP, 0, num_queries, at_inference=True)
        reference = self.reference_points(pos).float().sigmoid()
        return QuerySet(content=content, pos=pos, reference=reference, groups=(main,)), []


def _check_slots(total: int, available: int) -> int:
    if total > available:
        raise ValueError(f"{total} query slots requested, the table has {available}")
    return total
