# SPDX-License-Identifier: Apache-2.0
"""Official Deformable DETR with CoaT backbones (mlpc-ucsd/CoaT, tasks/Deformable-DETR;
docs/methods.md#mpvit-and-coat-coat).

The detector is plain Deformable DETR; only the backbone differs: its parameters are stored under
``backbone.0.backbone.*`` with the original CoaT names, which are timm's (``body.*`` in detrkit).
The blocks' copies of the shared ``cpe``/``crpe`` modules and the parallel blocks' ``mlp3`` /
``mlp4`` (= ``mlp2``) are aliases and are dropped, like classification-only weights.
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

_CoaT = r"backbone\.0\.backbone\."
COAT_BACKBONE_RULES = (
    RenameRule(rf"{_CoaT}serial_blocks[1-4]\.\d+\.(cpe|factoratt_crpe\.crpe)\..+", None),
    RenameRule(rf"{_CoaT}parallel_blocks\.\d+\.(factoratt_crpe[234]\.crpe|mlp[34])\..+", None),
    RenameRule(rf"{_CoaT}(norm[1-4]|head|aggregate)\..+", None),
    RenameRule(rf"{_CoaT}(.+)", r"backbone.body.\1"),
)
# ``--backbone_kwargs`` entries detrkit maps (the original passes the dict to CoaT's constructor).
_KWARGS = {"drop_path_rate"}


def coat_rules(args: Mapping[str, Any]) -> tuple[RenameRule, ...]:
    return COAT_BACKBONE_RULES + deformable_rules(args)


def backbone_kwargs(args: Mapping[str, Any]) -> dict[str, Any]:
    """``--backbone_kwargs``: a dict literal (stored as a string, backquotes removed, as the
    original does before ``eval``), e.g. ``"{'drop_path_rate': 0.2}"``."""
    value = args.get("backbone_kwargs") or {}
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value.replace("`", ""))
        except (ValueError, SyntaxError) as error:
            raise UserError(f"backbone_kwargs {value!r} is not a dict literal") from error
    if not isinstance(value, dict):
        raise UserError(f"backbone_kwargs {value!r} is not a dict")
    unknown = sorted(set(value) - _KWARGS)
    if unknown:
        raise UserError(
            f"backbone_kwargs {unknown} are not supported for CoaT (only {sorted(_KWARGS)})"
        )
    return value


def coat_backbone_config(args: Mapping[str, Any]) -> BackboneConfig:
    """The whole backbone is trained (no frozen stages); ``--dilation`` is ignored by the
    original CoaT wrapper, hence off."""
    return BackboneConfig(
        name=args["backbone"],
        trainable=args["lr_backbone"] > 0,
        frozen_stages=0,
        drop_path_rate=float(backbone_kwargs(args).get("drop_path_rate", 0.0)),
    )


def coat_config(args: Mapping[str, Any]) -> ExperimentConfig:
    """The detrkit config equal to an official Deformable-DETR-with-CoaT run's ``args``."""
    return ExperimentConfig(
        model=deformable_model_config(args, backbone=coat_backbone_config(args)),
        data=DataConfig(batch_size=args["batch_size"]),
        train=deformable_train_config(args),
    )
