# SPDX-License-Identifier: Apache-2.0
"""``QueryDetector``: backbone -> neck -> encoder -> queries -> decoder -> head, plus schemes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from torch import nn

from detrkit.models.decoder import Decoder
from detrkit.models.heads import DetectionHead
from detrkit.structures import DetectorOutput, ImageBatch, Target


class QueryDetector(nn.Module):
    """One detector for the whole DETR family; variants differ only in the parts plugged in.

    Args:
        backbone: pixels [B, 3, H, W] -> {stage: feature map}.
        neck: (features, padding_mask) -> list[FeatureLevel].
        encoder: list[FeatureLevel] -> EncoderMemory.
        queries: (memory, num_queries, num_extra) -> (QuerySet, extra prediction groups such as
            two-stage encoder proposals).
        decoder: (QuerySet, EncoderMemory) -> DecoderOutput.
        head: DecoderOutput -> prediction groups.
        num_queries: queries used at inference.
        schemes: training-only supervision plug-ins by name (no effect in eval mode); they run
            in the order given, and their query slots follow the inference ones in that order.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        neck: nn.Module,
        encoder: nn.Module,
        queries: nn.Module,
        decoder: Decoder,
        head: DetectionHead,
        num_queries: int,
        schemes: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.backbone, self.neck, self.encoder = backbone, neck, encoder
        self.queries, self.decoder, self.head = queries, decoder, head
        self.num_queries = num_queries
        self.schemes = nn.ModuleDict(schemes or {})

    def forward(self, images: ImageBatch, targets: list[Target] | None = None) -> DetectorOutput:
        """Run the detector.

        Args:
            images: padded batch.
            targets: ground truth, used only by training schemes.

        Returns:
            ``DetectorOutput`` whose groups hold per-layer logits and cxcywh boxes.
        """
        levels = self.neck(self.backbone(images.pixels), images.padding_mask)
        memory = replace(self.encoder(levels), image_sizes=images.sizes)
        schemes = list(self.schemes.values()) if self.training else []
        queries, groups = self.queries(memory, self.num_queries, self.num_reserved(schemes))
        dense_losses, passes = [], []
        slot = self.num_queries
        for scheme in schemes:
            slots = range(slot, slot + scheme.extra_queries)
            slot = slots.stop
            queries = scheme.extend_queries(queries, memory, targets, slots)
            auxiliary = scheme.auxiliary(memory, targets)
            dense_losses += auxiliary.dense_losses
            passes += auxiliary.passes
        decoded = self.decoder(queries, memory, self.head)
        groups = self.head.predict_groups(decoded, queries) + groups
        for scheme in schemes:
            groups += scheme.tap_groups(decoded, queries, self.head)
        for query_set in passes:
            decoded_pass = self.decoder(query_set, memory, self.head)
            groups += self.head.predict_groups(decoded_pass, query_set)
        return DetectorOutput(groups, dense_losses)

    @staticmethod
    def num_reserved(schemes: list[nn.Module]) -> int:
        """Query-table rows the schemes take after the inference queries."""
        return sum(scheme.extra_queries for scheme in schemes)
