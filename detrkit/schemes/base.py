# SPDX-License-Identifier: Apache-2.0
"""``TrainingScheme``: supervision that exists only while training (three no-op hooks)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from detrkit.structures import DecoderOutput, EncoderMemory, PredictionGroup, QuerySet, Target


@dataclass
class AuxiliaryResult:
    """What a scheme computes beside the decoder: losses and extra query sets to decode."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    query_sets: list[QuerySet] = field(default_factory=list)


class TrainingScheme(nn.Module):
    """A training-only plug-in. The detector calls the hooks in training mode only.

    Attributes:
        extra_queries: query slots the scheme asks the initialiser for, beyond the inference ones.
        tap_points: decoder operations after which the scheme reads the hidden state.
    """

    extra_queries: int = 0
    tap_points: tuple[str, ...] = ()

    def extend_queries(
        self, queries: QuerySet, memory: EncoderMemory, targets: list[Target] | None
    ) -> QuerySet:
        return queries

    def auxiliary(self, memory: EncoderMemory, targets: list[Target] | None) -> AuxiliaryResult:
        return AuxiliaryResult()

    def tap_groups(
        self, decoded: DecoderOutput, queries: QuerySet, head: nn.Module
    ) -> list[PredictionGroup]:
        return []
