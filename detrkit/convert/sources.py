# SPDX-License-Identifier: Apache-2.0
"""One rule table per official source format, plus how its stored ``args`` become a config."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from detrkit.config.schema import (
    BackboneConfig,
    DataConfig,
    ExperimentConfig,
    LossConfig,
    MatcherConfig,
    ModelConfig,
    PositionConfig,
    TrainConfig,
    TransformerConfig,
)
from detrkit.convert.coat import coat_config, coat_rules
from detrkit.convert.deformable_detr import DEFORMABLE_SPLITS, deformable_config, deformable_rules
from detrkit.convert.dino import check_aliases, dino_config, dino_rules
from detrkit.convert.hdetr import hdetr_config, hdetr_rules
from detrkit.convert.mpvit import mpvit_config, mpvit_rules
from detrkit.convert.msdetr import impl_a_config, impl_a_rules, msdetr_config, msdetr_rules
from detrkit.convert.rules import RenameRule, SplitRule
from detrkit.convert.smca import (
    DECODER_PRIOR_RULES,
    MULTI_SCALE_RULES,
    smca_config,
    smca_multi_scale_config,
    with_original_bugs,
)
from detrkit.errors import UserError

_QKV = ("q_proj", "k_proj", "v_proj")


def _mha_split(source: str, target: str) -> SplitRule:
    """``{source}.in_proj_{weight,bias}`` -> ``{target}.{q,k,v}_proj.{weight,bias}``."""
    return SplitRule(
        rf"{source}\.in_proj_(weight|bias)",
        tuple(rf"{target}.{name}.\{_group_count(source) + 1}" for name in _QKV),
    )


def _group_count(pattern: str) -> int:
    return re.compile(pattern).groups


_DETR_LAYER = r"transformer\.(encoder|decoder)\.layers\.(\d+)"
DETR_SPLITS = (
    _mha_split(
        r"transformer\.encoder\.layers\.(\d+)\.self_attn", r"encoder.layers.\1.self_attn.attn"
    ),
    _mha_split(
        r"transformer\.decoder\.layers\.(\d+)\.self_attn", r"decoder.layers.\1.self_attn.attn"
    ),
    _mha_split(
        r"transformer\.decoder\.layers\.(\d+)\.multihead_attn", r"decoder.layers.\1.cross_attn.attn"
    ),
)
# ``--position_embedding learned`` tables (both DETR and the Deformable family).
LEARNED_POSITION_RULE = RenameRule(
    r"backbone\.1\.(row_embed|col_embed)\.weight", r"neck.position.\1.weight"
)
DETR_RULES = (
    RenameRule(r"backbone\.0\.body\.(.+)", r"backbone.\1"),
    LEARNED_POSITION_RULE,
    RenameRule(r"input_proj\.(weight|bias)", r"neck.projections.0.0.\1"),
    RenameRule(r"query_embed\.weight", r"queries.query_embed.weight"),
    RenameRule(r"class_embed\.(weight|bias)", r"head.class_embed.0.\1"),
    RenameRule(r"bbox_embed\.layers\.(\d)\.(weight|bias)", r"head.bbox_embed.0.layers.\1.\2"),
    RenameRule(
        rf"{_DETR_LAYER}\.self_attn\.out_proj\.(weight|bias)",
        r"\1.layers.\2.self_attn.attn.out_proj.\3",
    ),
    RenameRule(
        rf"{_DETR_LAYER}\.multihead_attn\.out_proj\.(weight|bias)",
        r"\1.layers.\2.cross_attn.attn.out_proj.\3",
    ),
    RenameRule(rf"{_DETR_LAYER}\.linear(1|2)\.(weight|bias)", r"\1.layers.\2.ffn.linear\3.\4"),
    RenameRule(
        r"transformer\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)",
        r"encoder.layers.\1.self_attn_norm.\2",
    ),
    RenameRule(
        r"transformer\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)",
        r"encoder.layers.\1.ffn_norm.\2",
    ),
    RenameRule(
        r"transformer\.decoder\.layers\.(\d+)\.norm1\.(weight|bias)",
        r"decoder.layers.\1.self_attn_norm.\2",
    ),
    RenameRule(
        r"transformer\.decoder\.layers\.(\d+)\.norm2\.(weight|bias)",
        r"decoder.layers.\1.cross_attn_norm.\2",
    ),
    RenameRule(
        r"transformer\.decoder\.layers\.(\d+)\.norm3\.(weight|bias)",
        r"decoder.layers.\1.ffn_norm.\2",
    ),
    RenameRule(r"transformer\.encoder\.norm\.(weight|bias)", r"encoder.final_norm.\1"),
    RenameRule(r"transformer\.decoder\.norm\.(weight|bias)", r"decoder.output_norm.\1"),
)

# DETR's dataset_file -> number of class logits minus "no object" (docs/methods.md#detr-flags).
_DETR_NUM_CLASSES = {"coco": 91, "coco_panoptic": 250}


def detr_config(args: Mapping[str, Any]) -> ExperimentConfig:
    """The detrkit config equal to an official DETR run's ``args`` (docs/methods.md#detr-flags)."""
    if args.get("masks"):
        raise UserError(
            "DETR segmentation checkpoints (--masks) are not supported; "
            "convert a box-only checkpoint"
        )
    transformer = dict(
        ffn_dim=args["dim_feedforward"], dropout=args["dropout"], pre_norm=args["pre_norm"]
    )
    model = ModelConfig(
        num_classes=_DETR_NUM_CLASSES.get(args.get("dataset_file", "coco"), 91),
        hidden_dim=args["hidden_dim"],
        num_heads=args["nheads"],
        num_queries=args["num_queries"],
        backbone=BackboneConfig(
            name=args["backbone"], dilation=args["dilation"], trainable=args["lr_backbone"] > 0
        ),
        position=PositionConfig(kind=_position_kind(args["position_embedding"])),
        encoder=TransformerConfig(num_layers=args["enc_layers"], **transformer),
        decoder=TransformerConfig(num_layers=args["dec_layers"], **transformer),
        matcher=MatcherConfig(args["set_cost_class"], args["set_cost_bbox"], args["set_cost_giou"]),
        loss=LossConfig(
            class_loss="softmax_ce",
            bbox_weight=args["bbox_loss_coef"],
            giou_weight=args["giou_loss_coef"],
            eos_coef=args["eos_coef"],
            aux_loss=args["aux_loss"],
        ),
    )
    train = TrainConfig(
        epochs=args["epochs"],
        lr=args["lr"],
        lr_backbone=args["lr_backbone"],
        weight_decay=args["weight_decay"],
        lr_drop=args["lr_drop"],
        clip_max_norm=args["clip_max_norm"],
        seed=args["seed"],
    )
    return ExperimentConfig(
        model=model, data=DataConfig(batch_size=args["batch_size"]), train=train
    )


