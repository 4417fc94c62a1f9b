# SPDX-License-Identifier: Apache-2.0
"""Detection head: class logits and boxes from decoder hidden states, split by query group."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from detrkit.layers.ffn import MLP
from detrkit.models.refine import refined_reference
from detrkit.ops.boxes import INVERSE_SIGMOID_EPS
from detrkit.structures import DecoderOutput, PredictionGroup, QuerySet

_BOX_MLP_LAYERS = 3
# Focal-loss heads start predicting every class with probability 0.01 (RetinaNet's prior).
PRIOR_PROB = 0.01


class DetectionHead(nn.Module):
    """Per-layer class and box predictors.

    Args:
        dim: width D.
        num_logits: class logits per query (num_classes, +1 with a no-object class).
        num_layers: decoder layers; with ``shared`` one predictor serves every layer.
        shared: one predictor pair for all layers (DETR, plain Deformable DETR, DINO).
        inverse_sigmoid_eps: clamp of the references' logit when boxes are predicted relative
            to them (1e-3 in DINO).
    """

    def __init__(
        self,
        dim: int,
        num_logits: int,
        num_layers: int,
        shared: bool = True,
        inverse_sigmoid_eps: float = INVERSE_SIGMOID_EPS,
    ) -> None:
        super().__init__()
        self.inverse_sigmoid_eps = inverse_sigmoid_eps
        count = 1 if shared else num_layers
        self.class_embed = nn.ModuleList(nn.Linear(dim, num_logits) for _ in range(count))
        self.bbox_embed = nn.ModuleList(MLP(dim, dim, 4, _BOX_MLP_LAYERS) for _ in range(count))

    def init_class_prior(self, prior_prob: float = PRIOR_PROB) -> None:
        """Every class bias at the focal prior: each class starts with probability
        ``prior_prob``, so the many negatives do not swamp the first steps' focal loss."""
        for head in self.class_embed:
            nn.init.constant_(head.bias, -math.log((1 - prior_prob) / prior_prob))

    def init_for_sigmoid(self, prior_prob: float = PRIOR_PROB, first_wh_bias: float = -2.0) -> None:
        """Deformable-family initialisation (docs/methods.md#implementation-notes): every class
        bias at the focal prior, box
        heads predicting zero offsets, and the first box head's (w, h) bias at ``first_wh_bias``."""
        self.init_class_prior(prior_prob)
        for index, head in enumerate(self.bbox_embed):
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
            if index == 0:
                nn.init.constant_(head.layers[-1].bias[2:], first_wh_bias)

    def box_predictor(self, layer: int) -> nn.Module:
        return self.bbox_embed[min(layer, len(self.bbox_embed) - 1)]

    def predict(
        self,
        hidden: Tensor,
        references: Sequence[Tensor] | None,
        class_embed: Sequence[nn.Module] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-layer logits and boxes.

        Args:
            hidden: [L, B, Q, D].
            references: per layer [B, Q, 2|4] sigmoid-space references, or None (DETR).
            class_embed: class predictors to use instead of the head's own (same count).

        Returns:
            logits [L, B, Q, num_logits] and boxes [L, B, Q, 4] cxcywh in [0, 1].
        """
        class_embed = self.class_embed if class_embed is None else class_embed
        logits, boxes = [], []
        for layer in range(hidden.shape[0]):
            logits.append(class_embed[min(layer, len(class_embed) - 1)](hidden[layer]))
            if references is None:
                boxes.append(self.box_predictor(layer)(hidden[layer]).float().sigmoid())
            else:
                boxes.append(
                    refined_reference(
                        self.box_predictor(layer),
                        hidden[layer],
                        references[layer],
                        self.inverse_sigmoid_eps,
                    )
                )
        return torch.stack(logits), torch.stack(boxes)

    def predict_groups(self, decoded: DecoderOutput, queries: QuerySet) -> list[PredictionGroup]:
        """Predict every layer and split along the query axis into the labelled groups."""
        logits, boxes = self.predict(decoded.hidden, decoded.references)
        return [
            PredictionGroup(
                name=group.name,
                logits=logits[:, :, group.start : group.stop],
                boxes=boxes[:, :, group.start : group.stop],
                supervision=group.supervision,
                at_inference=group.at_inference,
                valid=group.valid,
            )
            for group in queries.groups
        ]
