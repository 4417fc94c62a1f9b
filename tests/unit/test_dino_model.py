# SPDX-License-Identifier: Apache-2.0
"""DINO's inference path: mixed query selection, positions from references, shared heads with
refinement, C2-C5 levels, the inverse-sigmoid clamp, the config checks, the quality focal
term and the Co-DETR config translation's refusals."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from detrkit.config.build import backbone_stages, build_model
from detrkit.config.schema import (
    LossConfig,
    QueryConfig,
    SoftNmsConfig,
    TransformerConfig,
)
from detrkit.convert.codetr_config import codetr_model_config
from detrkit.errors import UserError
from detrkit.losses.quality_focal import QualityFocalTerm
from detrkit.models.dino_queries import DinoQuerySelector
from detrkit.models.reference_position import ReferencePositionHead
from detrkit.structures import EncoderMemory, ImageBatch, Target
from tests.conftest import tiny_model_config
from tests.golden.golden_case import SHIPPED_DIR

_LAYERS = dict(ffn_dim=64, dropout=0.0, attention="ms_deform")


def dino_config(**changes):
    """A tiny DINO: 3 levels, per-layer positions from the references, one shared head pair."""
    fields = dict(
        num_feature_levels=3,
        box_refine="look_forward_twice",
        shared_heads=True,
        inverse_sigmoid_eps=1e-3,
        queries=QueryConfig(kind="dino"),
        encoder=TransformerConfig(num_layers=1, **_LAYERS),
        decoder=TransformerConfig(
            num_layers=2, query_pos="from_reference", output_norm=True, **_LAYERS
        ),
        loss=LossConfig(class_loss="sigmoid_focal"),
    )
    fields.update(changes)
    return tiny_model_config(**fields)


def _memory(batch: int = 2, tokens: int = 40, dim: int = 32) -> EncoderMemory:
    shapes = torch.tensor([[4, 8], [2, 4]])
    mask = torch.zeros(batch, tokens, dtype=torch.bool)
    mask[1, 28:32] = True  # padding columns of image 1, level 0
    return EncoderMemory(
        tokens=torch.randn(batch, tokens, dim),
        padding_mask=mask,
        pos=torch.zeros(batch, tokens, dim),
        spatial_shapes=shapes,
        level_start=torch.tensor([0, 32]),
        valid_ratios=torch.ones(batch, 2, 2),
    )


def test_selector_ranks_by_best_class_and_detaches_the_references():
    selector = DinoQuerySelector(32, 5, num_embeddings=10)
    memory = _memory()
    queries, (enc,) = selector(memory, num_queries=6, num_extra=2)
    top, logits, coords, _ = selector.rank(memory, 8)
    assert torch.equal(top, logits.max(-1).values.topk(8, dim=1).indices)
    assert queries.pos is None and queries.content.shape == (2, 8, 32)
    assert torch.equal(queries.content[0], selector.tgt_embed.weight[:8])
    assert queries.groups[0].stop == 6 and queries.reference.shape == (2, 8, 4)
    assert not queries.reference.requires_grad
    assert (
        enc.name == "enc" and enc.logits.shape == (1, 2, 8, 5) and enc.boxes.shape == (1, 2, 8, 4)
    )
    assert not enc.supervision.class_agnostic
    torch.testing.assert_close(enc.boxes[0], queries.reference)
    enc.boxes.sum().backward()  # the selected boxes train the proposal box head
    assert selector.bbox_embed.layers[-1].weight.grad is not None
    with pytest.raises(ValueError, match="table has 10"):
        selector(memory, num_queries=11)


def test_dino_model_builds_the_dino_parts_and_runs():
    cfg = dino_config()
    model = build_model(cfg)
    assert isinstance(model.queries, DinoQuerySelector)
    assert isinstance(model.decoder.query_pos_head, ReferencePositionHead)
    assert model.decoder.output_norm is not None
    assert len(model.head.class_embed) == 1 and len(model.head.bbox_embed) == 1
    assert model.decoder.refiner.eps == 1e-3 and model.head.inverse_sigmoid_eps == 1e-3
    assert not any(k.startswith("queries.pos_trans") for k in model.state_dict())
    pixels = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    mask[1, :, 80:] = True
    model.eval()
    with torch.no_grad():
        out = model(ImageBatch(pixels, mask, torch.tensor([[64, 96], [64, 80]])))
    assert [g.name for g in out.groups] == ["main", "enc"]
    assert out.group("main").logits.shape == (2, 2, 12, 5)
    assert torch.isfinite(out.group("main").boxes).all()


def test_default_head_sharing_is_unchanged():
    refine = tiny_model_config(
        num_feature_levels=2,
        box_refine="iterative",
        queries=QueryConfig(kind="learned_with_reference"),
        encoder=TransformerConfig(num_layers=1, **_LAYERS),
        decoder=TransformerConfig(num_layers=2, **_LAYERS),
        loss=LossConfig(class_loss="sigmoid_focal"),
    )
    model = build_model(refine)
    assert len(model.head.class_embed) == 2 and model.decoder.output_norm is None
    assert model.decoder.query_pos_head is None and model.decoder.refiner.eps == 1e-5
    assert len(build_model(replace(refine, shared_heads=True)).head.bbox_embed) == 1


def test_five_levels_from_c2_to_c5():
    cfg = dino_config(num_feature_levels=5, num_backbone_stages=4)
    assert backbone_stages(cfg) == ("c2", "c3", "c4", "c5")
    assert backbone_stages(replace(cfg, num_backbone_stages=None)) == ("c3", "c4", "c5")
    model = build_model(cfg)
    assert model.neck.projections[0][0].in_channels == 64  # ResNet-18's C2
    assert model.neck.projections[4][0].in_channels == 512  # the extra level reads raw C5


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(decoder=TransformerConfig(**_LAYERS)), "query_pos=from_reference"),
        (dict(queries=QueryConfig(kind="two_stage")), "model.queries.kind=dino"),
        (dict(box_refine="none"), "box refinement"),
        (dict(num_backbone_stages=4), "exceeds model.num_feature_levels"),
        (dict(num_backbone_stages=5, num_feature_levels=5), "must be 1 to 4"),
        (dict(inverse_sigmoid_eps=0.0), "inverse_sigmoid_eps"),
        (dict(encoder=TransformerConfig(output_norm=True, **_LAYERS)), "decoder options"),
        (dict(soft_nms=SoftNmsConfig(), nms_iou_threshold=0.5), "two NMS variants"),
        (dict(soft_nms=SoftNmsConfig(sigma=0.0)), "sigma must be positive"),
        (dict(soft_nms=SoftNmsConfig(candidates=0)), "candidates=0"),
        (dict(soft_nms=SoftNmsConfig(), loss=LossConfig()), "sigmoid heads"),
    ],
)
def test_dino_config_checks_name_the_keys(changes, message):
    with pytest.raises(UserError, match=message):
        build_model(dino_config(**changes))


def test_quality_focal_term_targets_the_iou():
    term = QualityFocalTerm(beta=2.0)
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    targets = [Target(torch.tensor([1]), torch.tensor([[0.5, 0.5, 0.2, 0.1]]))]
    matches = [(torch.tensor([0]), torch.tensor([0]))]
    got = term(logits, boxes, targets, matches, num_boxes=torch.tensor(1.0))
    score = torch.zeros(1, 2, 2)
    score[0, 0, 1] = 0.5  # IoU of the 0.2x0.2 box with the 0.2x0.1 box at the same centre
    p = logits.sigmoid()
    bce = -(score * p.log() + (1 - score) * (1 - p).log())
    torch.testing.assert_close(got, (bce * (score - p).abs() ** 2).sum())
    unmatched = term(logits, boxes, targets, [(torch.zeros(0).long(),) * 2], torch.tensor(1.0))
    torch.testing.assert_close(unmatched, (-(1 - p).log() * p**2).sum())


def test_codetr_config_refuses_what_it_cannot_build():
    spec = json.loads((SHIPPED_DIR / "codetr" / "co_dino_r18_5scale.json").read_text())
    model = spec["config"]["model"]
    cfg = codetr_model_config(model)
    assert cfg.queries.kind == "dino" and cfg.loss.class_loss == "quality_focal"
    assert cfg.soft_nms.iou_threshold == 0.8 and cfg.top_k == 300 and cfg.clip_boxes
    other = copy.deepcopy(model)
    other["query_head"]["type"] = "DETRHead"
    with pytest.raises(UserError, match="'DETRHead' is not supported"):
        codetr_model_config(other)
    hard = copy.deepcopy(model)
    hard["query_head"]["test_cfg"]["nms"] = {"type": "nms", "iou_threshold": 0.5}
    with pytest.raises(UserError, match="NMS nms"):
        codetr_model_config(hard)
