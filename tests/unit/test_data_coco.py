# SPDX-License-Identifier: Apache-2.0
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit.data.coco import CocoDetection, resolve_split
from detrkit.data.labels import LabelMap
from detrkit.data.transforms import denormalize
from detrkit.errors import UserError

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}, {"id": 7, "name": "c"}]


def _image_entry(image_id, width=40, height=30):
    return {"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height}


def _ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": 25.0,
        "iscrowd": iscrowd,
    }


def _write(tmp_path, images, annotations, categories=CATEGORIES, write_images=True):
    """Write images/ and ann.json under tmp_path; returns (images_dir, json_path)."""
    images_dir = tmp_path / "images"
    images_dir.mkdir(exist_ok=True)
    if write_images:
        for entry in images:
            Image.new("RGB", (entry["width"], entry["height"]), (10, 200, 30)).save(
                images_dir / entry["file_name"]
            )
    path = tmp_path / "ann.json"
    data = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data))
    return images_dir, path


def test_resolve_split_custom_layouts(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text("{}")
    (tmp_path / "images").mkdir()
    assert resolve_split(tmp_path, "train")[0] == tmp_path / "images"
    (tmp_path / "images" / "train").mkdir()
    assert resolve_split(tmp_path, "train")[0] == tmp_path / "images" / "train"
    (tmp_path / "train").mkdir()
    images_dir, annotation = resolve_split(tmp_path, "train")
    assert images_dir == tmp_path / "train"
    assert annotation == tmp_path / "annotations" / "instances_train.json"


def test_resolve_split_coco2017_and_fallback(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{}")
    (tmp_path / "val2017").mkdir()
    expected = (tmp_path / "val2017", tmp_path / "annotations" / "instances_val2017.json")
    assert resolve_split(tmp_path, "val2017") == expected
    assert resolve_split(tmp_path, "val") == expected


def test_resolve_split_lists_what_it_looked_for(tmp_path):
    with pytest.raises(UserError) as info:
        resolve_split(tmp_path, "train")
    message = str(info.value)
    assert "instances_train.json" in message and "instances_train2017.json" in message


def test_targets_follow_spec_a1(tmp_path, caplog):
    images = [_image_entry(1), _image_entry(2), _image_entry(5, width=20, height=50)]
    annotations = [
        _ann(10, 1, 7, [4.0, 3.0, 10.0, 6.0]),
        _ann(11, 1, 1, [30.0, 20.0, 20.0, 20.0]),  # clamped to (30, 20, 40, 30)
        _ann(12, 1, 3, [5.0, 5.0, 5.0, 5.0], iscrowd=1),  # crowd: left out
        _ann(13, 1, 3, [5.0, 5.0, 0.0, 5.0]),  # zero width: skipped
        _ann(14, 5, 3, [25.0, 5.0, 5.0, 5.0]),  # outside the 20-wide image: skipped
        _ann(15, 5, 1, [2.0, 4.0, -3.0, 5.0]),  # negative width: skipped
    ]
    images_dir, path = _write(tmp_path, images, annotations)
    with caplog.at_level(logging.WARNING, logger="detrkit.data.coco"):
        dataset = CocoDetection(images_dir, path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "ann.json" in warnings[0] and "skipped 3" in warnings[0]
    assert "13" in warnings[0] and "14" in warnings[0] and "15" in warnings[0]

    assert dataset.label_map.category_ids == (1, 3, 7)
    assert dataset.image_ids == [1, 2, 5]
    assert dataset.coco_json == path
    np.testing.assert_allclose(dataset.aspect_ratios(), [40 / 30, 40 / 30, 20 / 50])

    pixels, target = dataset[0]
    assert pixels.shape == (3, 30, 40)
    assert target.image_id == 1 and target.orig_size == (30, 40) and target.size == (30, 40)
    torch.testing.assert_close(target.labels, torch.tensor([2, 0]))
    expected_xyxy = torch.tensor([[4.0, 3.0, 14.0, 9.0], [30.0, 20.0, 40.0, 30.0]])
    expected = torch.stack(
        [
            (expected_xyxy[:, 0] + expected_xyxy[:, 2]) / 2 / 40,
            (expected_xyxy[:, 1] + expected_xyxy[:, 3]) / 2 / 30,
            (expected_xyxy[:, 2] - expected_xyxy[:, 0]) / 40,
            (expected_xyxy[:, 3] - expected_xyxy[:, 1]) / 30,
        ],
        dim=1,
    )
    torch.testing.assert_close(target.boxes, expected)
    torch.testing.assert_close(denormalize(pixels)[:, 0, 0], torch.tensor([10, 200, 30]) / 255)

    for index in (1, 2):  # images without (valid) annotations are kept, with empty targets
        _, empty = dataset[index]
        assert empty.boxes.shape == (0, 4) and empty.labels.shape == (0,)


def test_given_label_map_is_used(tmp_path):
    images_dir, path = _write(tmp_path, [_image_entry(1)], [_ann(1, 1, 3, [0, 0, 5, 5])])
    dataset = CocoDetection(images_dir, path, label_map=LabelMap((3, 5), ("b", "x")))
    assert dataset[0][1].labels.tolist() == [0]
    with pytest.raises(UserError, match="label map"):
        CocoDetection(images_dir, path, label_map=LabelMap((1, 7), ("a", "c")))


def test_malformed_json_names_file_and_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"images": [],\n  "annotations": [,]}')
    with pytest.raises(UserError) as info:
        CocoDetection(tmp_path, path)
    assert "broken.json" in str(info.value) and "line 2" in str(info.value)


def test_missing_keys_are_named(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(UserError, match=r"partial\.json.*annotations"):
        CocoDetection(tmp_path, path)


def test_unknown_category_names_file_and_annotation(tmp_path):
    images_dir, path = _write(tmp_path, [_image_entry(1)], [_ann(42, 1, 2, [0, 0, 5, 5])])
    with pytest.raises(UserError) as info:
        CocoDetection(images_dir, path)
    message = str(info.value)
    assert "ann.json" in message and "annotation id 42" in message and "categories" in message


def test_unknown_image_id_names_file_and_annotation(tmp_path):
    images_dir, path = _write(tmp_path, [_image_entry(1)], [_ann(43, 9, 1, [0, 0, 5, 5])])
    with pytest.raises(UserError) as info:
        CocoDetection(images_dir, path)
    message = str(info.value)
    assert "ann.json" in message and "annotation id 43" in message and "image_id 9" in message


def test_bad_image_entry_raises(tmp_path):
    _, path = _write(tmp_path, [{"id": 1, "file_name": "x.png"}], [], write_images=False)
    with pytest.raises(UserError, match=r"ann\.json.*images\[0\]"):
        CocoDetection(tmp_path, path)


@pytest.mark.parametrize(
    "bbox",
    [[0, 0, 5], [0, 0, "5", 5], None, [[0, 0], 5, 5, 5]],
    ids=["short", "str", "none", "ragged"],
)
def test_bad_bbox_names_file_and_annotation(tmp_path, bbox):
    good = _ann(1, 1, 1, [0, 0, 5, 5])
    bad = _ann(44, 1, 1, [0, 0, 5, 5])
    bad["bbox"] = bbox
    _, path = _write(tmp_path, [_image_entry(1)], [good, bad], write_images=False)
    with pytest.raises(UserError, match=r"ann\.json: annotation id 44"):
        CocoDetection(tmp_path, path)


def test_missing_image_names_path_and_id(tmp_path):
    images_dir, path = _write(tmp_path, [_image_entry(77)], [], write_images=False)
    dataset = CocoDetection(images_dir, path)  # images are not opened at load time
    with pytest.raises(UserError) as info:
        dataset[0]
    assert "77.png" in str(info.value) and "image id 77" in str(info.value)


def test_corrupt_image_names_path_and_id(tmp_path):
    images_dir, path = _write(tmp_path, [_image_entry(78)], [], write_images=False)
    (images_dir / "78.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(UserError) as info:
        CocoDetection(images_dir, path)[0]
    assert "78.png" in str(info.value) and "image id 78" in str(info.value)


def _palette_image():
    image = Image.new("P", (40, 30), 1)
    image.putpalette([0, 0, 0, 9, 8, 7])
    return image


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("L", (40, 30), 128), (128, 128, 128)),
        (lambda: Image.new("RGBA", (40, 30), (1, 2, 3, 0)), (1, 2, 3)),
        (lambda: Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)), (156, 156, 156)),
        (_palette_image, (9, 8, 7)),
    ],
    ids=["gray", "rgba", "16bit", "palette"],
)
def test_image_modes_become_rgb(tmp_path, make, expected):
    images_dir, path = _write(tmp_path, [_image_entry(1)], [], write_images=False)
    make().save(images_dir / "1.png")
    pixels, target = CocoDetection(images_dir, path)[0]
    assert pixels.shape == (3, 30, 40) and target.orig_size == (30, 40)
    rgb = denormalize(pixels)[:, 0, 0] * 255
    torch.testing.assert_close(rgb, torch.tensor(expected, dtype=torch.float32), atol=1e-3, rtol=0)


