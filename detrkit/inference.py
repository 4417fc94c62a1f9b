# SPDX-License-Identifier: Apache-2.0
"""``load_model`` and ``Predictor``: checkpoints in; images in, named detections out.

Example::

    from detrkit import Predictor

    predictor = Predictor.from_checkpoint("runs/demo/run")  # or a .safetensors file
    found = predictor("image.jpg")  # a Prediction; a list of inputs gives a list
    for box, score, name in zip(found.boxes_xyxy.tolist(), found.scores.tolist(), found.names):
        print(name, round(score, 2), box)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

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
from detrkit.detection import detect
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.engine.distributed import choose_device
from detrkit.engine.precision import Precision
from detrkit.engine.state import inference_checkpoint
from detrkit.errors import UserError
from detrkit.image_inputs import ImageInput, as_images
from detrkit.structures import Detections

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 8


@dataclass
class LoadedModel:
    """A detector restored from a detrkit checkpoint.

    Attributes:
        model: the detector in eval mode, on the requested device.
        config: the experiment config stored in the checkpoint.
        label_map: category ids and names of the model's labels.
        path: the file the weights came from.
        weights: "EMA" (the moving average of the weights) or "raw".
    """

    model: nn.Module
    config: ExperimentConfig
    label_map: LabelMap
    path: Path
    weights: str = "raw"


def load_model(path: str | Path, device: str | torch.device | None = "cpu") -> LoadedModel:
    """Build the model recorded in a checkpoint and load its weights.

    Args:
        path: a run folder (its ``model_ema.safetensors``, else ``model.safetensors``, else its
            newest training checkpoint), a training checkpoint (its EMA weights when it kept
            them), ``model.safetensors`` or a converted official checkpoint.
        device: where the model goes; None = the best available.

    Raises:
        UserError: nothing loadable at ``path``, or the file is corrupt or of another format.
    """
    found = inference_checkpoint(Path(path))
    if found is None:
        raise UserError(
            f"no detrkit checkpoint at {path}; give a .safetensors file or a run folder"
        )
    checkpoint = load_checkpoint(found)
    config = config_from_dict(checkpoint.meta.config, source=str(found))
    label_map = checkpoint.meta.label_map
    model = build_model(config.model, label_map.num_classes)
    weights, kind = checkpoint.inference_weights()
    model.load_state_dict(weights, strict=True)
    device = choose_device(device) if device is None else device
    logger.info("loaded %s weights from %s", kind, found)
    return LoadedModel(model.to(device).eval(), config, label_map, found, kind)


@dataclass
class Prediction:
    """Detections of one image, in its original pixels, best first.

    Attributes:
        boxes_xyxy: [N, 4] float boxes (x1, y1, x2, y2) in absolute pixels.
        scores: [N] confidences in [0, 1].
        category_ids: [N] int64 dataset category ids.
        names: N category names.
    """

    boxes_xyxy: Tensor
    scores: Tensor
    category_ids: Tensor
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def above(self, threshold: float) -> Prediction:
        """The detections scoring at least ``threshold``."""
        keep = self.scores >= threshold
        names = [n for n, k in zip(self.names, keep.tolist()) if k]
        return Prediction(self.boxes_xyxy[keep], self.scores[keep], self.category_ids[keep], names)


class Predictor:
    """Images in, named detections out.

    Eval transforms -> batches of equal-size images (no padding, so a prediction does not
    depend on the other images in the call) -> model (+ test-time augmentation as the config's
    ``inference`` says) -> postprocess -> category ids and names.

    Args:
        loaded: model, config and label map (see :func:`load_model`).
        precision: "fp32" | "bf16" | "fp16" autocast for the forward pass.
        batch_size: most images per forward pass.
    """

    def __init__(
        self, loaded: LoadedModel, precision: str = "fp32", batch_size: int = DEFAULT_BATCH_SIZE
    ) -> None:
        if batch_size < 1:
            raise UserError(f"Predictor batch_size must be at least 1, got {batch_size}")
        self.model, self.label_map = loaded.model, loaded.label_map
        self.transforms = build_eval_transforms(loaded.config.data)
        # Unused slots of a converted checkpoint's label map never produce a detection.
        self.postprocess = build_postprocess(loaded.config.model, self.label_map.ignored_labels())
        self.tta = build_tta(loaded.config)
        self.device = next(self.model.parameters()).device
        self.precision = Precision(precision, self.device.type)
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str | None = None, precision: str = "fp32"
    ) -> Predictor:
        """Load ``path`` (anything :func:`load_model` takes) on ``device`` (None = best)."""
        return cls(load_model(path, choose_device(device)), precision)

    @overload
    def __call__(self, images: Sequence[ImageInput]) -> list[Prediction]: ...

    @overload
    def __call__(self, images: ImageInput) -> Prediction | list[Prediction]: ...

    @torch.inference_mode()
    def __call__(self, images):
        """Detect objects in one image or several (any sizes).

        Args:
            images: a path, PIL image, [H, W, 3] uint8 array, [3, H, W] uint8 or [0, 1] float
                tensor; or a list of these, or a 4-D array / tensor batch of them.

        Returns:
            A :class:`Prediction` for one image, a list of them (input order) otherwise.

        Raises:
            UserError: an input of an unsupported type or shape, or an unreadable path.
        """
        batch = as_images(images)
        found = self.predict_images(batch.images)
        return found[0] if batch.single else found

    def predict_images(self, images: Sequence[Image.Image]) -> list[Prediction]:
        """Detections of RGB PIL images, in order."""
        pixels = [self._transformed(image) for image in images]
        sizes = torch.tensor([[im.height, im.width] for im in images], device=self.device)
        found: list[Prediction | None] = [None] * len(images)
        for group in _same_size_groups(pixels):
            for start in range(0, len(group), self.batch_size):
                indices = group[start : start + self.batch_size]
                batch = pad_images([pixels[i] for i in indices]).to(self.device)
                detections = detect(
                    self.model, self.postprocess, batch, sizes[indices], self.precision, self.tta
                )
                for index, detection in zip(indices, detections):
                    found[index] = self._named(detection)
        return found

    def _transformed(self, image: Image.Image) -> Tensor:
        empty = DetectionSample.from_xyxy(
            to_rgb(image), torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
        )
        return self.transforms(empty).image

    def _named(self, detections: Detections) -> Prediction:
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
