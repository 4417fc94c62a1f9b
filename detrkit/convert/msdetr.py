# SPDX-License-Identifier: Apache-2.0
"""Official MS-DETR checkpoints: the root implementation and implementation (a)
(docs/methods.md#ms-detr)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from detrkit.config.schema import (
    DataConfig,
    ExperimentConfig,
)
from detrkit.config.scheme_settings import scheme_settings
from detrkit.convert.deformable_detr import (
    deformable_model_config,
    deformable_rules,
    deformable_train_config,
)
from detrkit.convert.rules import RenameRule
from detrkit.schemes.mixed import MixedConfig

_LAYER = r"transformer\.decoder\.layers\.(\d+)"
_MIXED = "schemes.mixed"
AUX_FFN_RULES = (
    RenameRule(rf"{_LAYER}\.linear3\.(weight|bias)", rf"{_MIXED}.aux_ffn.\1.ffn.linear1.\2"),
    RenameRule(rf"{_LAYER}\.linear4\.(weight|bias)", rf"{_MIXED}.aux_ffn.\1.ffn.linear2.\2"),
    RenameRule(rf"{_LAYER}\.norm4\.(weight|bias)", rf"{_MIXED}.aux_ffn.\1.norm.\2"),
)


def msdetr_rules(args: Mapping[str, Any]) -> tuple[RenameRule, ...]:
    return AUX_FFN_RULES + deformable_rules(args)


def impl_a_rules(args: Mapping[str, Any]) -> tuple[RenameRule, ...]:
    """Implementation (a): independent one-to-many class heads; its box heads alias
    ``bbox_embed`` (docs/methods.md#ms-detr-checkpoints). Without refinement the heads are one
    shared module."""
    heads = r"class_embed_o2m\.{}\.(weight|bias)"
    rules = [RenameRule(r"bbox_embed_o2m\..+", None)]
    if args.get("with_box_refine"):
        rules.append(RenameRule(heads.format(r"(\d+)"), rf"{_MIXED}.class_heads.\1.\2"))
    else:
        rules += [
            RenameRule(heads.format(0), rf"{_MIXED}.class_heads.0.\1"),
            RenameRule(r"class_embed_o2m\.\d+\..+", None),
        ]
    return tuple(rules) + deformable_rules(args)


def mixed_from_args(args: Mapping[str, Any], *, impl_a: bool = False) -> MixedConfig | None:
    """``--use_ms_detr``; the assigner's k and threshold take the values the original runs with
    (its ``--o2m_matcher_k`` / ``--o2m_matcher_threshold`` flags are never wired)."""
    if not args.get("use_ms_detr"):
        return None
    weights = dict(
        class_weight=args.get("o2m_cls_loss_coef", 2.0),
        bbox_weight=args.get("o2m_bbox_loss_coef", 5.0),
        giou_weight=args.get("o2m_giou_loss_coef", 2.0),
    )
    if impl_a:
        return MixedConfig(
            predict_from="layer_output", separate_class_heads=True, aux_ffn=False, **weights
        )
    return MixedConfig(aux_ffn=bool(args.get("use_aux_ffn")), **weights)


def _config(args: Mapping[str, Any], *, impl_a: bool) -> ExperimentConfig:
    model = deformable_model_config(args, top_k=args.get("topk_eval", 100))
    mixed = mixed_from_args(args, impl_a=impl_a)
    decoder = model.decoder
    if mixed is not None and mixed.predict_from == "cross_attn":
        decoder = replace(decoder, order=("cross_attn", "self_attn", "ffn"))
    loss = replace(
        model.loss,
        encoder_class_weight=args.get("enc_cls_loss_coef", 2.0),
        encoder_bbox_weight=args.get("enc_bbox_loss_coef", 5.0),
        encoder_giou_weight=args.get("enc_giou_loss_coef", 2.0),
        encoder_matching="anchors",
    )
    model = replace(
        model,
        decoder=decoder,
        loss=loss,
        nms_iou_threshold=args.get("nms_iou_threshold"),
        schemes=scheme_settings(mixed=mixed),
    )
    return ExperimentConfig(
        model=model,
        data=DataConfig(batch_size=args["batch_size"]),
        train=deformable_train_config(args),
    )


def msdetr_config(args: Mapping[str, Any]) -> ExperimentConfig:
    """The detrkit config equal to an official MS-DETR (root) run's ``args``
    (docs/methods.md#ms-detr-flags)."""
    return _config(args, impl_a=False)


def impl_a_config(args: Mapping[str, Any]) -> ExperimentConfig:
    """The detrkit config equal to an MS-DETR implementation (a) run's ``args``
    (docs/methods.md#ms-detr-implementation-a)."""
    return _config(args, impl_a=True)