def _position_kind(value: str) -> str:
    return {"sine": "sine", "v2": "sine", "learned": "learned", "v3": "learned"}[value]


def _smca_config(args: Mapping[str, Any]) -> ExperimentConfig:
    """Single-scale SMCA: DETR plus the Gaussian-modulated decoder
    (docs/methods.md#smca-detr-single-scale)."""
    return smca_config(detr_config(args), args)


def _smca_ms_config(
    kernel_size: int, shared: bool
) -> Callable[[Mapping[str, Any]], ExperimentConfig]:
    """Multi-scale SMCA of one of the zip's two encoder files
    (docs/methods.md#smca-detr-multi-scale)."""
    return lambda args: smca_multi_scale_config(
        detr_config(args), args, kernel_size=kernel_size, shared_cross_scale=shared
    )


def _smca_ms_source(name: str, repo: str, kernel_size: int, shared: bool) -> SourceFormat:
    return SourceFormat(
        name,
        (repo,),
        lambda args: MULTI_SCALE_RULES + DECODER_PRIOR_RULES + DETR_RULES,
        DETR_SPLITS,
        _smca_ms_config(kernel_size, shared),
        original_bugs=with_original_bugs,
    )


@dataclass(frozen=True)
class SourceFormat:
    """How to read one official repository's checkpoints.

    Attributes:
        name: the ``--from`` value.
        repos: golden-case ``repo`` values this format covers.
        rules_for: official ``args`` -> rename rules (head layouts depend on the options).
        splits: tensor-splitting rules.
        config_from_args: official ``args`` (a dict) -> ExperimentConfig.
        original_bugs: turns a config from ``config_from_args`` into one that also reproduces
            the original's known bugs (which detrkit fixes by default), or None when there are
            none to reproduce. The golden cases record the originals, bugs included.
        check_state: ``(state_dict, args)`` raises ``UserError`` when tensors that the rules
            drop as aliases are not what they should alias (DINO's shared heads); None = no
            check.
    """

    name: str
    repos: tuple[str, ...]
    rules_for: Callable[[Mapping[str, Any]], tuple[RenameRule, ...]]
    splits: tuple[SplitRule, ...]
    config_from_args: Callable[[Mapping[str, Any]], ExperimentConfig]
    original_bugs: Callable[[ExperimentConfig], ExperimentConfig] | None = None
    check_state: Callable[[Mapping[str, Tensor], Mapping[str, Any]], None] | None = None


