# SPDX-License-Identifier: Apache-2.0
"""Co-Deformable-DETR (``CoDeformDETRHead``) configs -> detrkit's two-stage Deformable DETR,
and the Co-DETR converter's rules for its query head."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from detrkit.convert.codetr import convert_codetr
from detrkit.convert.codetr_config import codetr_model_config
from detrkit.errors import UserError
from detrkit.models.two_stage import TwoStageQuerySelector
from detrkit.structures import EncoderMemory
from tests.golden.golden_case import SHIPPED_DIR


@pytest.fixture(scope="module")
def model() -> dict:
    path = SHIPPED_DIR / "codetr" / "co_deformable_detr_r18.json"
    return json.loads(path.read_text())["config"]["model"]


def test_translation(model):
    cfg = codetr_model_config(model)
    assert (cfg.queries.kind, cfg.queries.mixed_selection) == ("two_stage", True)
    assert cfg.box_refine == "look_forward_twice" and cfg.inverse_sigmoid_eps == 1e-5
    assert cfg.decoder.query_pos == "constant" and cfg.decoder.output_norm is False
    assert cfg.num_feature_levels == 4 and cfg.num_backbone_stages == 3
    assert (cfg.num_queries, cfg.decoder.num_layers, cfg.encoder.num_layers) == (20, 2, 2)
    assert cfg.loss.class_loss == "sigmoid_focal" and cfg.loss.class_weight == 2.0
    assert (cfg.matcher.cost_class, cfg.matcher.cost_bbox, cfg.matcher.cost_giou) == (2, 5, 2)
    assert cfg.position.offset == -0.5 and cfg.top_k == 100 and cfg.clip_boxes
    assert cfg.soft_nms is None and not dict(cfg.schemes.items())


def test_variants_and_refusals(model):
    plain = copy.deepcopy(model)
    plain["query_head"]["transformer"]["decoder"]["look_forward_twice"] = False
    plain["query_head"]["mixed_selection"] = False
    cfg = codetr_model_config(plain)
    assert cfg.box_refine == "iterative" and not cfg.queries.mixed_selection
    one_stage = copy.deepcopy(model)
    one_stage["query_head"]["as_two_stage"] = False
    with pytest.raises(UserError, match="two-stage"):
        codetr_model_config(one_stage)
    nms = copy.deepcopy(model)
    nms["query_head"]["test_cfg"]["nms"] = {"type": "nms", "iou_threshold": 0.5}
    with pytest.raises(UserError, match="NMS"):
        codetr_model_config(nms)


def test_query_head_keys(model):
    shapes = {
        "query_head.query_embedding.weight": (20, 256),
        "query_head.transformer.pos_trans.weight": (512, 512),
        "query_head.transformer.pos_trans_norm.bias": (512,),
        "query_head.cls_branches.2.weight": (80, 256),
        "query_head.reg_branches.2.4.bias": (4,),
        "query_head.cls_branches.1.bias": (80,),
        "query_head.transformer.head_pos_embed.weight": (2, 1),
        "query_head.transformer.pos_feats_trans.0.weight": (256, 256),
        "query_head.transformer.pos_feats_norm.1.bias": (256,),
        "neck.extra_convs.0.conv.weight": (256, 512, 3, 3),
    }
    result = convert_codetr({k: torch.zeros(s) for k, s in shapes.items()}, model)
    assert result.clean, result.describe()
    assert set(result.state_dict) == {
        "queries.query_embed.weight",
        "queries.pos_trans.weight",
        "queries.pos_trans_norm.bias",
        "queries.class_embed.weight",
        "queries.bbox_embed.layers.2.bias",
        "head.class_embed.1.bias",
        "neck.projections.3.0.weight",
        "neck.projections.3.0.bias",  # the bias-free conv gets a zero bias
    }
    assert len(result.dropped) == 3


def test_two_stage_rank_is_the_selection():
    torch.manual_seed(0)
    selector = TwoStageQuerySelector(16, 3, mixed_selection=True, num_embeddings=4).eval()
    fields = dict(
        padding_mask=torch.zeros(2, 20, dtype=torch.bool),
        pos=torch.zeros(2, 20, 16),
        spatial_shapes=torch.tensor([[4, 5]]),
        level_start=torch.tensor([0]),
        valid_ratios=torch.ones(2, 1, 2),
    )
    memory = EncoderMemory(tokens=torch.randn(2, 20, 16), **fields)
    top, logits, coords, _ = selector.rank(memory, 4)
    assert torch.equal(top, logits[..., 0].topk(4, dim=1).indices)
    queries, (enc,) = selector(memory, 4)
    chosen = torch.gather(coords, 1, top[..., None].expand(-1, -1, 4)).sigmoid()
    torch.testing.assert_close(queries.reference, chosen)
    torch.testing.assert_close(enc.logits[0], logits)
    # a float64 model ranks and proposes in float64
    double = EncoderMemory(tokens=memory.tokens.double(), **fields)
    top64, logits64, coords64, _ = selector.double().rank(double, 4)
    assert torch.equal(top64, top) and logits64.dtype == coords64.dtype == torch.float64
