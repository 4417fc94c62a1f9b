# SPDX-License-Identifier: Apache-2.0
"""Large-scale jitter (detrkit/data/lsj.py): sizes, boxes, empty crops, seeding, config."""

import random

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from detrkit.config.load import config_from_mapping
from detrkit.config.schema import DataConfig
from detrkit.data.lsj import PAD_VALUE, lsj_eval_size
from detrkit.data.samplers import SeededDataset
from detrkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectionSample,
    build_eval_transforms,
    build_train_transforms,
)
from detrkit.errors import UserError

SIZE = 64
LSJ = DataConfig(augmentation="lsj", lsj_size=SIZE)


def _sample(width: int = 100, height: int = 60, boxes=None, labels=None) -> DetectionSample:
    image = Image.new("RGB", (width, height), (200, 30, 90))
    if boxes is None:
        boxes, labels = [[10.0, 10.0, 50.0, 40.0], [80.0, 5.0, 99.0, 59.0]], [1, 2]
    return DetectionSample.from_xyxy(
        image, torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels)
    )


class _OneImage(Dataset):
    """Applies the LSJ train transform to a fresh copy of one sample."""

    def __init__(self, cfg: DataConfig) -> None:
        self.transforms = build_train_transforms(cfg)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> DetectionSample:
        return self.transforms(_sample())


def _seeded(seed: int, cfg: DataConfig = LSJ) -> DetectionSample:
    return SeededDataset(_OneImage(cfg))[(0, seed)]


@pytest.mark.parametrize("seed", range(12))
def test_train_output_is_the_padded_canvas_with_boxes_inside(seed):
    out = _seeded(seed)
    assert tuple(out.image.shape) == (3, SIZE, SIZE)
    assert out.boxes.canvas_size == (SIZE, SIZE)
    boxes = out.boxes_xyxy
    assert len(boxes) == len(out.labels)
    assert (boxes >= 0).all() and (boxes <= SIZE).all()
    assert (boxes[:, 2:] - boxes[:, :2] >= 1e-2).all()
    norm = out.boxes_cxcywh_normalized()
    assert (norm >= 0).all() and (norm <= 1).all()
    # cxcywh-n of the canvas: centre +- half size gives back the absolute xyxy boxes.
    xyxy = torch.cat((norm[:, :2] - norm[:, 2:] / 2, norm[:, :2] + norm[:, 2:] / 2), dim=-1)
    torch.testing.assert_close(xyxy * SIZE, boxes, atol=1e-4, rtol=0)


def test_padding_is_gray_114_and_image_content_sits_top_left():
    cfg = DataConfig(augmentation="lsj", lsj_size=SIZE, lsj_scale_range=(0.3, 0.3))
    out = SeededDataset(_OneImage(cfg))[(0, 0)]
    # 100 x 60 at scale 0.3 x min(64/60, 64/100): longer side 19, so almost all is padding.
    gray = torch.tensor(PAD_VALUE) / 255.0
    expected = (gray - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out.image[:, -1, -1], expected)
    assert not torch.allclose(out.image[:, 0, 0], expected)


def test_sizes_stay_within_the_canvas_before_padding():
    # Scale up to 2x the fit: the jittered image is up to 128 px long, the crop at most 64.
    cfg = DataConfig(augmentation="lsj", lsj_size=SIZE, lsj_scale_range=(2.0, 2.0))
    out = SeededDataset(_OneImage(cfg))[(0, 5)]
    assert tuple(out.image.shape) == (3, SIZE, SIZE)


def test_empty_after_crop_is_kept_well_formed():
    cfg = DataConfig(augmentation="lsj", lsj_size=SIZE, lsj_scale_range=(2.0, 2.0))
    transforms = build_train_transforms(cfg)
    empty = 0
    for seed in range(20):
        torch.manual_seed(seed)
        random.seed(seed)
        # A 64 x 64 image jittered to 128 x 128; the corner box survives few crops.
        out = transforms(_sample(64, 64, [[0.0, 0.0, 4.0, 4.0]], [3]))
        assert out.boxes_xyxy.shape[1] == 4 and len(out.labels) == len(out.boxes_xyxy)
        assert tuple(out.image.shape) == (3, SIZE, SIZE)
        empty += len(out.labels) == 0
    assert empty > 0


def test_image_without_annotations_passes():
    out = build_train_transforms(LSJ)(_sample(boxes=[], labels=[]))
    assert out.boxes_xyxy.shape == (0, 4) and out.labels.shape == (0,)
    assert out.boxes_cxcywh_normalized().shape == (0, 4)


def test_same_sample_seed_same_augmentation_other_seed_differs():
    first, again = _seeded(123), _seeded(123)
    torch.testing.assert_close(first.image, again.image)
    torch.testing.assert_close(first.boxes_xyxy, again.boxes_xyxy)
    others = [_seeded(seed) for seed in (1, 2, 3, 4)]
    assert any(
        o.boxes_xyxy.shape != first.boxes_xyxy.shape
        or not torch.allclose(o.boxes_xyxy, first.boxes_xyxy)
        for o in others
    )


def test_eval_resizes_the_longer_side_and_does_not_pad():
    out = build_eval_transforms(LSJ)(_sample())
    assert tuple(out.image.shape) == (3, 38, SIZE)  # 60 x 64/100 = 38.4 -> 38
    assert lsj_eval_size(60, 100, SIZE) == (38, 64)
    assert lsj_eval_size(1000, 500, 1024) == (1024, 512)
    torch.testing.assert_close(
        out.boxes_xyxy[0], torch.tensor([6.4, 10 * 38 / 60, 32.0, 40 * 38 / 60])
    )


def test_defaults_keep_the_detr_recipe():
    assert DataConfig().augmentation == "detr"
    assert "ScaleJitter" not in repr(build_train_transforms(DataConfig()))
    assert "ScaleJitter" in repr(build_train_transforms(LSJ))


@pytest.mark.parametrize(
    "data, match",
    [
        ({"augmentation": "jitter"}, "augmentation"),
        ({"lsj_size": 0}, "lsj_size"),
        ({"lsj_scale_range": [2.0, 0.1]}, "lsj_scale_range"),
        ({"lsj_scale_range": [0.0, 2.0]}, "lsj_scale_range"),
        ({"lsj_scale_range": [0.1]}, "lsj_scale_range"),
    ],
)
def test_bad_lsj_config_is_refused(data, match):
    with pytest.raises(UserError, match=match):
        config_from_mapping({"data": data}, source="test.yaml")


def test_lsj_config_loads():
    data = {"augmentation": "lsj", "lsj_size": 1024, "lsj_scale_range": [0.1, 2.0]}
    cfg = config_from_mapping({"data": data}, source="test.yaml")
    assert cfg.data.augmentation == "lsj" and cfg.data.lsj_scale_range == (0.1, 2.0)