SOURCES: dict[str, SourceFormat] = {
    "smca": SourceFormat(
        "smca",
        ("SMCA-DETR",),
        lambda args: DECODER_PRIOR_RULES + DETR_RULES,
        DETR_SPLITS,
        _smca_config,
    ),
    "smca_ms": _smca_ms_source("smca_ms", "SMCA-DETR-ms", kernel_size=5, shared=False),
    "smca_ms_k7": _smca_ms_source("smca_ms_k7", "SMCA-DETR-ms-k7", kernel_size=7, shared=True),
    "detr": SourceFormat("detr", ("detr",), lambda args: DETR_RULES, DETR_SPLITS, detr_config),
    "deformable_detr": SourceFormat(
        "deformable_detr",
        ("Deformable-DETR",),
        deformable_rules,
        DEFORMABLE_SPLITS,
        deformable_config,
    ),
    "msdetr": SourceFormat("msdetr", ("MS-DETR",), msdetr_rules, DEFORMABLE_SPLITS, msdetr_config),
    "msdetr_impl_a": SourceFormat(
        "msdetr_impl_a", ("MS-DETR-impl_a",), impl_a_rules, DEFORMABLE_SPLITS, impl_a_config
    ),
    "hdetr": SourceFormat(
        "hdetr", ("H-Deformable-DETR",), hdetr_rules, DEFORMABLE_SPLITS, hdetr_config
    ),
    "coat_deformable_detr": SourceFormat(
        "coat_deformable_detr",
        ("CoaT-Deformable-DETR",),
        coat_rules,
        DEFORMABLE_SPLITS,
        coat_config,
    ),
    "dino": SourceFormat(
        "dino", ("DINO",), dino_rules, DEFORMABLE_SPLITS, dino_config, check_state=check_aliases
    ),
    "mpvit_deformable_detr": SourceFormat(
        "mpvit_deformable_detr",
        ("MPViT-deformable_detr",),
        mpvit_rules,
        DEFORMABLE_SPLITS,
        mpvit_config,
    ),
}


def source_for_repo(repo: str) -> SourceFormat | None:
    """The format whose golden ``repo`` name is ``repo``, or None when unsupported."""
    return next((s for s in SOURCES.values() if repo in s.repos), None)


def get_source(name: str) -> SourceFormat:
    if name not in SOURCES:
        raise UserError(f"unknown checkpoint source '{name}'; choose one of {sorted(SOURCES)}")
    return SOURCES[name]
