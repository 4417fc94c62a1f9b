# SPDX-License-Identifier: Apache-2.0
"""The detrkit model equal to an official Co-DETR (Sense-X/Co-DETR, mmdetection 2.x) model
config: the merged ``model`` dict of a ``projects/configs/co_*`` file, as the golden cases
record it under ``config.model``.

Only the query head (the DETR part) is translated: Co-DINO's ``CoDINOHead`` (DINO) and
Co-Deformable-DETR's ``CoDeformDETRHead`` (two-stage Deformable DETR with box refinement,
mixed selection and look-forward-twice). The collaborative auxiliary heads (``rpn_head``,
``roi_head``, ``bbox_head``) are the training-only ``collaborative`` scheme, whose options
``convert.codetr_source`` reads from the same config; ``convert.codetr`` drops their weights
unless asked to keep them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from detrkit.config.schema import (
    BackboneConfig,
    LossConfig,
    MatcherConfig,
    ModelConfig,
    PositionConfig,
    QueryConfig,
    SoftNmsConfig,
    TransformerConfig,
)
from detrkit.config.scheme_settings import SchemeSettings
from detrkit.errors import UserError

# mmdetection's DETR-style heads and what detrkit builds of them.
_DINO_HEADS = ("CoDINOHead",)
_DEFORMABLE_HEADS = ("CoDeformDETRHead",)
_HEADS = _DINO_HEADS + _DEFORMABLE_HEADS
# mmdet's DeformableDetrTransformer default when a head does not set num_feature_levels.
_DEFAULT_LEVELS = 4
# The clamp of the references' logit: Co-DINO passes eps=1e-3, Co-Deformable-DETR keeps
# mmdet 2.x's ``inverse_sigmoid`` default.
_DINO_EPS, _DEFORMABLE_EPS = 1e-3, 1e-5
_RESNET_DEPTHS = (18, 34, 50, 101)
# mmcv's defaults where a config leaves a key out.
_MSDA_DEFAULTS = dict(num_heads=8, num_points=4)
_SOFT_NMS_DEFAULTS = dict(sigma=0.5, min_score=1e-3, method="linear")


def query_head(model: Mapping[str, Any]) -> Mapping[str, Any]:
    """The config's DETR head (``query_head``); an error for anything else."""
    head = model.get("query_head")
    if not isinstance(head, Mapping):
        raise UserError("not a Co-DETR model config: it has no 'query_head' section")
    if head.get("type") not in _HEADS:
        raise UserError(
            f"Co-DETR query head {head.get('type')!r} is not supported yet (supported: "
            f"{', '.join(_HEADS)})"
        )
    return head


def is_dino(head: Mapping[str, Any]) -> bool:
    """Whether a query head is Co-DINO's (else Co-Deformable-DETR's)."""
    return head.get("type") in _DINO_HEADS


def num_feature_levels(head: Mapping[str, Any]) -> int:
    """The query head's feature levels (the transformer's, 4 by default, when the head does
    not say)."""
    default = head["transformer"].get("num_feature_levels", _DEFAULT_LEVELS)
    return head.get("num_feature_levels", default)


def operation_order(layer: Mapping[str, Any]) -> tuple[str, ...]:
    """An mmcv layer's operations without the norms, e.g. (self_attn, cross_attn, ffn)."""
    return tuple(op for op in layer["operation_order"] if op != "norm")


def _attention_options(layer: Mapping[str, Any], index: int) -> dict:
    cfgs = layer["attn_cfgs"]
    cfg = cfgs[index] if isinstance(cfgs, Sequence) else cfgs
    return {key: cfg.get(key, default) for key, default in _MSDA_DEFAULTS.items()} | {
        "dropout": cfg.get("dropout", 0.0)
    }


