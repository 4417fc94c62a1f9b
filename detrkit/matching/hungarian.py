# SPDX-License-Identifier: Apache-2.0
"""One-to-one Hungarian assignment: batched costs on the device, per-image LSAP on the host."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from detrkit.matching.costs import giou_cost, l1_cost
from detrkit.structures import Target

Match = tuple[Tensor, Tensor]


class HungarianAssigner:
    """Minimum-cost one-to-one matching of queries to targets, per image.

    Args:
        class_cost: (logits [N, C], labels [G]) -> [N, G].
        cost_class, cost_bbox, cost_giou: weights of the class, L1 and GIoU costs.
    """

    def __init__(
        self,
        class_cost: Callable[[Tensor, Tensor], Tensor],
        *,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
    ) -> None:
        self.class_cost = class_cost
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou

    @torch.no_grad()
    def costs(self, logits: Tensor, boxes: Tensor, targets: Sequence[Target]) -> Tensor:
        """Cost of every query of each image against that image's targets.

        Args:
            logits: [B, Q, C] class logits.
            boxes: [B, Q, 4] cxcywh.
            targets: B targets.

        Returns:
            [B, Q, G_max]; columns beyond an image's own target count are padding.
        """
        labels, target_boxes = padded_targets(targets, logits.device)
        if labels.shape[1] == 0:
            return logits.new_zeros(*logits.shape[:2], 0, dtype=torch.float32)
        logits, boxes = logits.float(), boxes.float()
        return (
            self.cost_bbox * l1_cost(boxes, target_boxes)
            + self.cost_class * self.class_cost(logits, labels)
            + self.cost_giou * giou_cost(boxes, target_boxes)
        )

    def image_costs(self, costs: Tensor, targets: Sequence[Target]) -> list[Tensor]:
        """Per image [Q, G_i] cost matrices (for inspection and tests)."""
        return [costs[i, :, : len(t)] for i, t in enumerate(targets)]

    def solve(self, costs: Tensor, targets: Sequence[Target], repeat: int = 1) -> list[Match]:
        """Host costs from ``costs`` -> per image (query indices ascending, target indices).

        With ``repeat`` > 1 the targets count ``repeat`` times ([g1..gG, g1..gG, ...]): the
        columns are tiled and target indices refer to the repeated list.
        """
        matches = []
        for image, target in enumerate(targets):
            image_costs = costs[image, :, : len(target)].repeat(1, repeat)
            rows, cols = linear_sum_assignment(image_costs.numpy())
            matches.append((_as_index(rows), _as_index(cols)))
        return matches


# Padding target boxes: any valid box keeps the GIoU finite; padded columns are never solved.
_PAD_BOX = (0.5, 0.5, 1.0, 1.0)


def padded_targets(targets: Sequence[Target], device: torch.device) -> tuple[Tensor, Tensor]:
    """Labels [B, G_max] int64 and boxes [B, G_max, 4] cxcywh float32, padded per image."""
    count = max((len(t) for t in targets), default=0)
    labels = torch.zeros(len(targets), count, dtype=torch.int64, device=device)
    boxes = torch.tensor(_PAD_BOX, device=device).repeat(len(targets), count, 1)
    for image, target in enumerate(targets):
        labels[image, : len(target)] = target.labels
        boxes[image, : len(target)] = target.boxes.float()
    return labels, boxes


def _as_index(array: np.ndarray) -> Tensor:
    return torch.as_tensor(array, dtype=torch.int64)
