# SPDX-License-Identifier: Apache-2.0
"""H-DETR hybrid matching: an extra one-to-many query group against K-repeated targets
(docs/methods.md#h-detr)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from detrkit.errors import UserError
from detrkit.schemes.base import TrainingScheme
from detrkit.schemes.registry import SchemeContext, SchemeSpec, register_scheme
from detrkit.structures import EncoderMemory, QueryGroup, QuerySet, Supervision, Target

O2M_GROUP = "o2m"


@dataclass(frozen=True)
class HybridConfig:
    """``model.schemes.hybrid``: H-DETR hybrid matching.

    Attributes:
        num_queries: extra one-to-many query slots in training (``--num_queries_one2many``).
        repeat_k: times each ground-truth box is repeated for them (``--k_one2many``).
        loss_weight: multiplies the group's loss terms (``--lambda_one2many``; the original
            reports the terms multiplied, with the one-to-one weights).
    """

    num_queries: int = 1500
    repeat_k: int = 6
    loss_weight: float = 1.0


def isolate(
    mask: torch.Tensor | None, start: int, stop: int, total: int, device: torch.device
) -> torch.Tensor:
    """Block attention between slots [start, stop) and every other slot (True = blocked);
    ``mask`` may be [Q, Q] or per image [B, Q, Q]."""
    inside = torch.zeros(total, dtype=torch.bool, device=device)
    inside[start:stop] = True
    blocked = inside[:, None] ^ inside[None, :]
    return blocked if mask is None else mask | blocked


class HybridMatching(TrainingScheme):
    """Decode ``num_queries`` extra queries trained one-to-many: every ground-truth box is
    repeated ``repeat_k`` times, so Hungarian matching gives each box up to k queries.

    Args:
        num_queries: one-to-many query slots (``--num_queries_one2many``).
        repeat_k: repeats of the targets (``--k_one2many``).
        loss_weight: multiplies the group's terms (``--lambda_one2many``).
    """

    def __init__(self, num_queries: int = 1500, repeat_k: int = 6, loss_weight: float = 1.0):
        super().__init__()
        self.extra_queries = num_queries
        self.supervision = Supervision(scale=loss_weight, target_repeat=repeat_k)

    def extend_queries(
        self,
        queries: QuerySet,
        memory: EncoderMemory,
        targets: list[Target] | None,
        slots: range,
    ) -> QuerySet:
        """Label ``slots`` as group "o2m" and hide them from every other query."""
        group = QueryGroup(O2M_GROUP, slots.start, slots.stop, supervision=self.supervision)
        mask = isolate(
            queries.self_attn_mask,
            slots.start,
            slots.stop,
            queries.num_queries,
            queries.content.device,
        )
        return replace(queries, groups=queries.groups + (group,), self_attn_mask=mask)


def build(context: SchemeContext, options: HybridConfig) -> HybridMatching:
    return HybridMatching(options.num_queries, options.repeat_k, options.loss_weight)


def check(model, options: HybridConfig) -> None:
    if options.num_queries < 1 or options.repeat_k < 1:
        raise UserError(
            "model.schemes.hybrid.num_queries and repeat_k must be at least 1 "
            "(remove model.schemes.hybrid to turn hybrid matching off)"
        )
    if model.smca.query_mixture:
        raise UserError(
            "model.smca.query_mixture splits the inference queries into an unmodulated and a "
            "modulated half; the hybrid one-to-many queries (model.schemes.hybrid) have no such "
            "split: turn one of them off"
        )


register_scheme(SchemeSpec("hybrid", HybridConfig, build, check, family="H-DETR"))