def _stack(
    stack: Mapping[str, Any], deformable_index: int, order: bool, from_reference: bool = True
) -> TransformerConfig:
    """An mmcv encoder/decoder stack -> TransformerConfig (post-norm, ReLU FFN); ``order``:
    a decoder, whose positions come from its references (DINO) when ``from_reference``, else
    are the query initialiser's (Deformable DETR)."""
    layer = stack["transformerlayers"]
    if layer["operation_order"][0] == "norm":
        raise UserError("pre-norm Co-DETR layers are not supported")
    msda = _attention_options(layer, deformable_index)
    ffn_dropout = layer.get("ffn_dropout", 0.0)
    if ffn_dropout != msda["dropout"]:
        raise UserError("detrkit layers use one dropout for attention and FFN")
    fields = dict(
        num_layers=stack["num_layers"],
        ffn_dim=layer["feedforward_channels"],
        dropout=ffn_dropout,
        attention="ms_deform",
        num_points=msda["num_points"],
    )
    if order:
        fields["order"] = operation_order(layer)
        if from_reference:
            fields |= dict(query_pos="from_reference", output_norm=True)
        else:
            fields["output_norm"] = False
    return TransformerConfig(**fields)


def _backbone(model: Mapping[str, Any]) -> BackboneConfig:
    backbone = model["backbone"]
    if backbone.get("type") != "ResNet" or backbone.get("depth") not in _RESNET_DEPTHS:
        raise UserError(f"Co-DETR backbone {backbone.get('type')} is not supported yet")
    frozen_bn = not backbone.get("norm_cfg", {}).get("requires_grad", True)
    # mmdet's frozen_stages=-1 freezes nothing; k >= 1 freezes the stem and layer1..k.
    return BackboneConfig(
        name=f"resnet{backbone['depth']}",
        frozen_stages=max(backbone.get("frozen_stages", -1), 0),
        norm="frozen_bn" if frozen_bn or backbone.get("norm_eval") else "bn",
    )


def _check_neck(neck: Mapping[str, Any], levels: int) -> None:
    if neck.get("type") != "ChannelMapper" or neck.get("kernel_size", 3) != 1:
        raise UserError("Co-DETR necks other than a 1x1 ChannelMapper are not supported")
    if neck.get("num_outs", len(neck["in_channels"])) != levels:
        raise UserError("the neck's num_outs must equal the query head's num_feature_levels")
    if neck.get("norm_cfg", {}).get("type") != "GN" or neck.get("act_cfg") is not None:
        raise UserError("Co-DETR necks must use GroupNorm and no activation")


def _loss(head: Mapping[str, Any]) -> tuple[LossConfig, MatcherConfig]:
    cls, bbox, iou = head["loss_cls"], head["loss_bbox"], head["loss_iou"]
    assigner = head["train_cfg"]["assigner"]
    cls_cost = assigner["cls_cost"]
    if cls_cost.get("type") != "FocalLossCost":
        raise UserError(f"Co-DETR matching cost {cls_cost.get('type')} is not supported")
    kinds = {"QualityFocalLoss": "quality_focal", "FocalLoss": "sigmoid_focal"}
    if cls.get("type") not in kinds:
        raise UserError(f"Co-DETR class loss {cls.get('type')} is not supported")
    loss = LossConfig(
        class_loss=kinds[cls["type"]],
        class_weight=cls.get("loss_weight", 1.0),
        bbox_weight=bbox.get("loss_weight", 5.0),
        giou_weight=iou.get("loss_weight", 2.0),
        focal_alpha=cls.get("alpha", cls_cost.get("alpha", 0.25)),
        focal_gamma=cls.get("gamma", cls_cost.get("gamma", 2.0)),
        quality_beta=cls.get("beta", 2.0),
    )
    matcher = MatcherConfig(
        cost_class=cls_cost.get("weight", 1.0),
        cost_bbox=assigner["reg_cost"].get("weight", 1.0),
        cost_giou=assigner["iou_cost"].get("weight", 1.0),
    )
    return loss, matcher


def _soft_nms(test_cfg: Mapping[str, Any]) -> SoftNmsConfig | None:
    nms = test_cfg.get("nms")
    if nms is None:
        return None
    if nms.get("type") != "soft_nms":
        raise UserError(f"Co-DETR test-time NMS {nms.get('type')} is not supported")
    options = {key: nms.get(key, default) for key, default in _SOFT_NMS_DEFAULTS.items()}
    return SoftNmsConfig(iou_threshold=nms.get("iou_threshold", 0.3), **options)


