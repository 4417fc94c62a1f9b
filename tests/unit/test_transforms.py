# SPDX-License-Identifier: Apache-2.0
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from detrkit.config.schema import DataConfig
from detrkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectionSample,
    RandomSizeCrop,
    ToNormalizedTensor,
    build_eval_transforms,
    build_train_transforms,
    crop,
    denormalize,
    hflip,
    resize,
    resized_size,
)

SMALL = DataConfig(
    train_scales=(48, 56, 64),
    max_size=100,
    crop_resize_scales=(40, 50, 60),
    crop_size=(32, 48),
    val_size=64,
)


def _random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _sample(width=60, height=40, boxes=((10, 5, 30, 25), (0, 0, 60, 40)), labels=(4, 2)):
    return DetectionSample.from_xyxy(
        _random_image(width, height),
        torch.tensor(boxes, dtype=torch.float32),
        torch.tensor(labels),
    )


@pytest.mark.parametrize(
    ("hw", "shorter", "max_size", "expected"),
    [
        ((100, 300), 800, 1333, (444, 1332)),  # the longer side would be 2400: s <- 444
        ((300, 100), 800, 1333, (1332, 444)),
        ((480, 640), 800, 1333, (800, 1066)),  # int() truncates 1066.67
        ((640, 480), 800, None, (1066, 800)),
        ((800, 1000), 800, 1333, (800, 1000)),  # shorter side already 800: unchanged
        ((500, 500), 600, None, (600, 600)),
    ],
)
def test_resized_size_rule(hw, shorter, max_size, expected):
    assert resized_size(*hw, shorter, max_size) == expected


def test_resize_scales_image_and_boxes():
    out = resize(_sample(), 20)
    assert out.size == (20, 30) and out.image.size == (30, 20)
    torch.testing.assert_close(
        out.boxes_xyxy, torch.tensor([[5.0, 2.5, 15.0, 12.5], [0.0, 0.0, 30.0, 20.0]])
    )
    assert tuple(out.boxes.canvas_size) == (20, 30)


def test_hflip_mirrors_boxes_without_minus_one():
    sample = _sample()
    out = hflip(sample)
    torch.testing.assert_close(
        out.boxes_xyxy, torch.tensor([[30.0, 5.0, 50.0, 25.0], [0.0, 0.0, 60.0, 40.0]])
    )
    np.testing.assert_array_equal(np.asarray(out.image), np.asarray(sample.image)[:, ::-1])


def test_crop_shifts_clips_and_drops_boxes_with_labels():
    boxes = ((10, 5, 30, 25), (0, 0, 12, 8), (40, 30, 60, 40), (22, 10, 28, 20))
    sample = _sample(boxes=boxes, labels=(1, 2, 3, 4))
    out = crop(sample, top=6, left=12, height=20, width=25)
    assert out.size == (20, 25)
    # box 2 ends exactly at the crop's left edge and box 3 starts right of it: both dropped.
    torch.testing.assert_close(
        out.boxes_xyxy, torch.tensor([[0.0, 0.0, 18.0, 19.0], [10.0, 4.0, 16.0, 14.0]])
    )
    torch.testing.assert_close(out.labels, torch.tensor([1, 4]))
    np.testing.assert_array_equal(np.asarray(out.image), np.asarray(sample.image)[6:26, 12:37])


def test_random_size_crop_respects_bounds_and_seeds():
    sample = _sample(width=60, height=40)
    sizes = set()
    for seed in range(30):
        random.seed(seed)
        torch.manual_seed(seed)
        out = RandomSizeCrop(32, 48)(sample)
        h, w = out.size
        assert 32 <= w <= 48 and 32 <= h <= 40
        sizes.add((h, w))
        random.seed(seed)
        torch.manual_seed(seed)
        torch.testing.assert_close(RandomSizeCrop(32, 48)(sample).boxes_xyxy, out.boxes_xyxy)
    assert len(sizes) > 5


def test_random_size_crop_on_an_image_smaller_than_min_size():
    out = RandomSizeCrop(50, 80)(_sample(width=30, height=20))
    assert out.size == (20, 30)


