# SPDX-License-Identifier: Apache-2.0
"""CocoEvaluator: cross-checked number for number against pycocotools."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from detrkit.errors import UserError
from detrkit.evaluation.coco_eval import (
    CocoEvaluator,
    CocoMetrics,
    write_results_json,
)
from detrkit.structures import Detections

pycocotools_coco = pytest.importorskip("pycocotools.coco")
pycocotools_eval = pytest.importorskip("pycocotools.cocoeval")

CATEGORY_IDS = (3, 7, 18, 42)  # contiguous label i -> CATEGORY_IDS[i]
EMPTY_IMAGE = 4
NOT_EVALUATED_IMAGE = 99


def _box(rng: random.Random, size: float, width: int, height: int) -> list[float]:
    w, h = size * rng.uniform(0.7, 1.3), size * rng.uniform(0.7, 1.3)
    return [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]


def _ground_truth() -> dict:
    """Six evaluated images (one empty), one image never evaluated, mixed areas, one crowd box."""
    rng = random.Random(0)
    images = [{"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in range(1, 7)]
    images.append({"id": NOT_EVALUATED_IMAGE, "width": 640, "height": 480, "file_name": "x.jpg"})
    annotations = []
    for image in images:
        if image["id"] == EMPTY_IMAGE:
            continue
        for _ in range(rng.randint(4, 9)):
            size = rng.choice([12.0, 20.0, 50.0, 80.0, 150.0, 300.0])  # small, medium, large
            bbox = _box(rng, size, image["width"], image["height"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": rng.choice(CATEGORY_IDS),
                    "bbox": bbox,
                    "area": bbox[2] * bbox[3],
                    "iscrowd": 0,
                }
            )
    annotations[3]["iscrowd"] = 1
    categories = [{"id": c, "name": f"class{c}"} for c in CATEGORY_IDS]
    return {"images": images, "annotations": annotations, "categories": categories}


def _detections_from_gt(gt: dict, image_ids: list[int], seed: int = 0) -> list[Detections]:
    """Perfect, jittered, mislabelled and false-positive detections, a few hundred in all."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for image_id in image_ids:
        anns = [a for a in gt["annotations"] if a["image_id"] == image_id]
        boxes, labels = [], []
        for ann in anns:
            x, y, w, h = ann["bbox"]
            label = CATEGORY_IDS.index(ann["category_id"])
            boxes.append([x, y, x + w, y + h])  # perfect
            labels.append(label)
            for _ in range(4):  # jittered, sometimes with the wrong class
                noise = torch.randn(4, generator=gen) * 0.15 * torch.tensor([w, h, w, h])
                boxes.append((torch.tensor([x, y, x + w, y + h]) + noise).tolist())
                wrong = torch.rand(1, generator=gen).item() < 0.2
                labels.append((label + 1) % len(CATEGORY_IDS) if wrong else label)
        # False positives anywhere; image 1 gets more than maxDets=100 detections in all.
        for _ in range(90 if image_id == 1 else 30):
            xy = torch.rand(2, generator=gen) * torch.tensor([560.0, 400.0])
            wh = torch.rand(2, generator=gen) * 75 + 5
            boxes.append(torch.cat([xy, xy + wh]).tolist())
            labels.append(int(torch.randint(len(CATEGORY_IDS), (1,), generator=gen)))
        scores = torch.rand(len(boxes), generator=gen)
        out.append(Detections(torch.tensor(boxes), scores, torch.tensor(labels, dtype=torch.int64)))
    return out


def _pycocotools_stats(gt: dict, results: list[dict], image_ids: list[int]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = pycocotools_coco.COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        evaluator = pycocotools_eval.COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


@pytest.fixture
def gt() -> dict:
    return _ground_truth()


@pytest.fixture
def evaluated_ids() -> list[int]:
    return [1, 2, 3, EMPTY_IMAGE, 5, 6]


def _evaluate(gt, image_ids, detections, **kwargs) -> tuple[CocoEvaluator, CocoMetrics]:
    evaluator = CocoEvaluator(gt, CATEGORY_IDS, **kwargs)
    evaluator.update(image_ids, detections)
    return evaluator, evaluator.summarize()


def test_matches_pycocotools(gt, evaluated_ids, tmp_path: Path):
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(gt))
    detections = _detections_from_gt(gt, evaluated_ids)
    assert 300 <= sum(len(d.scores) for d in detections) <= 600
    assert max(len(d.scores) for d in detections) > 100
    evaluator = CocoEvaluator(path, CATEGORY_IDS)
    for start in range(0, len(evaluated_ids), 4):  # two batches
        evaluator.update(evaluated_ids[start : start + 4], detections[start : start + 4])
    metrics = evaluator.summarize()
    expected = _pycocotools_stats(gt, evaluator.results(), evaluated_ids)
    np.testing.assert_allclose(list(metrics.as_dict().values()), expected[:12], rtol=0, atol=1e-6)
    assert 0.2 < metrics.AP < 0.95  # a non-trivial case, not a degenerate one


