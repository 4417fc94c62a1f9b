# SPDX-License-Identifier: Apache-2.0
import json

import numpy as np
import pytest
from PIL import Image

from detrkit.data.coco import CocoDetection, resolve_split
from detrkit.data.synth import CATEGORY_IDS, write_synthetic_coco

SATURATION_THRESHOLD = 40  # shapes are saturated colours, backgrounds are grey


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_writes_identical_files(tmp_path):
    first = write_synthetic_coco(tmp_path / "a", 12, 4, seed=5)
    second = write_synthetic_coco(tmp_path / "b", 12, 4, seed=5)
    assert _files(first) == _files(second)
    third = write_synthetic_coco(tmp_path / "c", 12, 4, seed=6)
    assert _files(third) != _files(first)


def test_validation_split_does_not_depend_on_train_count(tmp_path):
    small = write_synthetic_coco(tmp_path / "a", 2, 3, seed=1)
    large = write_synthetic_coco(tmp_path / "b", 9, 3, seed=1)
    small_val = (small / "annotations" / "instances_val.json").read_bytes()
    assert small_val == (large / "annotations" / "instances_val.json").read_bytes()


def test_layout_categories_and_variety(tmp_path):
    root = write_synthetic_coco(tmp_path, 60, 5, seed=0, min_size=64, max_size=128)
    for split, count in (("train", 60), ("val", 5)):
        images_dir, annotation = resolve_split(root, split)
        assert images_dir == root / split
        data = json.loads(annotation.read_text())
        assert len(data["images"]) == count
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in data["categories"]] == list(CATEGORY_IDS) == [1, 3, 7]
    sizes = {(im["width"], im["height"]) for im in data["images"]}
    assert all(64 <= w <= 128 and 64 <= h <= 128 for w, h in sizes)
    assert any(w != h for w, h in sizes)
    annotated = {a["image_id"] for a in data["annotations"]}
    num_empty = len(data["images"]) - len(annotated)
    assert 1 <= num_empty <= 15
    assert {a["category_id"] for a in data["annotations"]} == {1, 3, 7}
    assert all(a["iscrowd"] == 0 and a["area"] > 0 for a in data["annotations"])
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    assert {im["file_name"][-4:] for im in data["images"]} == {".png", ".jpg"}


def test_boxes_are_tight_around_visible_shapes(tmp_path):
    root = write_synthetic_coco(tmp_path, 24, 0, seed=2)
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    for image in data["images"]:
        if not image["file_name"].endswith(".png"):  # JPEG blurs edges; PNG is exact
            continue
        pixels = np.asarray(Image.open(root / "train" / image["file_name"]), dtype=np.int32)
        saturated = pixels.max(axis=2) - pixels.min(axis=2) > SATURATION_THRESHOLD
        covered = np.zeros_like(saturated)
        for ann in (a for a in data["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = (int(v) for v in ann["bbox"])
            assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
            region = saturated[y : y + h, x : x + w]
            # every side of the box touches a shape pixel: nothing left to shrink
            assert region[0].any() and region[-1].any()
            assert region[:, 0].any() and region[:, -1].any()
            assert 0.15 * min(image["width"], image["height"]) - 1 <= max(w, h)
            covered[y : y + h, x : x + w] = True
        assert not (saturated & ~covered).any(), image["file_name"]


def test_synthetic_data_loads_with_the_dataset(tmp_path):
    root = write_synthetic_coco(tmp_path, 6, 2, seed=3)
    dataset = CocoDetection(*resolve_split(root, "train"))
    assert len(dataset) == 6
    assert dataset.label_map.category_ids == (1, 3, 7)
    assert dataset.label_map.names == ("circle", "square", "triangle")
    for index in range(len(dataset)):
        pixels, target = dataset[index]
        assert pixels.shape[0] == 3 and target.size == tuple(pixels.shape[1:])
        assert len(target) == dataset.num_annotations(index)
        assert len(target) == 0 or int(target.labels.max()) < 3


def test_bad_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError):
        write_synthetic_coco(tmp_path, 1, 1, seed=0, min_size=100, max_size=50)
