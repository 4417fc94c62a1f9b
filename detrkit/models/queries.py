# SPDX-License-Identifier: Apache-2.0
"""Query initialisers: turn encoder memory into the decoder's ``QuerySet``."""

from __future__ import annotations

from torch import nn

from detrkit.structures import EncoderMemory, QueryGroup, QuerySet

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

    def forward(self, memory: EncoderMemory, num_queries: int, num_extra: int = 0) -> QuerySet:
        """Return ``num_queries + num_extra`` slots; the first ``num_queries`` form group "main"."""
        batch = memory.tokens.shape[0]
        total = num_queries + num_extra
        if total > self.query_embed.num_embeddings:
            raise ValueError(
                f"{total} query slots requested, table has {self.query_embed.num_embeddings}"
            )
        pos = self.query_embed.weight[:total][None].expand(batch, -1, -1)
        content = pos.new_zeros(pos.shape)
        main = QueryGroup(MAIN_GROUP, 0, num_queries, assigner="hungarian", at_inference=True)
        return QuerySet(content=content, pos=pos, reference=None, groups=(main,))
