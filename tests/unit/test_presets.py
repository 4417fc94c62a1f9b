# SPDX-License-Identifier: Apache-2.0
"""Every shipped preset builds, trains a step and evaluates on the CPU at tiny size."""

from __future__ import annotations

import pytest
import torch

from detrkit.config.build import build_criterion, build_model, build_postprocess
from detrkit.config.load import list_presets, load_config
from detrkit.structures import ImageBatch, Target

TINY = [
    "model.hidden_dim=32",
    "model.num_heads=2",
    "model.num_queries=12",
    "model.encoder.num_layers=1",
    "model.encoder.ffn_dim=64",
    "model.decoder.num_layers=2",
    "model.decoder.ffn_dim=64",
    "model.backbone.name=resnet18",
    "model.backbone.dilation=false",
]


def _batch() -> tuple[ImageBatch, list[Target]]:
    pixels = torch.randn(2, 3, 96, 128)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, :, 100:] = True
    mask[1, 70:, :] = True
    pixels[mask[:, None].expand_as(pixels)] = 0
    targets = [
        Target(torch.tensor([0, 2]), torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])),
        Target(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 4)),
    ]
    return ImageBatch(pixels, mask, torch.tensor([[96, 128], [70, 100]])), targets


@pytest.mark.parametrize("preset", list_presets())
def test_preset_trains_and_evaluates_at_tiny_size(preset):
    overrides = list(TINY)
    if load_config(preset).model.schemes.hybrid is not None:
        overrides.append("model.schemes.hybrid.num_queries=18")  # tiny images have few tokens
    cfg = load_config(preset, overrides).model
    model, criterion = build_model(cfg, 3), build_criterion(cfg, 3)
    images, targets = _batch()
    losses = criterion(model.train()(images, targets), targets)
    assert torch.isfinite(losses.total)
    losses.total.backward()
    # Every trainable parameter is used (DDP runs with find_unused_parameters=False).
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    with torch.no_grad():
        detections = build_postprocess(cfg)(model.eval()(images).for_inference(), images.sizes)
    assert len(detections) == 2
    assert detections[0].boxes_xyxy.shape[-1] == 4 and torch.isfinite(detections[0].scores).all()


@pytest.mark.parametrize("preset", list_presets())
def test_preset_parameters_are_not_aliased(preset):
    """Shared sub-modules would load one checkpoint tensor into several places."""
    with torch.device("meta"):
        model = build_model(load_config(preset).model, 80)
    params = list(model.parameters())
    assert len({id(p) for p in params}) == len(list(model.named_parameters(remove_duplicate=False)))
