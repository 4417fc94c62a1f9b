# SPDX-License-Identifier: Apache-2.0
"""Detection head: class logits and boxes from decoder hidden states, split by query group."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.layers.ffn import MLP
from detrkit.ops.boxes import inverse_sigmoid
from detrkit.structures import DecoderOutput, PredictionGroup, QuerySet

_BOX_MLP_LAYERS = 3


class DetectionHead(nn.Module):
    """Per-layer class and box predictors.

    Args:
        dim: width D.
        num_logits: class logits per query (num_classes, +1 with a no-object class).
        num_layers: decoder layers; with ``shared`` one predictor serves every layer.
        shared: one predictor pair for all layers (DETR, plain Deformable DETR).
    """

    def __init__(self, dim: int, num_logits: int, num_layers: int, shared: bool = True) -> None:
        super().__init__()
        count = 1 if shared else num_layers
        self.class_embed = nn.ModuleList(nn.Linear(dim, num_logits) for _ in range(count))
        self.bbox_embed = nn.ModuleList(MLP(dim, dim, 4, _BOX_MLP_LAYERS) for _ in range(count))

    def box_predictor(self, layer: int) -> nn.Module:
        return self.bbox_embed[min(layer, len(self.bbox_embed) - 1)]

    def predict(self, hidden: Tensor, references: Tensor | None) -> tuple[Tensor, Tensor]:
        """hidden: [L, B, Q, D]; references: [L+1, B, Q, 2|4] or None.

        Returns:
            logits [L, B, Q, num_logits] and boxes [L, B, Q, 4] cxcywh in [0, 1].
        """
        logits, boxes = [], []
        for layer in range(hidden.shape[0]):
            head = self.class_embed[min(layer, len(self.class_embed) - 1)]
            logits.append(head(hidden[layer]))
            delta = self.box_predictor(layer)(hidden[layer])
            if references is not None:
                reference = inverse_sigmoid(references[layer])
                delta = delta + nn.functional.pad(reference, (0, 4 - reference.shape[-1]))
            boxes.append(delta.sigmoid())
        return torch.stack(logits), torch.stack(boxes)

    def predict_groups(self, decoded: DecoderOutput, queries: QuerySet) -> list[PredictionGroup]:
        """Predict every layer and split along the query axis into the labelled groups."""
        logits, boxes = self.predict(decoded.hidden, decoded.references)
        return [
            PredictionGroup(
                name=group.name,
                logits=logits[:, :, group.start : group.stop],
                boxes=boxes[:, :, group.start : group.stop],
                assigner=group.assigner,
                loss_weight=group.loss_weight,
                at_inference=group.at_inference,
            )
            for group in queries.groups
        ]
