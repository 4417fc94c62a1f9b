# SPDX-License-Identifier: Apache-2.0
"""Every shipped preset builds, trains a step and evaluates on the CPU at tiny size."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from detrkit.config.build import build_criterion, build_model, build_postprocess
from detrkit.config.load import list_presets, load_config
from detrkit.structures import ImageBatch, Target
from tests.golden.golden_case import published_config

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
    if "hybrid" in load_config(preset).model.schemes:
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


# The published training scripts' flags (docs/methods.md#h-detr-results), applied to the official
# defaults that a
# golden case records; each preset must equal what the converter derives from them.
_R50_FULL = dict(
    backbone="resnet50", hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6,
    dim_feedforward=2048, num_feature_levels=4, with_box_refine=True, two_stage=True,
    epochs=12, lr_drop=11,
)  # fmt: skip
_HDETR_TRICKS = dict(
    _R50_FULL, num_queries_one2one=300, num_queries_one2many=1500, k_one2many=6,
    lambda_one2many=1.0, dropout=0.0, mixed_selection=True, look_forward_twice=True,
)  # fmt: skip
_MSDETR = dict(
    _R50_FULL, num_queries=300, dropout=0.1, use_ms_detr=True, use_aux_ffn=True,
    cls_loss_coef=1, o2m_cls_loss_coef=2, enc_cls_loss_coef=2, enc_bbox_loss_coef=5,
    enc_giou_loss_coef=2,
)  # fmt: skip
_MSDETR_PP = dict(_MSDETR, dropout=0.0, mixed_selection=True, look_forward_twice=True)
PUBLISHED = [
    ("hdetr_r50_tricks_12ep", "hdetr_r18_ms_refine_twostage_mqs_lft", _HDETR_TRICKS),
    ("hdetr_r50_tricks_36ep", "hdetr_r18_ms_refine", dict(_HDETR_TRICKS, epochs=36, lr_drop=30)),
    (
        "hdetr_r50_tricks_900q_36ep_top300",
        "hdetr_r18_ms_refine",
        dict(_HDETR_TRICKS, epochs=36, lr_drop=30, num_queries_one2one=900, topk=300),
    ),
    ("msdetr_r50", "msdetr_r18_ms_refine_twostage", _MSDETR),
    ("msdetr_pp_r50", "msdetr_r18_ms_refine_twostage_mqs_lft", _MSDETR_PP),
    (
        "msdetr_pp_r50_900q",
        "msdetr_r18_ms_refine_twostage",
        dict(_MSDETR_PP, num_queries=900, topk_eval=300),
    ),
]


@pytest.mark.parametrize(("preset", "case", "flags"), PUBLISHED)
def test_scheme_presets_equal_the_published_scripts(preset, case, flags):
    converted = published_config(case, flags)
    ours = load_config(preset)
    assert replace(converted.model, num_classes=None) == ours.model
    assert (converted.train.epochs, converted.train.lr_drop) == (
        ours.train.epochs,
        ours.train.lr_drop,
    )