def _save_with_orientation(path: Path, size, orientation: int) -> None:
    image = Image.new("RGB", size, (50, 60, 70))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif)


def test_exif_rotation_applied_when_json_matches_rotated(tmp_path):
    images_dir, path = _write(
        tmp_path,
        [_image_entry(1, width=30, height=40)],
        [_ann(1, 1, 1, [0, 0, 30, 40])],
        write_images=False,
    )
    _save_with_orientation(images_dir / "1.png", (40, 30), orientation=6)  # stored 40x30
    _, target = CocoDetection(images_dir, path)[0]
    assert target.orig_size == (40, 30)


def test_exif_ignored_when_json_matches_stored_pixels(tmp_path):
    images_dir, path = _write(tmp_path, [_image_entry(1)], [], write_images=False)
    _save_with_orientation(images_dir / "1.png", (40, 30), orientation=6)
    _, target = CocoDetection(images_dir, path)[0]
    assert target.orig_size == (30, 40)


def test_size_mismatch_warns_and_clamps_to_loaded_image(tmp_path, caplog):
    images_dir, path = _write(
        tmp_path,
        [_image_entry(1, width=40, height=30)],
        [_ann(1, 1, 1, [10, 5, 30, 20])],
        write_images=False,
    )
    Image.new("RGB", (20, 30)).save(images_dir / "1.png")
    with caplog.at_level(logging.WARNING, logger="detrkit.data.coco"):
        _, target = CocoDetection(images_dir, path)[0]
    assert any("1.png" in r.getMessage() for r in caplog.records)
    assert target.orig_size == (30, 20)
    torch.testing.assert_close(target.boxes, torch.tensor([[0.75, 0.5, 0.5, 20 / 30]]))
