# SPDX-License-Identifier: Apache-2.0
"""Test-time augmentation: passes are mapped back to the original image and merged."""

from __future__ import annotations

import torch
from torch import nn

from detrkit.config.schema import InferenceConfig
from detrkit.data.collate import pad_images
from detrkit.data.transforms import resized_size
from detrkit.detection import detect, hflip, rescale
from detrkit.engine.precision import Precision
from detrkit.models.postprocess import TopKSigmoidPostprocess
from detrkit.structures import DetectorOutput, PredictionGroup


class BrightSpotDetector(nn.Module):
    """Predicts one 0.2 x 0.2 box (relative to the image) centred on the brightest pixel of each
    image's valid region, with a score that depends on nothing: a stand-in whose answer is known
    under any scale or flip."""

    def forward(self, images):
        boxes = []
        for pixels, (height, width) in zip(images.pixels, images.sizes.tolist()):
            valid = pixels[0, :height, :width]
            row, col = divmod(int(valid.argmax()), width)
            boxes.append([(col + 0.5) / width, (row + 0.5) / height, 0.2, 0.2])
        boxes = torch.tensor(boxes)[None, :, None]
        logits = torch.zeros(1, len(images), 1, 2)
        return DetectorOutput([PredictionGroup("main", logits, boxes, at_inference=True)])


def _images():
    first, second = torch.zeros(3, 40, 60), torch.zeros(3, 30, 50)
    first[:, 10, 45] = 1.0
    second[:, 20, 5] = 1.0
    return pad_images([first, second])


def test_flip_and_rescale_keep_each_image_inside_its_own_region():
    images = _images()
    twice = hflip(hflip(images))
    assert torch.equal(twice.pixels, images.pixels)
    assert hflip(images).pixels[1, 0, 20, 44] == 1.0  # column 5 of 50 mirrored to 44
    bigger = rescale(images, 60, None)
    assert bigger.sizes.tolist() == [list(resized_size(40, 60, 60)), list(resized_size(30, 50, 60))]


def test_every_pass_maps_back_to_the_same_box_and_merges_into_one():
    images = _images()
    original = torch.tensor([[80, 120], [60, 100]])  # the images before the eval resize
    model, postprocess = BrightSpotDetector(), TopKSigmoidPostprocess(top_k=1)
    plain = detect(model, postprocess, images, original, Precision())
    tta = InferenceConfig(tta_scales=(30, 60), tta_flip=True, tta_nms_iou=0.5)
    merged = detect(model, postprocess, images, original, Precision(), tta)
    for single, combined in zip(plain, merged):
        assert len(combined.scores) == 1  # six passes, one object
        torch.testing.assert_close(combined.boxes_xyxy, single.boxes_xyxy, atol=3.0, rtol=0)
    # the brightest pixel of image 0 is at column 45 of 60: x centre 0.758 of 120 pixels
    assert abs(float(merged[0].boxes_xyxy[0, [0, 2]].mean()) - 91.0) < 3.0


def test_build_tta_caps_rescaled_passes_at_data_max_size_unless_set():
    from dataclasses import replace

    from detrkit.config.build import build_tta
    from detrkit.config.load import load_config

    cfg = load_config("detr_tiny", ["data.max_size=96", "inference.tta_scales=[64]"])
    settings = build_tta(cfg)
    assert isinstance(settings, InferenceConfig) and settings.tta_enabled
    assert settings.tta_max_size == 96 and settings.tta_scales == (64,)
    own = replace(cfg, inference=replace(cfg.inference, tta_max_size=80))
    assert build_tta(own).tta_max_size == 80
    assert not build_tta(load_config("detr_tiny")).tta_enabled
