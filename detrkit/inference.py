# SPDX-License-Identifier: Apache-2.0
"""``Predictor``: images in, detections with dataset category ids out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

from detrkit.config.build import build_model, build_postprocess
from detrkit.config.schema import ExperimentConfig
from detrkit.config.validate import config_from_dict
from detrkit.data.collate import pad_images
from detrkit.data.images import to_rgb
from detrkit.data.labels import LabelMap
from detrkit.data.transforms import DetectionSample, build_eval_transforms
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.engine.distributed import choose_device
from detrkit.engine.precision import Precision
from detrkit.engine.state import latest_checkpoint
from detrkit.errors import UserError


@dataclass
class LoadedModel:
    """A detector restored from a detrkit checkpoint, with its config and label map."""

    model: nn.Module
    config: ExperimentConfig
    label_map: LabelMap
    path: Path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the model recorded in a checkpoint (a file or a run folder) and load its weights."""
    found = latest_checkpoint(Path(path))
    if found is None:
        raise UserError(
            f"no detrkit checkpoint at {path}; give a .safetensors file or a run folder"
        )
    checkpoint = load_checkpoint(found)
    config = config_from_dict(checkpoint.meta["config"], source=str(found))
    label_map = LabelMap.from_dict(checkpoint.meta["label_map"])
    model = build_model(config.model, label_map.num_classes)
    model.load_state_dict(checkpoint.model, strict=True)
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
    """Eval transforms -> padded batch -> model (eval, inference mode) -> postprocess -> ids.

    Args:
        loaded: model, config and label map (see ``load_model``).
        precision: "fp32" | "bf16" | "fp16" autocast for the forward pass.
    """

    def __init__(self, loaded: LoadedModel, precision: str = "fp32") -> None:
        self.model, self.label_map = loaded.model, loaded.label_map
        self.transforms = build_eval_transforms(loaded.config.data)
        self.postprocess = build_postprocess(loaded.config.model)
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
        batch = pad_images(pixels).to(self.device)
        with self.precision.autocast():
            output = self.model(batch)
        group = output.for_inference()
        group.logits, group.boxes = group.logits.float(), group.boxes.float()
        sizes = torch.tensor([[im.height, im.width] for im in images], device=self.device)
        return [self._named(d) for d in self.postprocess(group, sizes)]

    def _named(self, detections) -> Prediction:
        labels = detections.labels.cpu()
        return Prediction(
            detections.boxes_xyxy.cpu(),
            detections.scores.cpu(),
            self.label_map.to_category(labels),
            [self.label_map.names[i] for i in labels.tolist()],
        )