def test_to_normalized_tensor_is_bit_identical_to_torchvision_v1():
    image = _random_image(17, 11)
    out = ToNormalizedTensor()(DetectionSample.from_xyxy(image, torch.zeros(0, 4), torch.zeros(0)))
    reference = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(out.image, reference)
    torch.testing.assert_close(denormalize(out.image), TF.to_tensor(image))


def test_eval_transforms_output_size():
    out = build_eval_transforms(DataConfig())(
        _sample(width=640, height=480, boxes=((0, 0, 64, 48),))
    )
    assert out.image.shape == (3, 800, 1066)
    torch.testing.assert_close(out.boxes_xyxy, torch.tensor([[0.0, 0.0, 64 * 1066 / 640, 80.0]]))
    torch.testing.assert_close(
        out.boxes_cxcywh_normalized(), torch.tensor([[0.05, 0.05, 0.1, 0.1]])
    )
    wide = build_eval_transforms(DataConfig())(_sample(width=300, height=100, boxes=()))
    assert wide.image.shape == (3, 444, 1332)


def _detr_resize(image, boxes, size, max_size):
    """The original recipe written against PIL and torchvision v1 (docs/methods.md#augmentation)."""
    h, w = resized_size(image.height, image.width, size, max_size)
    resized = TF.resize(image, [h, w])
    ratios = torch.tensor(
        [resized.width / image.width, resized.height / image.height] * 2, dtype=torch.float32
    )
    return resized, boxes * ratios


def _detr_train(image, boxes, cfg):
    if random.random() < 0.5:
        image = TF.hflip(image)
        boxes = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
            [image.width, 0, image.width, 0]
        )
    if random.random() < 0.5:
        return _detr_resize(image, boxes, random.choice(cfg.train_scales), cfg.max_size)
    image, boxes = _detr_resize(image, boxes, random.choice(cfg.crop_resize_scales), None)
    w = random.randint(cfg.crop_size[0], min(image.width, cfg.crop_size[1]))
    h = random.randint(cfg.crop_size[0], min(image.height, cfg.crop_size[1]))
    i, j, h, w = T.RandomCrop.get_params(image, [h, w])
    image = TF.crop(image, i, j, h, w)
    boxes = torch.min(
        (boxes - torch.tensor([j, i, j, i])).reshape(-1, 2, 2), torch.tensor([w, h])
    ).clamp(min=0)
    boxes = boxes[torch.all(boxes[:, 1, :] > boxes[:, 0, :], dim=1)].reshape(-1, 4)
    return _detr_resize(image, boxes, random.choice(cfg.train_scales), cfg.max_size)


def test_train_transforms_reproduce_the_original_recipe_draw_for_draw():
    transforms = build_train_transforms(SMALL)
    boxes = torch.tensor(
        [[3.0, 4.0, 50.0, 33.0], [20.0, 1.0, 70.0, 60.0], [60.0, 30.0, 79.0, 59.0]]
    )
    image = _random_image(80, 60, seed=3)
    for seed in range(40):
        random.seed(seed)
        torch.manual_seed(seed)
        ref_image, ref_boxes = _detr_train(image, boxes, SMALL)
        random.seed(seed)
        torch.manual_seed(seed)
        out = transforms(DetectionSample.from_xyxy(image, boxes, torch.arange(3)))
        assert out.size == (ref_image.height, ref_image.width)
        torch.testing.assert_close(out.boxes_xyxy, ref_boxes, rtol=0, atol=0)
        reference_pixels = TF.normalize(TF.to_tensor(ref_image), IMAGENET_MEAN, IMAGENET_STD)
        assert torch.equal(out.image, reference_pixels)
        assert len(out.labels) == len(out.boxes)


def test_train_transforms_without_crop_only_flip_and_resize():
    cfg = DataConfig(train_scales=(48,), max_size=100, crop=False)
    out = build_train_transforms(cfg)(_sample(width=60, height=40))
    assert out.size == (48, 72)
    assert torch.all(out.boxes_cxcywh_normalized() >= 0)
    assert torch.all(out.boxes_cxcywh_normalized() <= 1)
