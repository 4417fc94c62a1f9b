# SPDX-License-Identifier: Apache-2.0
"""Turn the inference group's last layer into per-image detections in original pixels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from detrkit.ops.boxes import box_cxcywh_to_xyxy
from detrkit.ops.soft_nms import batched_soft_nms
from detrkit.structures import Detections, PredictionGroup


def _scale_boxes(boxes_cxcywh: Tensor, image_sizes: Tensor, clip: bool = False) -> Tensor:
    """[B, Q, 4] cxcywh-n and [B, 2] (h, w) -> [B, Q, 4] absolute xyxy, clamped to the image
    when ``clip``."""
    height, width = image_sizes.unbind(1)
    scale = torch.stack((width, height, width, height), dim=1).to(boxes_cxcywh.dtype)
    boxes = box_cxcywh_to_xyxy(boxes_cxcywh) * scale[:, None, :]
    if clip:
        boxes = torch.min(boxes.clamp(min=0), scale[:, None, :])
    return boxes


def _mask_ignored(probs: Tensor, ignored: Tensor) -> Tensor:
    """``probs`` [..., C] with the ``ignored`` labels' scores set to -1, below every real score,
    so that they are never chosen (after the softmax: the probabilities stay the original's)."""
    if not ignored.numel():
        return probs
    return probs.index_fill(-1, ignored.to(probs.device), -1.0)


class SoftmaxPostprocess(nn.Module):
    """DETR: softmax over C + 1 logits; each query scores its best real class; no top-k.

    Args:
        ignored_labels: labels never reported (unused slots of a converted checkpoint's label
            map); each query scores its best other class.
    """

    def __init__(self, ignored_labels: Sequence[int] = ()) -> None:
        super().__init__()
        self.register_buffer("ignored", torch.tensor(ignored_labels, dtype=torch.int64), False)

    @torch.no_grad()
    def forward(self, predictions: PredictionGroup, image_sizes: Tensor) -> list[Detections]:
        """predictions: group with logits [L, B, Q, C+1]; image_sizes: [B, 2] (h, w) to scale to."""
        found = self.batched(predictions, image_sizes)
        return [
            Detections(b, s, lab, found.query_index)
            for s, lab, b in zip(found.scores, found.labels, found.boxes_xyxy)
        ]

    def batched(self, predictions: PredictionGroup, image_sizes: Tensor) -> Detections:
        """As :meth:`forward`, the images stacked: boxes [B, Q, 4] absolute xyxy, scores and
        labels [B, Q], query_index [Q]. No Python loop over images, so a traced graph (ONNX
        export) keeps the batch size dynamic."""
        probs = predictions.logits[-1].softmax(-1)
        scores, labels = _mask_ignored(probs[..., :-1], self.ignored).max(-1)
        boxes = _scale_boxes(predictions.boxes[-1], image_sizes)
        queries = torch.arange(scores.shape[1], device=scores.device)
        return Detections(boxes, scores, labels, queries)


# MS-DETR's NMS looks at this many best (query, class) pairs (docs/methods.md#ms-detr-inference).
NMS_CANDIDATES = 10_000


@dataclass(frozen=True)
class SoftNms:
    """Class-wise soft-NMS settings of ``TopKSigmoidPostprocess`` (see ``ops.soft_nms``).

    Attributes:
        candidates: best (query, class) pairs entering soft-NMS.
        iou_threshold, sigma, min_score, method: as ``ops.soft_nms.soft_nms``.
    """

    candidates: int
    iou_threshold: float = 0.8
    sigma: float = 0.5
    min_score: float = 1e-3
    method: Literal["linear", "gaussian"] = "linear"

    def options(self) -> dict:
        return dict(
            iou_threshold=self.iou_threshold,
            sigma=self.sigma,
            min_score=self.min_score,
            method=self.method,
        )


class TopKSigmoidPostprocess(nn.Module):
    """Deformable family: top-k over every (query, class) sigmoid score.

    Args:
        top_k: detections kept per image.
        nms_iou_threshold: if set, class-wise NMS at this IoU over the best ``NMS_CANDIDATES``
            pairs first (MS-DETR's ``--nms_iou_threshold``).
        ignored_labels: labels never reported (unused slots of a converted checkpoint's label
            map); they are left out before the top-k, so they take no detection slot.
        soft_nms: if set, class-wise soft-NMS over the best ``soft_nms.candidates`` pairs
            first, then the ``top_k`` survivors in picking order (Co-DINO); excludes
            ``nms_iou_threshold``.
        clip: clamp the boxes to the image (mmdetection's DETR heads).
    """

    def __init__(
        self,
        top_k: int = 100,
        nms_iou_threshold: float | None = None,
        ignored_labels: Sequence[int] = (),
        *,
        soft_nms: SoftNms | None = None,
        clip: bool = False,
    ) -> None:
        super().__init__()
        if soft_nms is not None and nms_iou_threshold is not None:
            raise ValueError("choose NMS or soft-NMS, not both")
        self.top_k, self.nms_iou_threshold = top_k, nms_iou_threshold
        self.soft_nms, self.clip = soft_nms, clip
        self.register_buffer("ignored", torch.tensor(ignored_labels, dtype=torch.int64), False)

    @torch.no_grad()
    def forward(self, predictions: PredictionGroup, image_sizes: Tensor) -> list[Detections]:
        """predictions: logits [L, B, Q, C]; image_sizes: [B, 2] (h, w)."""
        found = self.top_candidates(predictions, image_sizes)
        detections = [
            Detections(b, s, lab, q)
            for s, lab, b, q in zip(found.scores, found.labels, found.boxes_xyxy, found.query_index)
        ]
        if self.nms_iou_threshold is not None:
            detections = [self._nms(d) for d in detections]
        if self.soft_nms is not None:
            detections = [self._soft_nms(d) for d in detections]
        return detections

    def top_candidates(self, predictions: PredictionGroup, image_sizes: Tensor) -> Detections:
        """The best ``candidates`` (query, class) pairs of every image, before any NMS, the
        images stacked: boxes [B, K, 4] absolute xyxy, scores, labels and query_index [B, K].
        Without NMS this is the result; no Python loop over images, so a traced graph (ONNX
        export) keeps the batch size dynamic."""
        logits = predictions.logits[-1]
        num_classes = logits.shape[-1]
        probs = _mask_ignored(logits.sigmoid(), self.ignored).flatten(1)
        keep = min(self.candidates, probs.shape[1] - self.ignored.numel() * logits.shape[1])
        scores, flat_index = probs.topk(keep, dim=1)
        query_index = flat_index // num_classes
        labels = flat_index % num_classes
        boxes = _scale_boxes(predictions.boxes[-1], image_sizes, self.clip)
        boxes = torch.gather(boxes, 1, query_index[..., None].expand(-1, -1, 4))
        return Detections(boxes, scores, labels, query_index)

    @property
    def candidates(self) -> int:
        """(query, class) pairs taken by the top-k before any NMS."""
        if self.soft_nms is not None:
            return self.soft_nms.candidates
        return self.top_k if self.nms_iou_threshold is None else NMS_CANDIDATES

    def _soft_nms(self, found: Detections) -> Detections:
        """Class-wise soft-NMS; the first ``top_k`` survivors in picking order (decreasing
        decayed score), with their decayed scores."""
        kept, scores = batched_soft_nms(
            found.boxes_xyxy, found.scores, found.labels, **self.soft_nms.options()
        )
        kept, scores = kept[: self.top_k], scores[: self.top_k]
        return Detections(
            found.boxes_xyxy[kept], scores, found.labels[kept], found.query_index[kept]
        )

    def _nms(self, found: Detections) -> Detections:
        """Class-wise NMS, then the ``top_k`` best survivors (by score, descending)."""
        kept = batched_nms(found.boxes_xyxy, found.scores, found.labels, self.nms_iou_threshold)
        kept = kept[: self.top_k]
        return Detections(
            found.boxes_xyxy[kept], found.scores[kept], found.labels[kept], found.query_index[kept]
        )
