# SPDX-License-Identifier: Apache-2.0
"""Official Deformable DETR checkpoints (docs/methods.md#deformable-detr-checkpoints): key rules
and the config from ``args``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from detrkit.config.schema import (
    BackboneConfig,
    DataConfig,
    ExperimentConfig,
    LossConfig,
    MatcherConfig,
    ModelConfig,
    PositionConfig,
    QueryConfig,
    TrainConfig,
    TransformerConfig,
)
from detrkit.convert.rules import RenameRule, SplitRule
from detrkit.errors import UserError

_ENC = r"transformer\.encoder\.layers\.(\d+)"
_DEC = r"transformer\.decoder\.layers\.(\d+)"
_MSDA = r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"
_CROSS = r"decoder.layers.\1.cross_attn.attn.\2.\3"
_WB = r"(weight|bias)"

DEFORMABLE_SPLITS = (
    SplitRule(
        rf"{_DEC}\.self_attn\.in_proj_{_WB}",
        tuple(rf"decoder.layers.\1.self_attn.attn.{p}.\2" for p in ("q_proj", "k_proj", "v_proj")),
    ),
)

# The parts every Deformable-DETR-style checkpoint shares (DDETR, H-DETR, MS-DETR, MPViT, CoaT).
DEFORMABLE_BODY_RULES = (
    RenameRule(r"backbone\.0\.body\.(.+)", r"backbone.\1"),
    RenameRule(r"backbone\.1\.(row_embed|col_embed)\.weight", r"neck.position.\1.weight"),
    RenameRule(r"input_proj\.(\d+)\.([01])\.(weight|bias)", r"neck.projections.\1.\2.\3"),
    RenameRule(r"transformer\.level_embed", r"encoder.level_embed"),
    RenameRule(rf"{_ENC}\.self_attn\.{_MSDA}", r"encoder.layers.\1.self_attn.\2.\3"),
    RenameRule(rf"{_ENC}\.norm1\.{_WB}", r"encoder.layers.\1.self_attn_norm.\2"),
    RenameRule(rf"{_ENC}\.norm2\.{_WB}", r"encoder.layers.\1.ffn_norm.\2"),
    RenameRule(rf"{_ENC}\.linear(1|2)\.{_WB}", r"encoder.layers.\1.ffn.linear\2.\3"),
    RenameRule(rf"{_DEC}\.cross_attn\.{_MSDA}", _CROSS),
    RenameRule(
        rf"{_DEC}\.self_attn\.out_proj\.{_WB}", r"decoder.layers.\1.self_attn.attn.out_proj.\2"
    ),
    # Deformable DETR's norm1 follows cross-attention and norm2 self-attention
    # (docs/methods.md#implementation-notes).
    RenameRule(rf"{_DEC}\.norm1\.{_WB}", r"decoder.layers.\1.cross_attn_norm.\2"),
    RenameRule(rf"{_DEC}\.norm2\.{_WB}", r"decoder.layers.\1.self_attn_norm.\2"),
    RenameRule(rf"{_DEC}\.norm3\.{_WB}", r"decoder.layers.\1.ffn_norm.\2"),
    RenameRule(rf"{_DEC}\.linear(1|2)\.{_WB}", r"decoder.layers.\1.ffn.linear\2.\3"),
    RenameRule(r"transformer\.reference_points\.(weight|bias)", r"queries.reference_points.\1"),
    RenameRule(r"query_embed\.weight", r"queries.query_embed.weight"),
    RenameRule(
        r"transformer\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.(weight|bias)",
        r"queries.\1.\2",
    ),
    # The decoder's copies of the heads alias the top-level ones
    # (docs/methods.md#deformable-detr-checkpoints).
    RenameRule(r"transformer\.decoder\.(class_embed|bbox_embed)\..+", None),
    RenameRule(r".*(total_params|total_ops)", None),
)


def deformable_head_rules(args: Mapping[str, Any]) -> tuple[RenameRule, ...]:
    """Per-layer heads (refine), one shared head (its other indices are aliases), and the
    two-stage encoder head stored at index ``dec_layers``."""
    layers = args["dec_layers"]
    box = r"bbox_embed\.{}\.layers\.(\d)\.(weight|bias)"
    cls = r"class_embed\.{}\.(weight|bias)"
    rules = []
    if args.get("two_stage"):
        rules += [
            RenameRule(cls.format(layers), r"queries.class_embed.\1"),
            RenameRule(box.format(layers), r"queries.bbox_embed.layers.\1.\2"),
        ]
    if args.get("with_box_refine"):
        rules += [
            RenameRule(cls.format(r"(\d+)"), r"head.class_embed.\1.\2"),
            RenameRule(box.format(r"(\d+)"), r"head.bbox_embed.\1.layers.\2.\3"),
        ]
    else:
        rules += [
            RenameRule(cls.format(0), r"head.class_embed.0.\1"),
            RenameRule(box.format(0), r"head.bbox_embed.0.layers.\1.\2"),
            RenameRule(r"(class_embed|bbox_embed)\.\d+\..+", None),
        ]
    return tuple(rules)


def deformable_rules(args: Mapping[str, Any]) -> tuple[RenameRule, ...]:
    return DEFORMABLE_BODY_RULES + deformable_head_rules(args)


def deformable_model_config(args: Mapping[str, Any], **changes) -> ModelConfig:
    """The detrkit model equal to a Deformable-DETR-style run's ``args``
    (docs/methods.md#deformable-detr-flags)."""
    if args.get("masks"):
        raise UserError("segmentation checkpoints (--masks) are not supported")
    layer = dict(ffn_dim=args["dim_feedforward"], dropout=args["dropout"], attention="ms_deform")
    fields = dict(
        num_classes=91,
        hidden_dim=args["hidden_dim"],
        num_heads=args["nheads"],
        num_queries=args["num_queries"],
        num_feature_levels=args["num_feature_levels"],
        box_refine=_box_refine(args),
        queries=QueryConfig(
            kind="two_stage" if args["two_stage"] else "learned_with_reference",
            mixed_selection=bool(args.get("mixed_selection")),
        ),
        backbone=BackboneConfig(
            name=args["backbone"], dilation=args["dilation"], trainable=args["lr_backbone"] > 0
        ),
        position=PositionConfig(kind=_position_kind(args), offset=-0.5),
        encoder=TransformerConfig(
            num_layers=args["enc_layers"], num_points=args["enc_n_points"], **layer
        ),
        decoder=TransformerConfig(
            num_layers=args["dec_layers"], num_points=args["dec_n_points"], **layer
        ),
        matcher=MatcherConfig(args["set_cost_class"], args["set_cost_bbox"], args["set_cost_giou"]),
        loss=LossConfig(
            class_loss="sigmoid_focal",
            class_weight=args["cls_loss_coef"],
            bbox_weight=args["bbox_loss_coef"],
            giou_weight=args["giou_loss_coef"],
            focal_alpha=args["focal_alpha"],
            aux_loss=args["aux_loss"],
        ),
        top_k=100,
    )
    fields.update(changes)
    return ModelConfig(**fields)


def _box_refine(args: Mapping[str, Any]) -> str:
    """``--with_box_refine`` and H-DETR's ``--look_forward_twice`` (forks that lack it: off)."""
    if not args["with_box_refine"]:
        return "none"
    return "look_forward_twice" if args.get("look_forward_twice") else "iterative"


def _position_kind(args: Mapping[str, Any]) -> str:
    return "learned" if args.get("position_embedding") in ("learned", "v3") else "sine"


def deformable_train_config(args: Mapping[str, Any]) -> TrainConfig:
    return TrainConfig(
        epochs=args["epochs"],
        lr=args["lr"],
        lr_backbone=args["lr_backbone"],
        lr_linear_proj_mult=args.get("lr_linear_proj_mult", 0.1),
        weight_decay=args["weight_decay"],
        lr_drop=args["lr_drop"],
        clip_max_norm=args["clip_max_norm"],
        seed=args["seed"],
    )


def deformable_config(args: Mapping[str, Any]) -> ExperimentConfig:
    return ExperimentConfig(
        model=deformable_model_config(args),
        data=DataConfig(batch_size=args["batch_size"]),
        train=deformable_train_config(args),
    )
