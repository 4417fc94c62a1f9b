# SPDX-License-Identifier: Apache-2.0
"""Official "Deformable DETR with MPViT" checkpoints (docs/methods.md#mpvit-and-coat).

The repository copies Deformable DETR and only swaps the backbone, so the Deformable DETR rules
and config apply; the MPViT parameters sit under ``backbone.0.backbone.*`` with detrkit's names.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

from detrkit.config.schema import BackboneConfig, DataConfig, ExperimentConfig
from detrkit.convert.deformable_detr import (
    deformable_model_config,
    deformable_rules,
    deformable_train_config,
)
from detrkit.convert.rules import RenameRule
from detrkit.errors import UserError

_BACKBONE = r"backbone\.0\.backbone\."
MPVIT_RULES = (
    # Every block lists its encoder's shared cpe/crpe again: aliases of the encoder-level keys.
    RenameRule(rf"{_BACKBONE}.+\.MHCA_layers\.\d+\.(cpe|crpe|factoratt_crpe\.crpe)\..+", None),
    RenameRule(rf"{_BACKBONE}(.+)", r"backbone.\1"),
)
# ``--backbone_kwargs`` entries detrkit has a config field for.
_KWARGS = ("drop_path_rate",)


def mpvit_rules(args: Mapping[str, Any]) -> tuple[RenameRule, ...]:
    return MPVIT_RULES + deformable_rules(args)


def mpvit_backbone_config(args: Mapping[str, Any]) -> BackboneConfig:
    """MPViT as the original trains it: every stage, trainable BatchNorm (its SyncBN).

    ``--dilation`` is ignored by the original for MPViT, so it is here too.
    """
    kwargs = _backbone_kwargs(args)
    return BackboneConfig(
        name=args["backbone"],
        trainable=args["lr_backbone"] > 0,
        frozen_stages=0,
        norm="bn",
        drop_path_rate=float(kwargs.get("drop_path_rate", 0.0)),
    )


def _backbone_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    """``--backbone_kwargs``: a dict literal such as "{'drop_path_rate': 0.1}"."""
    text = args.get("backbone_kwargs") or "{}"
    try:
        kwargs = ast.literal_eval(text) if isinstance(text, str) else dict(text)
    except (ValueError, SyntaxError) as error:
        raise UserError(f"--backbone_kwargs {text!r} is not a dict literal") from error
    unknown = sorted(set(kwargs) - set(_KWARGS))
    if unknown:
        raise UserError(
            f"--backbone_kwargs {unknown} not supported for MPViT (supported: {list(_KWARGS)})"
        )
    return kwargs


def mpvit_config(args: Mapping[str, Any]) -> ExperimentConfig:
    """The detrkit config equal to an official Deformable-DETR-with-MPViT run's ``args``.

    The repository also runs ResNets (``--backbone resnet50``): those keep Deformable DETR's.
    """
    changes = {}
    if str(args["backbone"]).startswith("mpvit"):
        changes["backbone"] = mpvit_backbone_config(args)
    return ExperimentConfig(
        model=deformable_model_config(args, **changes),
        data=DataConfig(batch_size=args["batch_size"]),
        train=deformable_train_config(args),
    )
