# SPDX-License-Identifier: Apache-2.0
"""Training schemes: invisible at inference, add exactly their groups, isolated by the mask."""

from __future__ import annotations

import pytest
import torch

from detrkit.config.build import build_criterion, build_model
from detrkit.config.load import load_config
from detrkit.schemes.hybrid import isolate
from detrkit.structures import ImageBatch, Target

TINY = [
    "model.hidden_dim=32",
    "model.num_heads=2",
    "model.num_queries=6",
    "model.encoder.num_layers=1",
    "model.decoder.num_layers=2",
    "model.backbone.name=resnet18",
    "model.num_feature_levels=2",
    "model.encoder.dropout=0.0",
    "model.decoder.dropout=0.0",
]
HYBRID = [
    "model.schemes.hybrid.num_queries=9",
    "model.schemes.hybrid.repeat_k=3",
    "model.schemes.hybrid.loss_weight=0.5",
]
BASES = ["deformable_detr_r50_refine", "deformable_detr_r50_tricks_12ep", "detr_r50"]


def _images():
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 60:] = True
    return ImageBatch(torch.randn(2, 3, 64, 80), mask, torch.tensor([[64, 80], [64, 60]]))


def _targets():
    return [
        Target(torch.tensor([0, 2]), torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])),
        Target(torch.tensor([1]), torch.tensor([[0.5, 0.5, 0.4, 0.4]])),
    ]


@pytest.mark.parametrize("base", BASES)
def test_eval_output_identical_to_bare_detector(base):
    bare = build_model(load_config(base, TINY).model, 3).eval()
    hybrid = build_model(load_config(base, TINY + HYBRID).model, 3).eval()
    state = bare.state_dict()
    own = hybrid.state_dict()
    for key, value in state.items():  # copy, extending query tables with their extra rows
        own[key][: value.shape[0]] = value
    hybrid.load_state_dict(own)
    images = _images()
    with torch.no_grad():
        ours, theirs = hybrid(images), bare(images)
    assert [g.name for g in ours.groups] == [g.name for g in theirs.groups]
    for a, b in zip(ours.groups, theirs.groups):
        torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
        torch.testing.assert_close(a.boxes, b.boxes, atol=0, rtol=0)


@pytest.mark.parametrize("base", BASES)
def test_training_adds_exactly_the_one_to_many_group(base):
    model = build_model(load_config(base, TINY + HYBRID).model, 3).train()
    output = model(_images(), _targets())
    o2m = output.group("o2m")
    assert o2m.logits.shape[:3] == (2, 2, 9) and o2m.target_repeat == 3
    assert o2m.loss_weight == 0.5 and not o2m.at_inference
    names = [g.name for g in output.groups]
    assert names.count("o2m") == 1 and output.for_inference().name == "main"
    losses = build_criterion(load_config(base, TINY + HYBRID).model, 3)(output, _targets())
    assert losses.weights["o2m/l1/d1"] == 0.5 * losses.weights["main/l1/d1"]


def test_one_to_many_queries_do_not_change_main_outputs():
    """Perturbing the one-to-many slots leaves the main group bit-identical (block mask)."""
    cfg = load_config("deformable_detr_r50_refine", TINY + HYBRID).model
    model = build_model(cfg, 3).train()
    images = _images()
    with torch.no_grad():
        first = model(images, _targets()).group("main")
    with torch.no_grad():
        table = model.queries.query_embed.weight
        table[6:] += torch.randn_like(table[6:])
        second = model(images, _targets())
    torch.testing.assert_close(second.group("main").boxes, first.boxes, atol=0, rtol=0)
    torch.testing.assert_close(second.group("main").logits, first.logits, atol=0, rtol=0)


def test_isolate_blocks_across_groups_only():
    mask = isolate(None, 2, 5, 6, torch.device("cpu"))
    assert not mask[:2, :2].any() and not mask[2:5, 2:5].any() and not mask[5:, :2].any()
    assert mask[:2, 2:5].all() and mask[2:5, :2].all() and mask[2:5, 5:].all()
    combined = isolate(mask, 5, 6, 6, torch.device("cpu"))
    assert combined[5, :5].all() and combined[:2, 2:5].all()


def test_repeated_targets_normalise_the_one_to_many_group():
    cfg = load_config("deformable_detr_r50_refine", TINY + HYBRID).model
    criterion = build_criterion(cfg, 3)
    seen = []
    criterion.reduce_num_boxes = lambda n: (seen.append(n.item()), n)[1]
    criterion(build_model(cfg, 3).train()(_images(), _targets()), _targets())
    assert 3.0 in seen and 9.0 in seen
