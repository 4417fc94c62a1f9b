# SPDX-License-Identifier: Apache-2.0
"""Turn the inference group's last layer into per-image detections in original pixels."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.ops.boxes import box_cxcywh_to_xyxy
from detrkit.structures import Detections, PredictionGroup


def _scale_boxes(boxes_cxcywh: Tensor, image_sizes: Tensor) -> Tensor:
    """[B, Q, 4] cxcywh-n and [B, 2] (h, w) -> [B, Q, 4] absolute xyxy."""
    height, width = image_sizes.unbind(1)
    scale = torch.stack((width, height, width, height), dim=1).to(boxes_cxcywh.dtype)
    return box_cxcywh_to_xyxy(boxes_cxcywh) * scale[:, None, :]


class SoftmaxPostprocess(nn.Module):
    """DETR: softmax over C + 1 logits; each query scores its best real class; no top-k."""

    @torch.no_grad()
    def forward(self, predictions: PredictionGroup, image_sizes: Tensor) -> list[Detections]:
        """predictions: group with logits [L, B, Q, C+1]; image_sizes: [B, 2] (h, w) to scale to."""
        probs = predictions.logits[-1].softmax(-1)
        scores, labels = probs[..., :-1].max(-1)
        boxes = _scale_boxes(predictions.boxes[-1], image_sizes)
        return [Detections(b, s, lab) for s, lab, b in zip(scores, labels, boxes)]


class TopKSigmoidPostprocess(nn.Module):
    """Deformable family: top-k over every (query, class) sigmoid score.

    Args:
        top_k: detections kept per image.
    """

    def __init__(self, top_k: int = 100) -> None:
        super().__init__()
        self.top_k = top_k

    @torch.no_grad()
    def forward(self, predictions: PredictionGroup, image_sizes: Tensor) -> list[Detections]:
        """predictions: logits [L, B, Q, C]; image_sizes: [B, 2] (h, w)."""
        logits = predictions.logits[-1]
        batch, _, num_classes = logits.shape
        probs = logits.sigmoid().flatten(1)
        scores, flat_index = probs.topk(min(self.top_k, probs.shape[1]), dim=1)
        query_index = flat_index // num_classes
        labels = flat_index % num_classes
        boxes = _scale_boxes(predictions.boxes[-1], image_sizes)
        boxes = torch.gather(boxes, 1, query_index[..., None].expand(-1, -1, 4))
        return [Detections(b, s, lab) for s, lab, b in zip(scores, labels, boxes)]
