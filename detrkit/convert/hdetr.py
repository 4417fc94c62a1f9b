# SPDX-License-Identifier: Apache-2.0
"""Official H-Deformable-DETR checkpoints: Deformable DETR's layout plus the hybrid options."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from detrkit.config.schema import (
    DataConfig,
    ExperimentConfig,
    HybridConfig,
    SchemesConfig,
)
from detrkit.convert.deformable_detr import deformable_model_config, deformable_train_config


def hybrid_from_args(args: Mapping[str, Any]) -> HybridConfig | None:
    """``--num_queries_one2many`` / ``--k_one2many`` / ``--lambda_one2many``; 0 turns it off."""
    if not args.get("num_queries_one2many") or not args.get("k_one2many"):
        return None
    return HybridConfig(
        num_queries=args["num_queries_one2many"],
        repeat_k=args["k_one2many"],
        loss_weight=args.get("lambda_one2many", 1.0),
    )


def hdetr_config(args: Mapping[str, Any]) -> ExperimentConfig:
    """The detrkit config equal to an official H-DETR run's ``args`` (spec C3.6)."""
    args = dict(args, num_queries=args.get("num_queries_one2one", args.get("num_queries")))
    model = deformable_model_config(
        args, top_k=args.get("topk", 100), schemes=SchemesConfig(hybrid=hybrid_from_args(args))
    )
    return ExperimentConfig(
        model=model,
        data=DataConfig(batch_size=args["batch_size"]),
        train=deformable_train_config(args),
    )
