# SPDX-License-Identifier: Apache-2.0
"""``detrkit export --format onnx``: for DETR, Deformable DETR (two-stage + refinement), DINO and
SMCA the command writes a graph that onnxruntime runs to ``Predictor``'s detections on a real
image it was not traced with (a dynamic graph at other sizes and batch sizes too), with the label
map in its metadata; a failing parity check exits non-zero and leaves no file; a missing
onnxruntime is a clear error."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import detrkit
from detrkit.cli.__main__ import main
from detrkit.config.validate import config_to_dict
from detrkit.data.labels import LabelMap
from detrkit.data.transforms import DetectionSample
from detrkit.engine.checkpoint import CheckpointMeta, save_checkpoint
from tests.conftest import TINY_MODEL_OVERRIDES

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
onnx = pytest.importorskip("onnx", reason="onnx is not installed")
pytest.importorskip("onnxscript", reason="onnxscript (the dynamo exporter's) is not installed")

TINY = [*TINY_MODEL_OVERRIDES, "data.val_size=64", "data.max_size=96"]
SMCA = ["model.decoder.attention=smca", "model.loss.class_loss=sigmoid_focal", "model.top_k=20"]
FAMILIES = {
    "detr": ("detr_tiny", []),
    "deformable_two_stage_refine": ("deformable_detr_tiny", []),
    "dino": ("dino_tiny", []),
    "smca": ("detr_tiny", SMCA),
}
# An image of 96 x 72 (w x h) becomes 85 x 64 after the eval transforms (val_size 64).
TRACED = (64, 85)
TOLERANCE = 1e-4


def _checkpoint(tmp_path, preset: str, overrides: list[str]):
    """An untrained model of ``preset`` saved as a detrkit weights file (5 labels)."""
    cfg = detrkit.load_config(preset, [*TINY, *overrides])
    torch.manual_seed(0)
    label_map = LabelMap(tuple(range(1, 6)), tuple(f"class{i}" for i in range(5)))
    model = detrkit.build_model(cfg.model, label_map.num_classes)
    path = tmp_path / "model.safetensors"
    save_checkpoint(
        path, model=model.state_dict(), meta=CheckpointMeta(config_to_dict(cfg), label_map)
    )
    return path


def _image(synthetic_coco, index: int, size: tuple[int, int]) -> Image.Image:
    """A synthetic val image resized to ``size`` (w, h)."""
    path = sorted((synthetic_coco / "val").iterdir())[index]
    return Image.open(path).convert("RGB").resize(size)


def _graph_inputs(predictor: detrkit.Predictor, images: list[Image.Image]):
    """What a deployer feeds the graph: eval-transformed pixels and the original sizes."""
    pixels = []
    for image in images:
        empty = DetectionSample.from_xyxy(
            image, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)
        )
        pixels.append(predictor.transforms(empty).image)
    sizes = np.array([[im.height, im.width] for im in images], dtype=np.int64)
    return {"pixels": torch.stack(pixels).numpy(), "orig_sizes": sizes}


def _assert_matches(prediction: detrkit.Prediction, boxes, scores, labels, label_map, size):
    """Every onnxruntime detection pairs with a distinct Predictor one: the same category, score
    and box within the tolerance (boxes as fractions of the image size). Pairing, rather than
    comparing position by position, lets near-tied detections swap places."""
    categories = torch.tensor(label_map.category_ids)[torch.from_numpy(labels)]
    scale = torch.tensor([size[1], size[0], size[1], size[0]], dtype=torch.float32)
    assert len(prediction) == len(scores)
    # Ranked outputs: the scores, sorted, agree position by position whatever the ties.
    assert np.allclose(np.sort(scores), np.sort(prediction.scores.numpy()), atol=TOLERANCE)
    free = set(range(len(prediction)))
    for box, score, category in zip(torch.from_numpy(boxes), torch.from_numpy(scores), categories):
        close = [
            i
            for i in free
            if prediction.category_ids[i] == category
            and abs(float(prediction.scores[i] - score)) <= TOLERANCE
            and float(((prediction.boxes_xyxy[i] - box) / scale).abs().max()) <= TOLERANCE
        ]
        assert close, f"no Predictor detection matches {box.tolist()} {float(score)} {category}"
        free.remove(close[0])


def _run_graph(path, feeds):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixels", "orig_sizes"]
    assert [o.name for o in session.get_outputs()] == ["boxes", "scores", "labels"]
    return session.run(None, feeds)


def _export(checkpoint, out, *extra) -> int:
    size = [str(side) for side in TRACED]
    return main(
        ["export", "--format", "onnx", str(checkpoint), "--out", str(out), "--size", *size, *extra]
    )


@pytest.mark.parametrize("family", ["detr", "dino", "smca"])
def test_static_export_matches_the_predictor(family, tmp_path, synthetic_coco, capsys):
    checkpoint = _checkpoint(tmp_path, *FAMILIES[family])
    out = tmp_path / "model.onnx"
    assert _export(checkpoint, out) == 0
    report = capsys.readouterr().err
    assert "opset 18" in report and "onnxruntime vs PyTorch" in report
    if family == "dino":
        assert "denoising" in report  # reported as dropped
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["detrkit.category_ids"]) == [1, 2, 3, 4, 5]
    assert json.loads(meta["detrkit.label_names"])[0] == "class0"
    predictor = detrkit.Predictor.from_checkpoint(checkpoint, device="cpu")
    image = _image(synthetic_coco, 1, (96, 72))
    boxes, scores, labels = _run_graph(out, _graph_inputs(predictor, [image]))
    assert boxes.shape[1:] == (scores.shape[1], 4) and labels.dtype == np.int64
    _assert_matches(predictor(image), boxes[0], scores[0], labels[0], predictor.label_map, (72, 96))


def test_dynamic_deformable_export_runs_at_other_sizes_and_batches(tmp_path, synthetic_coco):
    checkpoint = _checkpoint(tmp_path, *FAMILIES["deformable_two_stage_refine"])
    out = tmp_path / "model.onnx"
    assert _export(checkpoint, out, "--dynamic") == 0
    predictor = detrkit.Predictor.from_checkpoint(checkpoint, device="cpu")
    # Two images of 72 x 90 (w x h) -> an 80 x 64 batch of 2, unlike the traced 64 x 85.
    images = [_image(synthetic_coco, i, (72, 90)) for i in (2, 3)]
    feeds = _graph_inputs(predictor, images)
    assert feeds["pixels"].shape == (2, 3, 80, 64)
    boxes, scores, labels = _run_graph(out, feeds)
    for i, image in enumerate(images):
        _assert_matches(
            predictor(image), boxes[i], scores[i], labels[i], predictor.label_map, (90, 72)
        )
    # One image at the traced size works too (batch 1).
    image = _image(synthetic_coco, 4, (96, 72))
    boxes, scores, labels = _run_graph(out, _graph_inputs(predictor, [image]))
    _assert_matches(predictor(image), boxes[0], scores[0], labels[0], predictor.label_map, (72, 96))


def test_a_failed_parity_check_exits_non_zero_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    from detrkit.export import onnx_parity

    real = onnx_parity.run_onnxruntime

    def perturbed(path, pixels, orig_sizes):
        found = real(path, pixels, orig_sizes)
        return onnx_parity.GraphOutputs(found.boxes, found.scores + 1e-3, found.labels)

    monkeypatch.setattr(onnx_parity, "run_onnxruntime", perturbed)
    checkpoint = _checkpoint(tmp_path, *FAMILIES["detr"])
    out_dir = tmp_path / "out"
    assert _export(checkpoint, out_dir / "model.onnx") == 2
    assert "onnxruntime disagrees with PyTorch" in capsys.readouterr().err
    assert list(out_dir.iterdir()) == []


def test_reordered_detections_fail_the_order_check():
    """Detections swapped across a score gap larger than the tolerance fail; swapped within a
    tie they pass."""
    from detrkit.export.onnx_parity import GraphOutputs, measure

    boxes = torch.tensor([[[0.0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 4, 4]]])
    expected = GraphOutputs(boxes, torch.tensor([[0.9, 0.5, 0.5]]), torch.tensor([[1, 2, 3]]))
    sizes = torch.tensor([[100, 100]])
    tied = GraphOutputs(boxes[:, [0, 2, 1]], expected.scores, expected.labels[:, [0, 2, 1]])
    assert measure(expected, tied, sizes, ranked=True).ok
    swapped = GraphOutputs(boxes[:, [1, 0, 2]], expected.scores, expected.labels[:, [1, 0, 2]])
    assert not measure(expected, swapped, sizes, ranked=True).ok


def test_missing_onnxruntime_says_what_to_install(tmp_path, monkeypatch, capsys):
    checkpoint = _checkpoint(tmp_path, *FAMILIES["detr"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert _export(checkpoint, tmp_path / "model.onnx") == 2
    assert "pip install 'detrkit[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()