def _denoising(head: Mapping[str, Any]) -> SchemeSettings:
    """Co-DINO's denoising: ``num_dn_queries`` split into groups, a label table of C rows."""
    from detrkit.schemes.denoising import DenoisingConfig

    dn = head.get("dn_cfg")
    if dn is None:
        return SchemeSettings()
    group = dn.get("group_cfg", {})
    if not group.get("dynamic", True):
        raise UserError("Co-DINO denoising with a fixed number of groups is not supported")
    noise = dn.get("noise_scale", {})
    options = DenoisingConfig(
        dn_number=group["num_dn_queries"],
        label_noise_ratio=noise.get("label", 0.5),
        box_noise_scale=noise.get("box", 0.4),
        extra_label_row=False,
    )
    return SchemeSettings({"denoising": options})


def _dino_parts(head: Mapping[str, Any]) -> dict:
    """Co-DINO: DINO's query selection with positions from the references, a shared output
    norm, the references' logit clamped at 1e-3, soft-NMS and denoising."""
    return dict(
        box_refine="look_forward_twice",
        inverse_sigmoid_eps=_DINO_EPS,
        queries=QueryConfig(kind="dino"),
        decoder=_stack(head["transformer"]["decoder"], 1, order=True),
        soft_nms=_soft_nms(head.get("test_cfg", {})),
        schemes=_denoising(head),
    )


def _deformable_parts(head: Mapping[str, Any]) -> dict:
    """Co-Deformable-DETR: Deformable DETR's two-stage selection (top ``num_query`` tokens by
    the first logit; ``get_proposal_pos_embed`` with ``embed_dims // 2`` features, as
    detrkit's), constant query positions, no output norm, mmdet's 1e-5 clamp, no NMS."""
    transformer = head["transformer"]
    decoder = transformer["decoder"]
    if head.get("test_cfg", {}).get("nms") is not None:
        raise UserError("Co-Deformable-DETR with test-time NMS is not supported")
    if head.get("test_cfg", {}).get("score_thr", 0) != 0:
        raise UserError("Co-Deformable-DETR with a test_cfg.score_thr is not supported")
    mixed = bool(head.get("mixed_selection", transformer.get("mixed_selection", False)))
    return dict(
        box_refine="look_forward_twice" if decoder.get("look_forward_twice") else "iterative",
        inverse_sigmoid_eps=_DEFORMABLE_EPS,
        queries=QueryConfig(kind="two_stage", mixed_selection=mixed),
        decoder=_stack(decoder, 1, order=True, from_reference=False),
    )


def codetr_model_config(model: Mapping[str, Any]) -> ModelConfig:
    """The detrkit ``ModelConfig`` of a Co-DETR model config's query head: Co-DINO (DINO's
    query selection, look-forward-twice, quality focal loss, soft-NMS) or Co-Deformable-DETR
    (two-stage Deformable DETR, sigmoid focal loss); per-layer heads, clamped boxes."""
    head = query_head(model)
    transformer = head["transformer"]
    if not (head.get("as_two_stage") and head.get("with_box_refine")):
        raise UserError(
            "Co-DETR query heads without two-stage selection and box refinement are unsupported"
        )
    neck, position = model["neck"], head["positional_encoding"]
    levels = num_feature_levels(head)
    _check_neck(neck, levels)
    loss, matcher = _loss(head)
    msda = _attention_options(transformer["encoder"]["transformerlayers"], 0)
    parts = _dino_parts(head) if is_dino(head) else _deformable_parts(head)
    return ModelConfig(
        num_classes=head["num_classes"],
        hidden_dim=2 * position["num_feats"],
        num_heads=msda["num_heads"],
        num_queries=head["num_query"],
        num_feature_levels=levels,
        num_backbone_stages=len(neck["in_channels"]),
        shared_heads=False,
        backbone=_backbone(model),
        position=PositionConfig(
            temperature=position.get("temperature", 10000), offset=position.get("offset", 0.0)
        ),
        encoder=_stack(transformer["encoder"], 0, order=False),
        matcher=matcher,
        loss=loss,
        top_k=head.get("test_cfg", {}).get("max_per_img", 100),
        clip_boxes=True,
        **parts,
    )
