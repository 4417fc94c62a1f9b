# SPDX-License-Identifier: Apache-2.0
"""``Predictor``: images in, detections with dataset category ids out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from detrkit.config.build import build_model, build_postprocess, build_tta
from detrkit.config.schema import ExperimentConfig
from detrkit.config.validate import config_from_dict
from detrkit.data.collate import pad_images
from detrkit.data.images import to_rgb
from detrkit.data.labels import LabelMap
from detrkit.data.transforms import DetectionSample, build_eval_transforms
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.engine.distributed import choose_device
from detrkit.engine.ema import inference_weights
from detrkit.engine.precision import Precision
from detrkit.engine.state import latest_checkpoint
from detrkit.errors import UserError
from detrkit.tta import detect


@dataclass
class LoadedModel:
    """A detector restored from a detrkit checkpoint, with its config and label map."""

    model: nn.Module
    config: ExperimentConfig
    label_map: LabelMap
    path: Path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the model recorded in a checkpoint (a file or a run folder) and load its weights
    (the EMA of the weights when the run kept one)."""
    found = latest_checkpoint(Path(path))
    if found is None:
        raise UserError(
            f"no detrkit checkpoint at {path}; give a .safetensors file or a run folder"
        )
    checkpoint = load_checkpoint(found)
    config = config_from_dict(checkpoint.meta["config"], source=str(found))
    label_map = LabelMap.from_dict(checkpoint.meta["label_map"])
    model = build_model(config.model, label_map.num_classes)
    weights, _ = inference_weights(checkpoint.model, checkpoint.state)
    model.load_state_dict(weights, strict=True)
    return LoadedModel(model.to(device).eval(), config, label_map, found)


@dataclass
class Prediction:
    """Detections of one image in its original pixels.

    Attributes:
        boxes_xyxy: [N, 4] absolute (x1, y1, x2, y2).
        scores: [N].
        category_ids: [N] dataset category ids.
        names: N category names.
    """

    boxes_xyxy: Tensor
    scores: Tensor
    category_ids: Tensor
    names: list[str]


class Predictor:
    """Eval transforms -> batches of equal-size images (no padding, so a prediction does not
    depend on the other images) -> model (+ test-time augmentation as configured) ->
    postprocess -> category ids.

    Args:
        loaded: model, config and label map (see ``load_model``).
        precision: "fp32" | "bf16" | "fp16" autocast for the forward pass.
    """

    def __init__(self, loaded: LoadedModel, precision: str = "fp32") -> None:
        self.model, self.label_map = loaded.model, loaded.label_map
        self.transforms = build_eval_transforms(loaded.config.data)
        self.postprocess = build_postprocess(loaded.config.model)
        self.tta = build_tta(loaded.config)
        self.device = next(self.model.parameters()).device
        self.precision = Precision(precision, self.device.type)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | None = None, precision: str = "fp32"):
        return cls(load_model(path, choose_device(device)), precision)

    @torch.inference_mode()
    def __call__(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Detect objects in RGB PIL images (any sizes)."""
        pixels = []
        for image in images:
            sample = DetectionSample.from_xyxy(
                to_rgb(image), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
            )
            pixels.append(self.transforms(sample).image)
        sizes = torch.tensor([[im.height, im.width] for im in images], device=self.device)
        found: list = [None] * len(images)
        for indices in _same_size_groups(pixels):
            batch = pad_images([pixels[i] for i in indices]).to(self.device)
            detections = detect(
                self.model, self.postprocess, batch, sizes[indices], self.precision, self.tta
            )
            for index, detection in zip(indices, detections):
                found[index] = self._named(detection)
        return found

    def _named(self, detections) -> Prediction:
        labels = detections.labels.cpu()
        return Prediction(
            detections.boxes_xyxy.cpu(),
            detections.scores.cpu(),
            self.label_map.to_category(labels),
            [self.label_map.names[i] for i in labels.tolist()],
        )


def _same_size_groups(pixels: Sequence[Tensor]) -> list[list[int]]:
    """Indices of the images grouped by (h, w), in first-seen order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(pixels):
        groups.setdefault(tuple(image.shape[-2:]), []).append(index)
    return list(groups.values())