def test_perfect_detections_give_ap_one(gt, evaluated_ids):
    dets = _detections_from_gt(gt, evaluated_ids)
    perfect = []
    for image_id in evaluated_ids:
        anns = [a for a in gt["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        labels = torch.tensor([CATEGORY_IDS.index(a["category_id"]) for a in anns])
        perfect.append(Detections(boxes.reshape(-1, 4), torch.ones(len(anns)), labels))
    assert len(dets) == len(perfect)
    _, metrics = _evaluate(gt, evaluated_ids, perfect)
    for name in ("AP", "AP50", "AP75", "AR100"):
        assert metrics.as_dict()[name] == pytest.approx(1.0, abs=1e-9)


def _empty_detections(count: int) -> list[Detections]:
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    return [empty] * count


def test_no_detections_give_zero(gt, evaluated_ids):
    evaluator, metrics = _evaluate(gt, evaluated_ids, _empty_detections(len(evaluated_ids)))
    assert evaluator.results() == []
    assert metrics.AP == 0.0 and metrics.AP50 == 0.0 and metrics.AR100 == 0.0


def test_only_updated_images_are_evaluated(gt):
    # Image 99 has annotations but is never updated: it must not count as missed boxes.
    ids = [1, 2]
    _, metrics = _evaluate(gt, ids, _detections_from_gt(gt, ids))
    evaluator = CocoEvaluator(gt, CATEGORY_IDS)
    evaluator.update(ids, _detections_from_gt(gt, ids))
    expected = _pycocotools_stats(gt, evaluator.results(), ids)
    np.testing.assert_allclose(list(metrics.as_dict().values()), expected[:12], atol=1e-6)
    all_ids = [a["image_id"] for a in gt["annotations"]]
    assert NOT_EVALUATED_IMAGE in all_ids


def test_image_without_detections_still_counts(gt):
    # An updated image with no detections adds its ground truth as misses: recall drops.
    ids = [1, 2]
    _, both = _evaluate(gt, ids, _detections_from_gt(gt, [1, 2]))
    _, second_missing = _evaluate(gt, ids, _detections_from_gt(gt, [1]) + _empty_detections(1))
    assert second_missing.AR100 < both.AR100


def test_labels_are_mapped_to_category_ids(gt):
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.0, 5.0]])
    dets = Detections(boxes, torch.tensor([0.9, 0.25]), torch.tensor([3, 0]))
    evaluator = CocoEvaluator(gt, CATEGORY_IDS)
    evaluator.update([2], [dets])
    records = evaluator.results()
    assert [r["category_id"] for r in records] == [42, 3]
    assert records[0]["bbox"] == pytest.approx([10.0, 20.0, 40.0, 60.0])
    assert records[0]["score"] == pytest.approx(0.9)
    assert all(isinstance(r["image_id"], int) and r["image_id"] == 2 for r in records)


def test_results_json_round_trips(gt, evaluated_ids, tmp_path: Path):
    evaluator, _ = _evaluate(gt, evaluated_ids, _detections_from_gt(gt, evaluated_ids))
    path = tmp_path / "out" / "results.json"
    write_results_json(path, evaluator.results())
    assert json.loads(path.read_text()) == evaluator.results()
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left


def test_two_fake_ranks_match_one_rank(gt, evaluated_ids):
    detections = _detections_from_gt(gt, evaluated_ids)
    _, single = _evaluate(gt, evaluated_ids, detections)
    ranks: list[CocoEvaluator] = []
    calls = []

    def all_gather(obj: object) -> list[object]:
        calls.append(obj)
        return [json.loads(json.dumps(r.state())) for r in ranks]  # as if sent over the wire

    ranks.extend(CocoEvaluator(gt, CATEGORY_IDS, all_gather=all_gather) for _ in range(2))
    ranks[0].update(evaluated_ids[0::2], detections[0::2])
    ranks[1].update(evaluated_ids[1::2], detections[1::2])
    ranks[1].update(evaluated_ids[:1], detections[:1])  # sampler padding repeats an image
    metrics = ranks[0].summarize()
    assert len(calls) == 1
    assert metrics == single
    assert ranks[0].image_ids == sorted(evaluated_ids)
    assert ranks[1].summarize() == single


def test_merge_matches_single_process(gt, evaluated_ids):
    detections = _detections_from_gt(gt, evaluated_ids)
    single, metrics = _evaluate(gt, evaluated_ids, detections)
    halves = [CocoEvaluator(gt, CATEGORY_IDS) for _ in range(2)]
    halves[0].update(evaluated_ids[:3], detections[:3])
    halves[1].update(evaluated_ids[3:], detections[3:])
    halves[0].merge([h.state() for h in halves])
    assert halves[0].summarize() == metrics
    assert sorted(map(json.dumps, halves[0].results())) == sorted(map(json.dumps, single.results()))


def test_ground_truth_dict_is_not_mutated(gt, evaluated_ids):
    before = copy.deepcopy(gt)
    _evaluate(gt, evaluated_ids, _detections_from_gt(gt, evaluated_ids))
    assert gt == before


def test_format_table_has_twelve_coco_lines():
    metrics = CocoMetrics.from_stats([0.5] * 6 + [0.25] * 6)
    lines = metrics.format_table().splitlines()
    assert len(lines) == 12
    assert lines[0] == (
        " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.500"
    )
    assert lines[6] == (
        " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = 0.250"
    )
    assert list(metrics.as_dict()) == "AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl".split()


def test_summarize_prints_nothing(gt, evaluated_ids, capfd):
    _evaluate(gt, evaluated_ids, _detections_from_gt(gt, evaluated_ids))
    captured = capfd.readouterr()
    assert captured.out == ""


def test_user_errors(gt, tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        CocoEvaluator(tmp_path / "missing.json", CATEGORY_IDS)
    with pytest.raises(UserError, match="category ids"):
        CocoEvaluator(gt, (3, 8))
    evaluator = CocoEvaluator(gt, CATEGORY_IDS)
    with pytest.raises(UserError, match="image id 12345"):
        evaluator.update([12345], _empty_detections(1))
    bad = Detections(torch.zeros(1, 4), torch.ones(1), torch.tensor([len(CATEGORY_IDS)]))
    with pytest.raises(UserError, match="outside"):
        evaluator.update([1], [bad])
    with pytest.raises(UserError, match="no image"):
        evaluator.summarize()
