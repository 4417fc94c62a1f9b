# SPDX-License-Identifier: Apache-2.0
"""Evaluation does not depend on the evaluation batch size: no image is padded."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from detrkit.config.build import build_model, build_postprocess
from detrkit.config.load import load_config
from detrkit.data.grouping import AspectRatioBatchSampler, SameSizeBatchSampler, group_batches
from detrkit.data.synth import write_synthetic_coco
from detrkit.engine.data import eval_loader, open_split
from detrkit.engine.evaluate import evaluate, predict_batches
from detrkit.engine.precision import Precision
from tests.conftest import TINY_MODEL_OVERRIDES

TINY = [
    *TINY_MODEL_OVERRIDES,
    "model.backbone.norm=frozen_bn",
    "data.val_size=64",
    "data.max_size=96",
    "data.num_workers=0",
]


@pytest.fixture(scope="module")
def few_sizes(tmp_path_factory):
    """24 validation images in 64..66 x 64..66 pixels: sizes differ, and many repeat."""
    root = tmp_path_factory.mktemp("few_sizes")
    return write_synthetic_coco(root, 0, 24, seed=1, min_size=64, max_size=66)


def _detections(data_cfg, model, postprocess, dataset):
    found = {}
    for targets, detections in predict_batches(
        model, postprocess, eval_loader(dataset, data_cfg), torch.device("cpu"), Precision()
    ):
        found |= {t.image_id: d for t, d in zip(targets, detections)}
    return found


def test_detections_and_ap_identical_at_batch_size_1_and_8(few_sizes):
    cfg = load_config("deformable_detr_tiny", [*TINY, f"data.root={few_sizes}"])
    torch.manual_seed(0)
    model, postprocess = build_model(cfg.model, 3).eval(), build_postprocess(cfg.model)
    dataset = open_split(cfg.data, "val", train=False)
    assert len(set(dataset.image_sizes())) > 3
    runs = {}
    for batch_size in (1, 8):
        data_cfg = replace(cfg.data, eval_batch_size=batch_size)
        runs[batch_size] = _detections(data_cfg, model, postprocess, dataset)
        metrics, _ = evaluate(
            model,
            postprocess,
            eval_loader(dataset, data_cfg),
            dataset.coco_json,
            dataset.label_map.category_ids,
            torch.device("cpu"),
            Precision(),
        )
        runs[batch_size]["AP"] = metrics.as_dict()
    assert runs[1]["AP"] == pytest.approx(runs[8]["AP"], abs=1e-9)
    assert sorted(k for k in runs[1] if k != "AP") == list(range(1, 25))
    for image_id, single in runs[1].items():
        if image_id == "AP":
            continue
        batched = runs[8][image_id]
        torch.testing.assert_close(batched.scores, single.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.boxes_xyxy, single.boxes_xyxy, rtol=1e-4, atol=1e-3)
        assert torch.equal(batched.labels, single.labels)
    # Control: padded batches of mixed sizes do change predictions (what grouping prevents).
    padded = replace(cfg.data, eval_batch_size=8, eval_group_by_size=False)
    mixed = _detections(padded, model, postprocess, dataset)
    assert any(
        not torch.allclose(mixed[i].scores, runs[1][i].scores, rtol=1e-4, atol=1e-5)
        for i in range(1, 25)
    )


def test_same_size_batches_cover_every_image_once_per_rank_shard():
    sizes = [(64, 64), (64, 80), (64, 64), (80, 64), (64, 64), (64, 80), (64, 64)]
    shards = [SameSizeBatchSampler(sizes, 2, num_replicas=2, rank=r) for r in (0, 1)]
    seen = [i for shard in shards for batch in shard for i in batch]
    assert sorted(seen) == list(range(7))
    for shard in shards:
        assert all(len({sizes[i] for i in batch}) == 1 and len(batch) <= 2 for batch in shard)


def test_aspect_ratio_batches_are_single_orientation_and_equal_across_ranks():
    ratios = [1.3, 0.7, 1.5, 0.75, 1.0, 0.6, 1.2, 0.8, 1.4, 0.9, 1.1]
    ranks = [AspectRatioBatchSampler(ratios, 2, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    batches = [list(r) for r in ranks]
    assert len(batches[0]) == len(batches[1]) > 0
    # leftovers are batched together last; every earlier batch has one orientation
    orders = group_batches(range(11), [r >= 1 for r in ratios], 2, mix_leftovers=True)
    assert all(len({ratios[i] >= 1 for i in b}) == 1 for b in orders[:-2])
    # resume: skipping the first batch replays the rest of the epoch exactly
    again = AspectRatioBatchSampler(ratios, 2, seed=5, num_replicas=2, rank=0)
    again.skip(2)
    assert list(again) == batches[0][1:]
    # per-sample augmentation seeds do not depend on the grouping
    assert all(isinstance(seed, int) for batch in batches[0] for _, seed in batch)
