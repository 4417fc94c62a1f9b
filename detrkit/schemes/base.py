# SPDX-License-Identifier: Apache-2.0
"""``TrainingScheme``: supervision that exists only while training (no-op hooks by default).

A scheme lives in one module of this package, which registers it (``registry.register_scheme``)
with its options dataclass, builder and checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from detrkit.structures import (
    DecoderOutput,
    DenseLoss,
    EncoderMemory,
    PredictionGroup,
    QuerySet,
    Target,
)


@dataclass
class AuxiliaryResult:
    """What a scheme computes beside the decoder.

    Attributes:
        dense_losses: losses of its own heads over the encoder memory; the criterion evaluates
            and normalises them.
        passes: extra query sets, each decoded in its own decoder pass; their groups carry
            their supervision (e.g. fixed assignments).
    """

    dense_losses: list[DenseLoss] = field(default_factory=list)
    passes: list[QuerySet] = field(default_factory=list)


class TrainingScheme(nn.Module):
    """A training-only plug-in. The detector calls the hooks in training mode only, in the
    order of ``model.schemes``.

    Attributes:
        extra_queries: rows of the query initialiser's table the scheme takes, right after the
            inference queries and those of the schemes before it (H-DETR's one-to-many queries).
        tap_points: decoder operations after which the scheme reads the hidden state.
    """

    extra_queries: int = 0
    tap_points: tuple[str, ...] = ()

    def extend_queries(
        self,
        queries: QuerySet,
        memory: EncoderMemory,
        targets: list[Target] | None,
        slots: range,
    ) -> QuerySet:
        """Label ``slots`` (this scheme's ``extra_queries`` rows) or append new queries."""
        return queries

    def auxiliary(self, memory: EncoderMemory, targets: list[Target] | None) -> AuxiliaryResult:
        return AuxiliaryResult()

    def tap_groups(
        self, decoded: DecoderOutput, queries: QuerySet, head: nn.Module
    ) -> list[PredictionGroup]:
        return []
