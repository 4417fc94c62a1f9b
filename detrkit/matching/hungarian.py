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
        """Cost of every query against every target of the batch.

        Args:
            logits: [B, Q, C] class logits.
            boxes: [B, Q, 4] cxcywh.
            targets: B targets.

        Returns:
            [B, Q, G] with G the total number of targets in the batch (images concatenated).
        """
        batch, num_queries = logits.shape[:2]
        flat_logits, flat_boxes = logits.flatten(0, 1).float(), boxes.flatten(0, 1).float()
        labels = torch.cat([t.labels for t in targets])
        target_boxes = torch.cat([t.boxes for t in targets]).float()
        if labels.numel() == 0:
            return flat_logits.new_zeros(batch, num_queries, 0)
        cost = (
            self.cost_bbox * l1_cost(flat_boxes, target_boxes)
            + self.cost_class * self.class_cost(flat_logits, labels)
            + self.cost_giou * giou_cost(flat_boxes, target_boxes)
        )
        return cost.view(batch, num_queries, -1)

    def solve(self, costs: Tensor, targets: Sequence[Target]) -> list[Match]:
        """Host costs from ``costs`` -> per image (query indices ascending, target indices)."""
        sizes = [len(t) for t in targets]
        matches = []
        for image, cost in enumerate(costs.split(sizes, dim=-1)):
            rows, cols = linear_sum_assignment(cost[image].numpy())
            matches.append((_as_index(rows), _as_index(cols)))
        return matches


def _as_index(array: np.ndarray) -> Tensor:
    return torch.as_tensor(array, dtype=torch.int64)
