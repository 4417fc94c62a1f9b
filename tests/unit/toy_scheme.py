# SPDX-License-Identifier: Apache-2.0
"""A test-only training scheme written as a user would write one: this file alone, registered
from the test, with no edit anywhere in detrkit. It exercises every extension point: appended
queries with per-image valid masks and fixed explicit targets, a dense loss over the encoder
memory, and an extra decoder pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from detrkit.errors import UserError
from detrkit.schemes.base import AuxiliaryResult, TrainingScheme
from detrkit.schemes.registry import SchemeSpec, register_scheme
from detrkit.structures import (
    DenseLoss,
    FixedAssignment,
    QueryGroup,
    QuerySet,
    Supervision,
    Target,
)

NAME = "toy"


@dataclass(frozen=True)
class ToyConfig:
    """``model.schemes.toy``: one query per ground-truth box (up to ``max_queries``)."""

    max_queries: int = 3
    dense_weight: float = 0.5
    box_weight: float = 3.0


class ToyScheme(TrainingScheme):
    """Per image, one query sitting on each ground-truth box, padded to ``max_queries``; the
    padding is masked. A second copy of them is decoded in its own pass."""

    def __init__(self, dim: int, options: ToyConfig) -> None:
        super().__init__()
        self.options = options
        self.content = nn.Embedding(options.max_queries, dim)
        self.dense_head = nn.Linear(dim, 1)

    def _span(self, targets: list[Target], name: str):
        batch, count = len(targets), self.options.max_queries
        valid = torch.zeros(batch, count, dtype=torch.bool)
        reference = torch.full((batch, count, 4), 0.5)
        pairs, explicit = [], []
        for image, target in enumerate(targets):
            kept = min(len(target), count)
            valid[image, :kept] = True
            reference[image, :kept] = target.boxes[:kept].clamp(0.05, 0.95)
            pairs.append((torch.arange(kept), torch.arange(kept)))
            # explicit targets: the image's boxes, all relabelled 0
            explicit.append(Target(torch.zeros(kept, dtype=torch.int64), target.boxes[:kept]))
        weights = {"cls": 1.0, "l1": self.options.box_weight, "giou": 1.0}
        supervision = Supervision(
            FixedAssignment(tuple(pairs), tuple(explicit)), term_weights=weights
        )
        group = QueryGroup(name, 0, 0, supervision=supervision, valid=valid)
        content = self.content.weight[None].expand(batch, -1, -1)
        return group, content, reference.to(content.device)

    def extend_queries(self, queries, memory, targets, slots):
        group, content, reference = self._span(targets, NAME)
        pos = content if queries.pos is not None else None
        return queries.append(group, content, pos=pos, reference=reference)

    def auxiliary(self, memory, targets):
        group, content, reference = self._span(targets, f"{NAME}_pass")
        start = QuerySet(content[:, :0], content[:, :0], reference[:, :0], ())
        own_pass = start.append(group, content, pos=content, reference=reference)
        dense = DenseLoss(
            "toy/dense",
            lambda x: (x**2).sum(),
            (self.dense_head(memory.tokens),),
            weight=self.options.dense_weight,
        )
        return AuxiliaryResult(dense_losses=[dense], passes=[own_pass])


def build(context, options: ToyConfig) -> ToyScheme:
    return ToyScheme(context.model.hidden_dim, options)


def check(model, options: ToyConfig) -> None:
    if options.max_queries < 1:
        raise UserError("model.schemes.toy.max_queries must be at least 1")


SPEC = SchemeSpec(NAME, ToyConfig, build, check, family="Toy")


def register() -> None:
    register_scheme(SPEC)
