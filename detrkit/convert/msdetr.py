# SPDX-License-Identifier: Apache-2.0
"""Official MS-DETR checkpoints (root implementation, spec C4.1 and C4.6)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from detrkit.config.schema import (
    DataConfig,
    ExperimentConfig,
    MixedConfig,
    SchemesConfig,
)
from detrkit.convert.deformable_detr import (
    deformable_model_config,
    deformable_rules,
    deformable_train_config,
)
from detrkit.convert.rules import RenameRule

_LAYER = r"transformer\.decoder\.layers\.(\d+)"
# The auxiliary FFN is the only scheme (index 0) of an MS-DETR model.
AUX_FFN_RULES = (
    RenameRule(rf"{_LAYER}\.linear3\.(weight|bias)", r"schemes.0.aux_ffn.\1.ffn.linear1.\2"),
    RenameRule(rf"{_LAYER}\.linear4\.(weight|bias)", r"schemes.0.aux_ffn.\1.ffn.linear2.\2"),
    RenameRule(rf"{_LAYER}\.norm4\.(weight|bias)", r"schemes.0.aux_ffn.\1.norm.\2"),
)


def msdetr_rules(args: Mapping[str, Any]) -> tuple[RenameRule, ...]:
    return AUX_FFN_RULES + deformable_rules(args)


def mixed_from_args(args: Mapping[str, Any]) -> MixedConfig | None:
    """``--use_ms_detr``; the assigner's k and threshold use the values the original runs with."""
    if not args.get("use_ms_detr"):
        return None
    return MixedConfig(
        aux_ffn=bool(args.get("use_aux_ffn")),
        class_weight=args.get("o2m_cls_loss_coef", 2.0),
        bbox_weight=args.get("o2m_bbox_loss_coef", 5.0),
        giou_weight=args.get("o2m_giou_loss_coef", 2.0),
    )


def msdetr_config(args: Mapping[str, Any]) -> ExperimentConfig:
    """The detrkit config equal to an official MS-DETR (root) run's ``args`` (spec C4.8)."""
    model = deformable_model_config(args, top_k=args.get("topk_eval", 100))
    mixed = mixed_from_args(args)
    decoder = model.decoder
    if mixed is not None:
        decoder = replace(decoder, order=("cross_attn", "self_attn", "ffn"))
    loss = replace(
        model.loss,
        encoder_class_weight=args.get("enc_cls_loss_coef", 2.0),
        encoder_matching="anchors",
    )
    model = replace(
        model,
        decoder=decoder,
        loss=loss,
        schemes=SchemesConfig(mixed=mixed),
    )
    return ExperimentConfig(
        model=model,
        data=DataConfig(batch_size=args["batch_size"]),
        train=deformable_train_config(args),
    )
