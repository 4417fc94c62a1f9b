# SPDX-License-Identifier: Apache-2.0
"""Official H-Deformable-DETR checkpoints: Deformable DETR's layout plus the hybrid options."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from detrkit.config.schema import (
    BackboneConfig,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
)
from detrkit.config.scheme_settings import scheme_settings
from detrkit.convert.deformable_detr import (
    deformable_model_config,
    deformable_rules,
    deformable_train_config,
)
from detrkit.convert.rules import RenameRule
from detrkit.convert.swin import is_swin, swin_rules
from detrkit.schemes.hybrid import HybridConfig

# H-DETR's ``--drop_path_rate`` default (docs/methods.md#h-detr-flags).
DEFAULT_DROP_PATH_RATE = 0.2


def hybrid_from_args(args: Mapping[str, Any]) -> HybridConfig | None:
    """``--num_queries_one2many`` / ``--k_one2many`` / ``--lambda_one2many``; 0 turns it off."""
    if not args.get("num_queries_one2many") or not args.get("k_one2many"):
        return None
    return HybridConfig(
        num_queries=args["num_queries_one2many"],
        repeat_k=args["k_one2many"],
        loss_weight=args.get("lambda_one2many", 1.0),
    )


def hdetr_rules(args: Mapping[str, Any]) -> tuple[RenameRule, ...]:
    """Deformable DETR's rules, preceded by the Swin ones when ``--backbone swin_*``."""
    return swin_rules(args) + deformable_rules(args)


def hdetr_backbone(args: Mapping[str, Any]) -> BackboneConfig:
    """``--backbone`` (resnet50/101, swin_tiny/small/large/large_window12), ``--dilation``,
    ``--lr_backbone``; a Swin freezes nothing, keeps ``--drop_path_rate`` and always
    checkpoints its blocks (docs/methods.md#h-detr-architecture)."""
    trainable = args["lr_backbone"] > 0
    if not is_swin(args):
        return BackboneConfig(name=args["backbone"], dilation=args["dilation"], trainable=trainable)
    return BackboneConfig(
        name=args["backbone"],
        trainable=trainable,
        frozen_stages=0,
        drop_path_rate=args.get("drop_path_rate", DEFAULT_DROP_PATH_RATE),
        checkpointing=True,
    )


def hdetr_model_config(args: Mapping[str, Any]) -> ModelConfig:
    """The model of an H-DETR run; ``--use_checkpoint`` checkpoints encoder and decoder layers."""
    model = deformable_model_config(
        args,
        top_k=args.get("topk", 100),
        schemes=scheme_settings(hybrid=hybrid_from_args(args)),
        backbone=hdetr_backbone(args),
    )
    checkpointing = bool(args.get("use_checkpoint"))
    return replace(
        model,
        encoder=replace(model.encoder, checkpointing=checkpointing),
        decoder=replace(model.decoder, checkpointing=checkpointing),
    )


def hdetr_config(args: Mapping[str, Any]) -> ExperimentConfig:
    """The detrkit config equal to an official H-DETR run's ``args``
    (docs/methods.md#h-detr-flags)."""
    args = dict(args, num_queries=args.get("num_queries_one2one", args.get("num_queries")))
    return ExperimentConfig(
        model=hdetr_model_config(args),
        data=DataConfig(batch_size=args["batch_size"]),
        train=deformable_train_config(args),
    )
