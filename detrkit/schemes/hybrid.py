# SPDX-License-Identifier: Apache-2.0
"""H-DETR hybrid matching: an extra one-to-many query group against K-repeated targets."""

from __future__ import annotations

from dataclasses import replace

import torch

from detrkit.schemes.base import TrainingScheme
from detrkit.structures import EncoderMemory, QueryGroup, QuerySet, Target

O2M_GROUP = "o2m"


def isolate(
    mask: torch.Tensor | None, start: int, stop: int, total: int, device: torch.device
) -> torch.Tensor:
    """Block attention between slots [start, stop) and every other slot (True = blocked)."""
    inside = torch.zeros(total, dtype=torch.bool, device=device)
    inside[start:stop] = True
    blocked = inside[:, None] ^ inside[None, :]
    return blocked if mask is None else mask | blocked


class HybridMatching(TrainingScheme):
    """Decode ``num_queries`` extra queries trained one-to-many: every ground-truth box is
    repeated ``repeat_k`` times, so Hungarian matching gives each box up to k queries
    (docs/methods.md#h-detr).

    Args:
        num_queries: one-to-many query slots (``--num_queries_one2many``).
        repeat_k: repeats of the targets (``--k_one2many``).
        loss_weight: weight of the group's losses (``--lambda_one2many``).
    """

    def __init__(self, num_queries: int = 1500, repeat_k: int = 6, loss_weight: float = 1.0):
        super().__init__()
        self.extra_queries, self.repeat_k, self.loss_weight = num_queries, repeat_k, loss_weight

    def extend_queries(
        self, queries: QuerySet, memory: EncoderMemory, targets: list[Target] | None
    ) -> QuerySet:
        """Label the next ``num_queries`` slots as group "o2m" and hide them from the others."""
        start = max(group.stop for group in queries.groups)
        stop = start + self.extra_queries
        group = QueryGroup(
            O2M_GROUP,
            start,
            stop,
            assigner="hungarian",
            loss_weight=self.loss_weight,
            target_repeat=self.repeat_k,
        )
        mask = isolate(
            queries.self_attn_mask, start, stop, queries.num_queries, queries.content.device
        )
        return replace(queries, groups=queries.groups + (group,), self_attn_mask=mask)
