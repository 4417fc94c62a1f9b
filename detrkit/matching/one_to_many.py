# SPDX-License-Identifier: Apache-2.0
"""One-to-many assignment by prediction quality (MS-DETR's Stage2Assigner,
docs/methods.md#ms-detr-one-to-many-assigner)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from detrkit.matching.hungarian import Match, padded_targets
from detrkit.ops.boxes import box_cxcywh_to_xyxy, box_iou
from detrkit.structures import Target


class TopKQualityAssigner:
    """Give each ground-truth box up to ``k`` queries ranked by 0.7 IoU + 0.3 score.

    Per image: every query takes its best box; it is positive when that quality reaches
    ``threshold``, and each box's best query is always positive (low-quality rescue). Positives
    are capped at ``positive_fraction`` of the queries (random subset). Each box that kept c
    positives is assigned its top-min(c, k) queries over *all* queries. Pairs come sorted by
    quality, ascending, so that a query assigned twice keeps its best box in class targets.

    Args:
        k: most queries per box.
        threshold: quality of a positive.
        positive_fraction: cap on positives, as a fraction of the queries.
        box_quality: weight of IoU in the quality (the score takes the rest).
        score: how logits become class probabilities: "sigmoid" (focal heads) or "softmax"
            (heads with a no-object logit, DETR).
    """

    def __init__(
        self,
        k: int = 6,
        threshold: float = 0.4,
        positive_fraction: float = 0.25,
        box_quality: float = 0.7,
        score: Literal["sigmoid", "softmax"] = "sigmoid",
    ) -> None:
        self.k, self.threshold = k, threshold
        self.positive_fraction, self.box_quality = positive_fraction, box_quality
        self.score = score

    @torch.no_grad()
    def costs(self, logits: Tensor, boxes: Tensor, targets: Sequence[Target]) -> Tensor:
        """logits [B, Q, C], boxes [B, Q, 4] cxcywh -> quality [B, G_max, Q] (padding rows)."""
        labels, target_boxes = padded_targets(targets, logits.device)
        if labels.shape[1] == 0:
            return logits.new_zeros(logits.shape[0], 0, logits.shape[1], dtype=torch.float32)
        iou = torch.stack(
            [
                box_iou(box_cxcywh_to_xyxy(t.float()), box_cxcywh_to_xyxy(b.float()))
                for t, b in zip(target_boxes, boxes)
            ]
        )
        probs = logits.float().softmax(-1) if self.score == "softmax" else logits.float().sigmoid()
        index = labels[:, :, None].expand(-1, -1, logits.shape[1])
        scores = torch.gather(probs.transpose(1, 2), 1, index)
        return self.box_quality * iou + (1 - self.box_quality) * scores

    def image_costs(self, costs: Tensor, targets: Sequence[Target]) -> list[Tensor]:
        """Per image [G_i, Q] quality matrices (for inspection and tests)."""
        return [costs[i, : len(t)] for i, t in enumerate(targets)]

    def solve(self, costs: Tensor, targets: Sequence[Target], repeat: int = 1) -> list[Match]:
        """Host quality [B, G_max, Q] -> per image (queries, boxes), by ascending quality.
        ``repeat`` tiles the targets as ``HungarianAssigner.solve`` does."""
        return [
            self._solve_image(costs[i, : len(t)].repeat(repeat, 1)) for i, t in enumerate(targets)
        ]

    def _solve_image(self, quality: Tensor) -> Match:
        num_boxes, num_queries = quality.shape
        if num_boxes == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty
        best_quality, best_box = quality.max(0)
        positive = best_quality >= self.threshold
        positive[quality.topk(1, dim=1).indices[:, 0]] = True  # every box's best query
        kept = positive.nonzero()[:, 0]
        kept = kept[torch.randperm(kept.numel())[: int(self.positive_fraction * num_queries)]]
        boxes, counts = best_box[kept].unique(return_counts=True)
        queries, owners = [], []
        for box, count in zip(boxes.tolist(), counts.tolist()):
            top = quality[box].topk(min(count, self.k)).indices
            queries.append(top)
            owners.append(torch.full_like(top, box))
        queries, owners = torch.cat(queries), torch.cat(owners)
        order = quality[owners, queries].argsort()
        return queries[order], owners[order]
