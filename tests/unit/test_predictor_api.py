# SPDX-License-Identifier: Apache-2.0
"""The public Python API: ``from detrkit import Predictor, load_model``; every input type gives
the same typed, named detections; the predict command keeps same-named inputs apart."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import detrkit
from detrkit.cli.__main__ import main
from detrkit.config.validate import config_to_dict
from detrkit.data.labels import LabelMap
from detrkit.engine.checkpoint import CheckpointMeta, save_checkpoint
from tests.conftest import TINY_MODEL_OVERRIDES

TINY = [
    *TINY_MODEL_OVERRIDES,
    "data.val_size=64",
    "data.max_size=96",
]


@pytest.fixture(scope="module")
def weights_file(synthetic_coco, tmp_path_factory):
    """An untrained detr_tiny saved as a weights file with the dataset's label map."""
    categories = json.loads((synthetic_coco / "annotations" / "instances_val.json").read_text())
    label_map = LabelMap.from_coco_categories(categories["categories"])
    cfg = detrkit.load_config("detr_tiny", TINY)
    torch.manual_seed(0)
    model = detrkit.build_model(cfg.model, label_map.num_classes)
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    meta = CheckpointMeta(config=config_to_dict(cfg), label_map=label_map)
    save_checkpoint(path, model=model.state_dict(), meta=meta)
    return path


@pytest.fixture(scope="module")
def predictor(weights_file):
    return detrkit.Predictor.from_checkpoint(weights_file, device="cpu")


def _val_images(synthetic_coco, count):
    return sorted((synthetic_coco / "val").iterdir())[:count]


def _assert_same(a: detrkit.Prediction, b: detrkit.Prediction) -> None:
    assert torch.equal(a.boxes_xyxy, b.boxes_xyxy) and torch.equal(a.scores, b.scores)
    assert torch.equal(a.category_ids, b.category_ids) and a.names == b.names


def test_public_names_import_lazily_without_torch():
    code = "import sys, detrkit; print(detrkit.__version__, 'torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [detrkit.__version__, "False"]
    for name in ("Predictor", "Prediction", "load_model", "load_config", "build_model", "Trainer"):
        assert name in detrkit.__all__ and getattr(detrkit, name).__name__ == name
    with pytest.raises(AttributeError):
        detrkit.no_such_name  # noqa: B018


def test_every_input_type_gives_the_same_detections(predictor, synthetic_coco):
    path = _val_images(synthetic_coco, 1)[0]
    image = Image.open(path).convert("RGB")
    array = np.asarray(image)
    as_uint8 = torch.from_numpy(array.copy()).permute(2, 0, 1)
    expected = predictor(path)
    assert isinstance(expected, detrkit.Prediction) and len(expected) > 0
    for same in (str(path), image, array, as_uint8, as_uint8.float() / 255):
        _assert_same(predictor(same), expected)
    # typed, named output in the image's own pixels
    assert expected.boxes_xyxy.shape == (len(expected), 4)
    assert expected.boxes_xyxy[:, 2:].max() <= max(image.size) + 1e-3
    assert set(expected.names) <= set(predictor.label_map.names)
    assert expected.category_ids.dtype == torch.int64


def test_a_list_of_different_sizes_equals_one_image_at_a_time(predictor, synthetic_coco):
    paths = _val_images(synthetic_coco, 3)
    small = Image.open(paths[0]).convert("RGB").resize((50, 90))  # another aspect ratio
    inputs = [paths[1], small, paths[2]]
    together = predictor(inputs)
    assert isinstance(together, list) and len(together) == 3
    for item, found in zip(inputs, together, strict=True):
        _assert_same(found, predictor(item))
    _assert_same(predictor([paths[1]])[0], together[0])


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (np.zeros((8, 8), dtype=np.uint8), "HxWx3 uint8"),
        (np.zeros((8, 8, 3), dtype=np.float32), "HxWx3 uint8"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), "3xHxW"),
        (torch.full((3, 8, 8), 2.0), "outside \\[0, 1\\]"),
        (42, "is a int"),
        ([], "empty list"),
        ("/no/such/image.jpg", "/no/such/image.jpg does not exist"),
    ],
)
def test_unsupported_inputs_are_user_errors(predictor, bad, needle):
    with pytest.raises(detrkit.UserError, match=needle):
        predictor(bad)


def test_load_model_reads_a_weights_file(weights_file):
    loaded = detrkit.load_model(weights_file)
    assert loaded.weights == "raw" and loaded.path == weights_file
    assert loaded.label_map.num_classes == 3 and not loaded.model.training
    with pytest.raises(detrkit.UserError, match="no detrkit checkpoint"):
        detrkit.load_model(weights_file.parent / "empty_folder_that_is_missing")


def test_predict_keeps_same_named_inputs_apart(weights_file, synthetic_coco, tmp_path):
    source = _val_images(synthetic_coco, 2)
    for folder, image in zip(("a", "b"), source):
        (tmp_path / "in" / folder).mkdir(parents=True)
        Image.open(image).save(tmp_path / "in" / folder / "x.png")
    out = tmp_path / "out"
    argv = ["predict", str(tmp_path / "in" / "a"), str(tmp_path / "in" / "b" / "x.png")]
    argv += ["--checkpoint", str(weights_file), "--output-dir", str(out), "--device", "cpu"]
    assert main([*argv, "--score-threshold", "0"]) == 0
    drawn = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert drawn == ["a/x.png", "b/x.png"]
    records = json.loads((out / "predictions.json").read_text())
    assert {r["file_name"] for r in records} == {"a/x.png", "b/x.png"}


def test_predict_a_missing_image_fails_before_loading_the_model(tmp_path, capsys):
    missing = tmp_path / "nope.jpg"
    argv = ["predict", str(missing), "--checkpoint", str(tmp_path / "no_model.safetensors")]
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{missing} does not exist" in err[0]
    assert not (tmp_path / "out").exists()
