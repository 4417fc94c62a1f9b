# SPDX-License-Identifier: Apache-2.0
"""The module that ``detrkit export --format onnx`` traces: a detector plus its postprocessor,
tensors in and tensors out (see docs/onnx.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detrkit.config.schema import ExperimentConfig
from detrkit.errors import UserError
from detrkit.models.postprocess import SoftmaxPostprocess, TopKSigmoidPostprocess
from detrkit.structures import ImageBatch

INPUT_NAMES = ("pixels", "orig_sizes")
OUTPUT_NAMES = ("boxes", "scores", "labels")


@dataclass(frozen=True)
class GraphOutputs:
    """What the exported graph returns, K detections per image, best first for top-k heads
    (query order for DETR's softmax head, which keeps every query).

    Attributes:
        boxes: [B, K, 4] float32 absolute (x1, y1, x2, y2) in pixels of ``orig_sizes``.
        scores: [B, K] float32 in [0, 1].
        labels: [B, K] int64 contiguous labels (the checkpoint's label map gives their
            category ids and names; they are also in the ONNX metadata).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def as_tuple(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.boxes, self.scores, self.labels


class DeployableDetector(nn.Module):
    """Normalised images and original sizes in, postprocessed detections out.

    Every image of a batch has the input's full size (no padding, so no padding mask), as in
    ``Predictor``; the boxes are scaled to each image's original size.

    Args:
        detector: a ``QueryDetector`` in eval mode (training-only schemes then do nothing).
        postprocess: ``SoftmaxPostprocess`` or ``TopKSigmoidPostprocess`` without NMS.
    """

    def __init__(self, detector: nn.Module, postprocess: nn.Module) -> None:
        super().__init__()
        self.detector, self.postprocess = detector, postprocess

    def forward(self, pixels: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """pixels: [B, 3, H, W] float32 normalised; orig_sizes: [B, 2] int64 (h, w) of the
        images before resizing -> (boxes [B, K, 4] xyxy pixels, scores [B, K], labels [B, K])."""
        return self.detections(pixels, orig_sizes).as_tuple()

    def detections(self, pixels: Tensor, orig_sizes: Tensor) -> GraphOutputs:
        """As :meth:`forward`, typed."""
        batch, _, height, width = pixels.shape
        padding_mask = torch.zeros((batch, height, width), dtype=torch.bool, device=pixels.device)
        # Every image fills the input, so each one's unpadded size is (H, W).
        sizes = torch.tensor([height, width], device=pixels.device).expand(batch, 2)
        group = self.detector(ImageBatch(pixels, padding_mask, sizes)).for_inference()
        # The stacked forms of the postprocessors' per-image lists (a loop over the images
        # would fix the batch size in the graph); without NMS they are the same detections.
        if isinstance(self.postprocess, SoftmaxPostprocess):
            found = self.postprocess.batched(group, orig_sizes)
        else:
            found = self.postprocess.top_candidates(group, orig_sizes)
        return GraphOutputs(found.boxes_xyxy, found.scores, found.labels)


def check_exportable(config: ExperimentConfig, postprocess: nn.Module) -> None:
    """Refuse what the graph cannot express with fixed-size outputs.

    Raises:
        UserError: NMS or soft-NMS postprocessing (a data-dependent number of detections).
    """
    if isinstance(postprocess, SoftmaxPostprocess):
        return
    if not isinstance(postprocess, TopKSigmoidPostprocess):
        raise UserError(f"ONNX export does not know the {type(postprocess).__name__} postprocess")
    if postprocess.nms_iou_threshold is not None or postprocess.soft_nms is not None:
        raise UserError(
            "ONNX export supports top-k postprocessing only; this config applies "
            f"{'soft-NMS' if postprocess.soft_nms is not None else 'NMS'} "
            "(model.nms_iou_threshold / model.soft_nms), whose output size depends on the data. "
            "Export with that option set to null and apply NMS to the outputs yourself"
        )


def dropped_parts(detector: nn.Module, config: ExperimentConfig) -> list[str]:
    """What the exported graph leaves out: training-only schemes (they act only in training
    mode) and test-time augmentation (a plain single pass is exported)."""
    dropped = [f"scheme '{name}' (training only)" for name in getattr(detector, "schemes", {})]
    if config.inference.tta_enabled:
        dropped.append("test-time augmentation (the graph is the single plain pass)")
    return dropped
