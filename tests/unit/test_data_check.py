# SPDX-License-Identifier: Apache-2.0
"""``detrkit data check`` (detrkit/data/lint/) and the start-up check in ``open_split``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detrkit.cli.__main__ import main
from detrkit.config.schema import DataConfig
from detrkit.data.lint import Finding, LintReport, check_dataset, missing_files
from detrkit.data.synth import write_synthetic_coco
from detrkit.engine.data import open_split
from detrkit.errors import UserError

# write_synthetic_coco(num_train=8, seed=0): 000002.png has no annotations, 000004.jpg and
# 000008.jpg are JPEGs, image 7 (126x80) has one annotation (id 15), image 1 (119x105) one (id 1).
EMPTY_IMAGE = "000002.png"


@pytest.fixture
def root(tmp_path) -> Path:
    return write_synthetic_coco(tmp_path / "coco", num_train=8, num_val=0, seed=0)


def _json_path(root: Path) -> Path:
    return root / "annotations" / "instances_train.json"


def _edit_json(root: Path, edit) -> None:
    path = _json_path(root)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _ann(data: dict, ann_id: int) -> dict:
    return next(a for a in data["annotations"] if a["id"] == ann_id)


def _image(data: dict, image_id: int) -> dict:
    return next(i for i in data["images"] if i["id"] == image_id)


def _only(report: LintReport, code: str) -> Finding:
    found = report.findings(code)
    assert len(found) == 1, [f.code for s in report.splits for f in s.findings]
    return found[0]


def _codes(report: LintReport) -> set[str]:
    return {f.code for split in report.splits for f in split.findings}


def test_clean_dataset_passes(root):
    report = check_dataset(root)
    assert [s.split for s in report.splits] == ["train", "val"]
    assert not report.has_errors
    assert _codes(report) == {"empty_image", "unused_category"}  # val has no annotations
    empty = _only(report, "empty_image")
    assert (empty.severity, empty.count, empty.examples) == ("warning", 1, [EMPTY_IMAGE])
    assert main(["data", "check", str(root)]) == 0


def test_missing_and_corrupt_images(root):
    (root / "train" / "000003.png").unlink()
    for name in ("000004.jpg", "000005.png"):
        data = (root / "train" / name).read_bytes()
        (root / "train" / name).write_bytes(data[: len(data) // 2])
    report = check_dataset(root, ["train"])
    missing, corrupt = _only(report, "missing_image"), _only(report, "corrupt_image")
    assert (missing.severity, missing.count, missing.examples) == ("error", 1, ["000003.png"])
    assert (corrupt.severity, corrupt.count) == ("error", 2)
    assert [e.split(":")[0] for e in corrupt.examples] == ["000004.jpg", "000005.png"]
    shallow = check_dataset(root, ["train"], open_images=False)
    assert _only(shallow, "missing_image").count == 1
    assert not shallow.findings("corrupt_image")


def test_image_modes_are_warnings(root):
    def rewrite(name: str, mode: str, dtype=np.uint8) -> None:
        size = Image.open(root / "train" / name).size
        channels = {"L": (), "RGBA": (4,), "I;16": ()}[mode]
        pixels = np.full((size[1], size[0], *channels), 200, dtype=dtype)
        Image.fromarray(pixels, mode=None if mode == "I;16" else mode).save(root / "train" / name)

    rewrite("000001.png", "L")
    rewrite("000005.png", "RGBA")
    rewrite("000006.png", "I;16", np.uint16)
    report = check_dataset(root, ["train"])
    assert not report.has_errors
    for code, name in (("grayscale", "000001"), ("rgba", "000005"), ("sixteen_bit", "000006")):
        finding = _only(report, code)
        assert (finding.severity, finding.count) == ("warning", 1)
        assert finding.examples[0].startswith(name)
        assert "loader" in finding.message


def test_exif_rotation_and_size_mismatch(root):
    # 000008.jpg is 97x106 in the file: store it on its side with EXIF "rotate 90° CW" (6).
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (106, 97), (90, 90, 90)).save(root / "train" / "000008.jpg", exif=exif)
    _edit_json(root, lambda data: _image(data, 7).update(width=130))  # the file is 126x80
    report = check_dataset(root, ["train"])
    rotated, mismatch = _only(report, "exif_rotated"), _only(report, "size_mismatch")
    assert (rotated.severity, rotated.count) == ("warning", 1)
    assert rotated.examples == ["000008.jpg (orientation 6)"]
    assert (mismatch.severity, mismatch.count) == ("error", 1)
    assert mismatch.examples == ["000007.png: file 126x80, annotation 130x80"]


def _set(ann_id: int, **changes):
    return lambda data: _ann(data, ann_id).update(changes)


ANNOTATION_CASES = [
    (lambda d: _image(d, 8).update(id=7), "duplicate_image_id", "error", 1, "id 7 (2 times)"),
    (_set(12, id=11), "duplicate_annotation_id", "error", 1, "id 11 (2 times)"),
    (_set(9, category_id=99), "unknown_category", "error", 1, "id 9: category_id 99"),
    (_set(9, image_id=42), "unknown_image_id", "error", 1, "annotation id 9: image_id 42"),
    (_set(5, bbox=[41.0, 45.0, 0.0, 22.0]), "degenerate_box", "warning", 1, "annotation id 5"),
    # 1 of 16 boxes reaches outside: above SYSTEMATIC_FRACTION, so an error
    (_set(1, bbox=[100.0, 60.0, 44.0, 44.0]), "box_outside_image", "error", 1, "000001.png"),
    (lambda d: d["annotations"].remove(_ann(d, 15)), "empty_image", "warning", 2, EMPTY_IMAGE),
    (_set(15, iscrowd=1), "crowd", "info", 1, "annotation id 15"),
    (lambda d: _ann(d, 3).pop("bbox"), "malformed_entry", "error", 1, "annotations[2]"),
    (lambda d: d["categories"].append({"id": 1}), "bad_categories", "error", 1, "more than"),
]


@pytest.mark.parametrize(
    ("edit", "code", "severity", "count", "example"),
    ANNOTATION_CASES,
    ids=[case[1] for case in ANNOTATION_CASES],
)
def test_annotation_findings(root, edit, code, severity, count, example):
    _edit_json(root, edit)
    finding = _only(check_dataset(root, ["train"], open_images=False), code)
    assert (finding.severity, finding.count) == (severity, count)
    assert example in finding.examples[0]


def test_few_boxes_outside_is_a_warning(tmp_path):
    root = write_synthetic_coco(tmp_path, num_train=40, num_val=0, seed=0)
    _edit_json(root, _set(1, bbox=[100.0, 60.0, 44.0, 44.0]))
    finding = _only(check_dataset(root, ["train"], open_images=False), "box_outside_image")
    assert (finding.severity, finding.count) == ("warning", 1)


def test_unreadable_annotation_file(root):
    _json_path(root).write_text("{")
    finding = _only(check_dataset(root, ["train"]), "unreadable_annotations")
    assert finding.severity == "error"
    assert "not valid JSON" in finding.examples[0]


def test_single_json_file_finds_its_images(root, tmp_path):
    report = check_dataset(_json_path(root))
    assert [(s.split, s.images_dir) for s in report.splits] == [("train", str(root / "train"))]
    assert not report.has_errors
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    argv = ["data", "check", str(_json_path(root)), "--images-dir", str(elsewhere)]
    assert main([*argv, "--no-images"]) == 1  # every image is missing there


def test_missing_images_folder(root):
    shutil.rmtree(root / "train")
    finding = _only(check_dataset(root, ["train"]), "missing_images_dir")
    assert finding.severity == "error"


def test_cli_exit_codes_and_reports(root, tmp_path, capsys):
    (root / "train" / "000003.png").unlink()
    out = tmp_path / "report.json"
    assert main(["data", "check", str(root), "--no-images", "--json", str(out)]) == 1
    text = capsys.readouterr().out
    assert "missing_image" in text and "000003.png" in text and "FAILED" in text
    saved = json.loads(out.read_text())
    assert saved["ok"] is False and saved["images_opened"] is False
    codes = [f["code"] for f in saved["splits"][0]["findings"]]
    assert codes[0] == "missing_image"
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    assert main(["data", "check", str(root), "--split", "test"]) == 2


def test_missing_files_nested_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").touch()
    (tmp_path / "y.png").touch()
    names = ["a/x.png", "y.png", "a/z.png", "b/x.png"]
    assert missing_files(tmp_path, names).tolist() == [False, False, True, True]


def test_open_split_refuses_unknown_category(root):
    _edit_json(root, _set(9, category_id=99))
    with pytest.raises(UserError, match="detrkit data check") as error:
        open_split(DataConfig(root=str(root)), "train", train=False)
    assert "instances_train.json" in str(error.value)
    assert "category_id 99" in str(error.value)


def test_open_split_startup_check(root, caplog):
    with caplog.at_level(logging.WARNING, logger="detrkit.data.lint"):
        dataset = open_split(DataConfig(root=str(root)), "train", train=False)
    assert len(dataset) == 8
    assert not caplog.records  # an empty image is an ordinary negative: no start-up warning
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    coco["annotations"][0]["bbox"][2] = 1_000.0  # one box reaching far beyond its image
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    with caplog.at_level(logging.WARNING, logger="detrkit.data.lint"):
        open_split(DataConfig(root=str(root)), "train", train=False)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("1 box_outside_image" in m for m in messages) == 1, messages
    (root / "train" / "000003.png").unlink()
    with pytest.raises(UserError, match="1 missing_image .*000003.png.*detrkit data check"):
        open_split(DataConfig(root=str(root)), "train", train=False)
