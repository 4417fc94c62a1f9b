# SPDX-License-Identifier: Apache-2.0
"""Evaluation loop: model -> postprocess -> COCO evaluator (gathered across ranks)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from detrkit.engine.distributed import all_gather_object
from detrkit.engine.precision import Precision
from detrkit.evaluation.coco_eval import CocoEvaluator, CocoMetrics
from detrkit.structures import Detections, ImageBatch, Target
from detrkit.tta import TTASettings, detect


@torch.no_grad()
def predict_batches(
    model: nn.Module,
    postprocess: nn.Module,
    loader: Iterable[tuple[ImageBatch, list[Target]]],
    device: torch.device,
    precision: Precision,
    tta: TTASettings | None = None,
):
    """Yield (targets, detections on the CPU in original-image pixels) per batch."""
    model.eval()
    for images, targets in loader:
        sizes = torch.tensor([t.orig_size for t in targets], device=device)
        detections = detect(model, postprocess, images.to(device), sizes, precision, tta)
        yield (
            targets,
            [Detections(d.boxes_xyxy.cpu(), d.scores.cpu(), d.labels.cpu()) for d in detections],
        )


def evaluate(
    model: nn.Module,
    postprocess: nn.Module,
    loader,
    evaluator_source,
    label_to_category,
    device: torch.device,
    precision: Precision,
    tta: TTASettings | None = None,
) -> tuple[CocoMetrics, list[dict]]:
    """COCO metrics over ``loader`` and the gathered results (meaningful on rank 0)."""
    evaluator = CocoEvaluator(evaluator_source, label_to_category, all_gather=all_gather_object)
    batches = predict_batches(model, postprocess, loader, device, precision, tta)
    for targets, detections in batches:
        evaluator.update([t.image_id for t in targets], detections)
    metrics = evaluator.summarize()
    return metrics, evaluator.results()
