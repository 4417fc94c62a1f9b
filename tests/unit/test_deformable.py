# SPDX-License-Identifier: Apache-2.0
"""Deformable DETR parts: proposals on padded images, reference detaching, look-forward-twice."""

from __future__ import annotations

import pytest
import torch

from detrkit.config.build import build_model
from detrkit.config.load import load_config
from detrkit.layers.deformable import MSDeformAttention, sampling_locations
from detrkit.models.deformable_encoder import encoder_reference_points
from detrkit.models.encoder import flatten_levels
from detrkit.models.two_stage import encoder_proposals
from detrkit.structures import FeatureLevel, ImageBatch

TINY = [
    "model.hidden_dim=32",
    "model.num_heads=2",
    "model.num_queries=6",
    "model.encoder.num_layers=1",
    "model.decoder.num_layers=3",
    "model.backbone.name=resnet18",
    "model.num_feature_levels=2",
]


def _memory(masks):
    levels = [
        FeatureLevel(
            torch.randn(m.shape[0], 4, *m.shape[1:]), m, torch.zeros(m.shape[0], 4, *m.shape[1:])
        )
        for m in masks
    ]
    return flatten_levels(levels)


def test_proposals_on_padded_images():
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, :, 3:] = True  # image 1: 3 valid columns of 6
    mask[1, 2:, :] = True  # and 2 valid rows of 4
    memory = _memory([mask])
    logits, valid = encoder_proposals(memory)
    boxes = logits.sigmoid()
    padded = mask.flatten(1)
    assert torch.isinf(logits[padded]).all()
    # Valid anchors: centres relative to the valid extent, sizes 0.05 at level 0.
    torch.testing.assert_close(boxes[1, 0], torch.tensor([0.5 / 3, 0.5 / 2, 0.05, 0.05]))
    torch.testing.assert_close(boxes[0, 7], torch.tensor([1.5 / 6, 1.5 / 4, 0.05, 0.05]))
    assert valid[~padded].all()


def test_proposals_near_the_border_are_invalid():
    mask = torch.zeros(1, 1, 60, dtype=torch.bool)  # centres 0.5/60 < 0.01 at the left edge
    logits, valid = encoder_proposals(_memory([mask]))
    assert not valid[0, 0] and valid[0, 30]
    assert torch.isinf(logits[0, 0]).all()


def test_encoder_reference_points_scale_by_valid_ratios():
    shapes = torch.tensor([[2, 2]])
    ratios = torch.tensor([[[0.5, 1.0]]])
    points = encoder_reference_points(shapes, ratios)
    # x centre 0.5 / (0.5 * 2) = 0.5 in the valid extent, scaled back by 0.5 -> 0.25.
    torch.testing.assert_close(points[0, 0, 0], torch.tensor([0.25, 0.25]))


def test_sampling_locations_two_and_four_dimensional_references():
    shapes = torch.tensor([[10, 20]])
    offsets = torch.ones(1, 1, 1, 1, 2, 2)
    two = sampling_locations(torch.full((1, 1, 1, 2), 0.5), offsets, shapes, num_points=2)
    torch.testing.assert_close(two[0, 0, 0, 0, 0], torch.tensor([0.5 + 1 / 20, 0.5 + 1 / 10]))
    box = torch.tensor([[[[0.5, 0.5, 0.2, 0.4]]]])
    four = sampling_locations(box, offsets, shapes, num_points=2)
    torch.testing.assert_close(four[0, 0, 0, 0, 0], torch.tensor([0.5 + 0.05, 0.5 + 0.1]))


def test_sampling_offset_init_points_heads_in_eight_directions():
    attention = MSDeformAttention(32, 8, 1, 2)
    grid = attention.sampling_offsets.bias.view(8, 1, 2, 2)
    torch.testing.assert_close(grid[2, 0, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(grid[1, 0, 1], torch.tensor([2.0, 2.0]))


def _images():
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    return ImageBatch(torch.randn(1, 3, 64, 64), mask, torch.tensor([[64, 64]]))


@pytest.mark.parametrize(
    "mode,reaches_previous", [("iterative", False), ("look_forward_twice", True)]
)
def test_reference_gradient_routing(mode, reaches_previous):
    cfg = load_config("deformable_detr_r50_two_stage", [*TINY, f"model.box_refine={mode}"]).model
    model = build_model(cfg, 3).train()
    main = model(_images()).group("main")
    head = model.head.bbox_embed
    main.boxes[1].sum().backward(retain_graph=True)
    previous = head[0].layers[-1].weight.grad
    assert (previous is not None and previous.abs().sum() > 0) == reaches_previous
    model.zero_grad()
    main.boxes[2].sum().backward()
    # Never further back than one layer: the fed-forward references are always detached.
    assert head[0].layers[-1].weight.grad is None or head[0].layers[-1].weight.grad.abs().sum() == 0


def test_initial_learned_reference_is_not_detached():
    cfg = load_config("deformable_detr_r50_refine", TINY).model
    model = build_model(cfg, 3).train()
    model(_images()).group("main").boxes[0].sum().backward()
    assert model.queries.reference_points.weight.grad.abs().sum() > 0
