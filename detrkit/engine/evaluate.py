# SPDX-License-Identifier: Apache-2.0
"""Evaluation loop: model -> postprocess -> COCO evaluator (gathered across ranks)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from detrkit.config.schema import InferenceConfig
from detrkit.detection import detect
from detrkit.engine.distributed import all_gather_object
from detrkit.engine.precision import Precision
from detrkit.engine.progress import Progress
from detrkit.evaluation.coco_eval import CocoEvaluator, CocoMetrics
from detrkit.structures import Detections, ImageBatch, Target


@torch.inference_mode()
def predict_batches(
    model: nn.Module,
    postprocess: nn.Module,
    loader: Iterable[tuple[ImageBatch, list[Target]]],
    device: torch.device,
    precision: Precision,
    tta: InferenceConfig | None = None,
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
    tta: InferenceConfig | None = None,
    *,
    show_progress: bool = True,
    log_every: int | None = None,
) -> tuple[CocoMetrics, list[dict]]:
    """COCO metrics over ``loader`` and the gathered results (meaningful on rank 0).

    ``show_progress`` draws a bar on a terminal, else logs a line every ``log_every`` batches
    (default: about ten lines) and at the end; pass False on ranks other than 0.
    """
    evaluator = CocoEvaluator(evaluator_source, label_to_category, all_gather=all_gather_object)
    batches = predict_batches(model, postprocess, loader, device, precision, tta)
    total = len(loader) if hasattr(loader, "__len__") else 0
    every = log_every or max(1, total // 10)
    with Progress(total, "eval", every=every, enabled=show_progress, unit="batch") as progress:
        for targets, detections in batches:
            evaluator.update([t.image_id for t in targets], detections)
            progress.update()
    metrics = evaluator.summarize()
    return metrics, evaluator.results()
