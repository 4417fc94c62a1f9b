# SPDX-License-Identifier: Apache-2.0
import json

import numpy as np
import pytest
from PIL import Image

from detrkit.data.coco import CocoDetection, resolve_split
from detrkit.data.synth_crowded import CATEGORY_IDS, CLASSES, COLOURS, write_crowded_coco

COLOUR_TOLERANCE = 40  # a shape pixel lies within its base colour's jitter


def _annotations(root, split="train"):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    return write_crowded_coco(tmp_path_factory.mktemp("crowded"), 40, 4, seed=0)


def test_same_arguments_write_identical_files(tmp_path):
    first = write_crowded_coco(tmp_path / "a", 3, 2, seed=1)
    second = write_crowded_coco(tmp_path / "b", 3, 2, seed=1)
    for path in first.rglob("*"):
        if path.is_file():
            assert path.read_bytes() == (second / path.relative_to(first)).read_bytes()
    assert _annotations(write_crowded_coco(tmp_path / "c", 3, 2, seed=2)) != _annotations(first)


def test_statistics_are_coco_like(crowded):
    data = _annotations(crowded)
    counts = np.bincount([a["image_id"] for a in data["annotations"]], minlength=41)[1:]
    assert counts.mean() >= 7 and counts.max() >= 12
    labels = [CATEGORY_IDS.index(a["category_id"]) for a in data["annotations"]]
    frequency = np.bincount(labels, minlength=len(CLASSES))
    assert len(CLASSES) >= 10 and (frequency > 0).all()
    assert frequency[0] > 4 * frequency[-1]  # long tail
    sides = np.array([np.sqrt(a["bbox"][2] * a["bbox"][3]) for a in data["annotations"]])
    shorter = {im["id"]: min(im["width"], im["height"]) for im in data["images"]}
    relative = sides / np.array([shorter[a["image_id"]] for a in data["annotations"]])
    assert np.median(relative) < 0.15 and relative.max() > 0.3  # mostly small, a few large
    assert [c["id"] for c in data["categories"]] == list(CATEGORY_IDS)


def test_boxes_hold_the_visible_pixels_of_their_colour(crowded):
    data = _annotations(crowded)
    for image in data["images"][:10]:
        pixels = np.asarray(Image.open(crowded / "train" / image["file_name"]), dtype=np.int32)
        for ann in (a for a in data["annotations"] if a["image_id"] == image["id"]):
            x, y, w, h = (int(v) for v in ann["bbox"])
            assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
            colour = COLOURS[CLASSES[CATEGORY_IDS.index(ann["category_id"])][0]]
            region = pixels[y : y + h, x : x + w]
            near = (np.abs(region - np.asarray(colour)).max(axis=2) <= COLOUR_TOLERANCE).sum()
            assert near >= ann["area"]  # the visible pixels are inside the box, in colour
            assert 0 < ann["area"] <= w * h


def test_scenes_are_crowded(crowded):
    data = _annotations(crowded)
    overlapping = 0
    for image in data["images"]:
        boxes = np.array([a["bbox"] for a in data["annotations"] if a["image_id"] == image["id"]])
        if len(boxes) < 2:
            continue
        x0, y0, x1, y1 = (
            boxes[:, 0],
            boxes[:, 1],
            boxes[:, 0] + boxes[:, 2],
            boxes[:, 1] + boxes[:, 3],
        )
        wide = np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None])
        high = np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None])
        overlapping += int(np.triu((wide > 0) & (high > 0), 1).sum())
    assert overlapping >= len(data["images"])  # on average one overlapping pair per image


def test_loads_with_the_dataset(crowded):
    dataset = CocoDetection(*resolve_split(crowded, "val"))
    assert dataset.label_map.category_ids == CATEGORY_IDS
    assert dataset.label_map.names[0] == "red circle"
    _, target = dataset[0]
    assert len(target) == dataset.num_annotations(0)


def test_bad_sizes_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="min_size"):
        write_crowded_coco(tmp_path, 1, 1, seed=0, min_size=200, max_size=100)


def test_cli_writes_the_crowded_kind(tmp_path):
    from detrkit.cli.__main__ import main

    argv = ["data", "synth", "--kind", "crowded", "--out", str(tmp_path), "--num-train", "2"]
    assert main([*argv, "--num-val", "1", "--seed", "4"]) == 0
    assert _annotations(tmp_path)["categories"][0]["name"] == "red circle"
    assert _annotations(tmp_path) == _annotations(write_crowded_coco(tmp_path / "b", 2, 1, seed=4))
