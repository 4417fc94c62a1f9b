# SPDX-License-Identifier: Apache-2.0
"""Per-class AP of the COCO evaluator, cross-checked against pycocotools, and the eval files."""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from detrkit.cli.evaluate import eval_file_names, run_folder
from detrkit.evaluation.coco_eval import CocoEvaluator, format_per_class_table
from detrkit.structures import Detections
from tests.unit.test_coco_eval import CATEGORY_IDS, _detections_from_gt, _ground_truth

pycocotools_coco = pytest.importorskip("pycocotools.coco")
pycocotools_eval = pytest.importorskip("pycocotools.cocoeval")

UNSEEN = 50  # a category with detections but no ground-truth box
CATEGORIES = (*CATEGORY_IDS, UNSEEN)
IMAGES = [1, 2, 3, 4, 5, 6]


def _case() -> tuple[dict, list[Detections]]:
    gt = _ground_truth()
    gt["categories"].append({"id": UNSEEN, "name": "unseen"})
    detections = _detections_from_gt(gt, IMAGES)
    # Every fifth detection of image 1 is relabelled to the class without ground truth.
    first = detections[0]
    labels = first.labels.clone()
    labels[::5] = CATEGORIES.index(UNSEEN)
    detections[0] = Detections(first.boxes_xyxy, first.scores, labels)
    return gt, detections


def _pycocotools_precision(gt: dict, results: list[dict]) -> tuple[np.ndarray, list[int]]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = pycocotools_coco.COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluator = pycocotools_eval.COCOeval(
            coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox"
        )
        evaluator.params.imgIds = IMAGES
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator.eval["precision"], list(evaluator.params.catIds)


def _mean_valid(values: np.ndarray) -> float | None:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else None


def test_per_class_ap_matches_pycocotools():
    gt, detections = _case()
    evaluator = CocoEvaluator(gt, CATEGORIES)
    evaluator.update(IMAGES, detections)
    metrics = evaluator.summarize()
    precision, category_ids = _pycocotools_precision(gt, evaluator.results())
    assert [row.category_id for row in metrics.per_class] == category_ids == sorted(CATEGORIES)
    for index, row in enumerate(metrics.per_class):
        expected_ap = _mean_valid(precision[:, :, index, 0, -1])
        expected_ap50 = _mean_valid(precision[0, :, index, 0, -1])
        if expected_ap is None:
            assert row.AP is None and row.AP50 is None
        else:
            assert row.AP == pytest.approx(expected_ap, abs=1e-6)
            assert row.AP50 == pytest.approx(expected_ap50, abs=1e-6)
    by_id = {row.category_id: row for row in metrics.per_class}
    assert by_id[UNSEEN].AP is None and by_id[UNSEEN].num_gt == 0
    assert by_id[CATEGORY_IDS[0]].name == f"class{CATEGORY_IDS[0]}"
    # The headline AP is the mean over the classes that have ground truth.
    seen = [row.AP for row in metrics.per_class if row.AP is not None]
    assert len(seen) == len(CATEGORY_IDS) and 0.0 < min(seen) < max(seen) < 1.0  # not degenerate
    assert metrics.AP == pytest.approx(float(np.mean(seen)), abs=1e-9)


def test_instance_counts_leave_out_crowd_and_unevaluated_images():
    gt, detections = _case()
    evaluator = CocoEvaluator(gt, CATEGORIES)
    evaluator.update(IMAGES[:3], detections[:3])
    per_class = evaluator.summarize().per_class
    for row in per_class:
        expected = sum(
            1
            for a in gt["annotations"]
            if a["category_id"] == row.category_id and a["image_id"] in IMAGES[:3]
        )
        crowd = sum(
            1
            for a in gt["annotations"]
            if a["category_id"] == row.category_id and a["image_id"] in IMAGES[:3] and a["iscrowd"]
        )
        assert row.num_gt == expected - crowd
    assert sum(row.num_gt for row in per_class) > 0


def test_table_shows_a_dash_where_a_class_has_no_ground_truth():
    gt, detections = _case()
    evaluator = CocoEvaluator(gt, CATEGORIES)
    evaluator.update(IMAGES, detections)
    metrics = evaluator.summarize()
    lines = format_per_class_table(metrics.per_class).splitlines()
    assert lines[0].split() == ["category", "id", "GT", "boxes", "AP", "AP50"]
    unseen = next(line for line in lines if line.startswith("unseen"))
    assert unseen.split() == ["unseen", str(UNSEEN), "0", "-", "-"]
    first = metrics.per_class[0]
    row = lines[1].split()
    assert row[0] == first.name and float(row[3]) == pytest.approx(100 * first.AP, abs=0.05)
    # The 12 standard numbers stay exactly 12: per-class rows never reach metrics.jsonl.
    assert len(metrics.as_dict()) == 12 and "per_class" not in metrics.as_dict()


def test_each_checkpoint_dataset_and_split_gets_its_own_files(tmp_path):
    ema = tmp_path / "run" / "model_ema.safetensors"
    names = eval_file_names(ema, tmp_path / "coco_2017", "val")
    assert names == (
        "eval_model-ema_coco-2017_val.json",
        "eval_model-ema_coco-2017_val_results.json",
    )
    other = eval_file_names(
        tmp_path / "run" / "checkpoints" / "checkpoint_00000012.safetensors",
        tmp_path / "coco_2017",
        "val",
    )
    assert other[0] == "eval_checkpoint-00000012_coco-2017_val.json"
    assert eval_file_names(ema, tmp_path / "coco_2017", "test")[0] != names[0]
    assert "results_val.json" not in (*names, *other)


def test_results_go_to_the_run_folder_of_the_checkpoint():
    assert run_folder(Path("runs/x/checkpoints/checkpoint_00000012.safetensors")) == Path("runs/x")
    assert run_folder(Path("runs/x/model.safetensors")) == Path("runs/x")
    assert run_folder(Path("converted.safetensors")) == Path(".")


def test_per_class_is_empty_when_built_from_plain_stats():
    from detrkit.evaluation.coco_eval import CocoMetrics

    metrics = CocoMetrics.from_stats([0.5] * 12)
    assert metrics.per_class == () and metrics == CocoMetrics.from_stats([0.5] * 12)
    assert torch.tensor(list(metrics.as_dict().values())).eq(0.5).all()
