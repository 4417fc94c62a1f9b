# SPDX-License-Identifier: Apache-2.0
"""Official DINO checkpoints (IDEA-Research/DINO, docs/methods.md#dino-checkpoints): key rules,
the alias check of the shared heads and the config from ``args``.

DINO's ``state_dict()`` writes every shared module under each of its names: the single class
and box head appears as ``class_embed.{0..5}``, ``bbox_embed.{0..5}`` and again as
``transformer.decoder.{class,bbox}_embed.{0..5}``. Index 0 is converted, the others are checked
to be the same tensors and dropped. The encoder-proposal heads (``transformer.enc_out_*``) are
separate copies in the released configs and have their own weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

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
from detrkit.config.scheme_settings import scheme_settings
from detrkit.convert.deformable_detr import DEFORMABLE_BODY_RULES
from detrkit.convert.rules import RenameRule
from detrkit.convert.swin import is_swin, swin_rules
from detrkit.errors import UserError
from detrkit.schemes.denoising import DenoisingConfig

# ``config/DINO/DINO_4scale.py`` with the ``--options`` every official script passes
# (docs/methods.md#dino-flags). A file's stored ``args`` (or ``--args-json``) override these,
# so ``--args-json`` only needs the keys a run changed.
OFFICIAL_ARGS: dict[str, Any] = dict(
    num_classes=91, lr=1e-4, lr_backbone=1e-5, weight_decay=1e-4, epochs=12, lr_drop=11,
    clip_max_norm=0.1, batch_size=2, seed=42, param_dict_type="default",
    lr_linear_proj_mult=0.1, backbone="resnet50", dilation=False, use_checkpoint=False,
    backbone_freeze_keywords=None, position_embedding="sine", pe_temperatureH=20,
    pe_temperatureW=20, return_interm_indices=[1, 2, 3], num_feature_levels=4, enc_layers=6,
    dec_layers=6, pre_norm=False, dim_feedforward=2048, hidden_dim=256, dropout=0.0, nheads=8,
    num_queries=900, query_dim=4, num_patterns=0, enc_n_points=4, dec_n_points=4,
    two_stage_type="standard", two_stage_pat_embed=0, two_stage_add_query_num=0,
    two_stage_bbox_embed_share=False, two_stage_class_embed_share=False,
    two_stage_learn_wh=False, dec_pred_bbox_embed_share=True, dec_pred_class_embed_share=True,
    transformer_activation="relu", decoder_sa_type="sa",
    decoder_module_seq=["sa", "ca", "ffn"], dec_layer_number=None, masks=False, aux_loss=True,
    set_cost_class=2.0, set_cost_bbox=5.0, set_cost_giou=2.0, cls_loss_coef=1.0,
    bbox_loss_coef=5.0, giou_loss_coef=2.0, interm_loss_coef=1.0, no_interm_box_loss=False,
    focal_alpha=0.25, num_select=300, nms_iou_threshold=-1, use_dn=True, dn_number=100,
    dn_box_noise_scale=1.0, dn_label_noise_ratio=0.5, embed_init_tgt=True, dn_labelbook_size=91,
    use_ema=False, ema_decay=0.9997, use_detached_boxes_dec_out=False,
)  # fmt: skip

# DINO's ``--backbone`` -> detrkit's (docs/methods.md#dino-architecture). DINO's code builds
# only ResNet-50/101; the small ResNets read test-size checkpoints of the same layout.
BACKBONES = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "swin_T_224_1k": "swin_tiny",
    "swin_B_224_22k": "swin_base",
    "swin_L_224_22k": "swin_large",
    "swin_L_384_22k": "swin_large_window12",
}
# DINO's Swin: stochastic depth 0.2, nothing frozen.
_SWIN_DROP_PATH = 0.2
# DINO's inverse_sigmoid clamps at 1e-3 (Deformable DETR: 1e-5).
_DINO_EPS = 1e-3
_DN = "schemes.denoising"
_WB = r"(weight|bias)"

# Options the released models never change and detrkit builds one way only: name -> the value
# detrkit supports.
_FIXED = dict(
    two_stage_type="standard", embed_init_tgt=True, decoder_sa_type="sa",
    decoder_module_seq=["sa", "ca", "ffn"], num_patterns=0, two_stage_add_query_num=0,
    two_stage_pat_embed=0, two_stage_learn_wh=False, two_stage_bbox_embed_share=False,
    two_stage_class_embed_share=False, query_dim=4, dec_layer_number=None, pre_norm=False,
    masks=False, backbone_freeze_keywords=None,
)  # fmt: skip

_DINO_RULES = (
    RenameRule(rf"transformer\.decoder\.norm\.{_WB}", r"decoder.output_norm.\1"),
    RenameRule(
        rf"transformer\.decoder\.ref_point_head\.layers\.([01])\.{_WB}",
        r"decoder.query_pos_head.mlp.layers.\1.\2",
    ),
    RenameRule(r"transformer\.tgt_embed\.weight", r"queries.tgt_embed.weight"),
    RenameRule(rf"transformer\.enc_out_class_embed\.{_WB}", r"queries.class_embed.\1"),
    RenameRule(
        rf"transformer\.enc_out_bbox_embed\.layers\.(\d)\.{_WB}",
        r"queries.bbox_embed.layers.\1.\2",
    ),
)


def with_official_defaults(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` over the official DINO-4scale defaults."""
    return {**OFFICIAL_ARGS, **args}


def _shared(args: Mapping[str, Any]) -> bool:
    """``--dec_pred_{class,bbox}_embed_share``: detrkit shares both heads or neither."""
    box, cls = args["dec_pred_bbox_embed_share"], args["dec_pred_class_embed_share"]
    if box != cls:
        raise UserError(
            "DINO checkpoints that share only one of the class and box heads across decoder "
            "layers (dec_pred_bbox_embed_share != dec_pred_class_embed_share) are not supported"
        )
    return bool(box)


def head_rules(args: Mapping[str, Any]) -> tuple[RenameRule, ...]:
    """One shared class + box head (index 0; the other indices are aliases), or one per layer."""
    if not _shared(args):
        return (
            RenameRule(rf"class_embed\.(\d+)\.{_WB}", r"head.class_embed.\1.\2"),
            RenameRule(
                rf"bbox_embed\.(\d+)\.layers\.(\d)\.{_WB}", r"head.bbox_embed.\1.layers.\2.\3"
            ),
        )
    return (
        RenameRule(rf"class_embed\.0\.{_WB}", r"head.class_embed.0.\1"),
        RenameRule(rf"bbox_embed\.0\.layers\.(\d)\.{_WB}", r"head.bbox_embed.0.layers.\1.\2"),
        RenameRule(r"(class_embed|bbox_embed)\.\d+\..+", None),
    )


def _backbone_rules(args: Mapping[str, Any]) -> tuple[RenameRule, ...]:
    """DINO keeps its Swin at ``backbone.0.*`` (no ``.body``), its ResNet at
    ``backbone.0.body.*`` (the shared body rules)."""
    if not is_swin(args):
        return ()
    return (
        *swin_rules(args, prefix=r"backbone\.0"),
        RenameRule(r"backbone\.0\.(?!body\.)(.+)", r"backbone.\1"),
    )


def dino_rules(args: Mapping[str, Any]) -> tuple[RenameRule, ...]:
    """Every rename rule of a DINO checkpoint; ``label_enc`` becomes the denoising scheme's
    label embedding, or is dropped when the run did not use denoising (``--use_dn`` off)."""
    args = with_official_defaults(args)
    label = RenameRule(
        r"label_enc\.weight", f"{_DN}.label_embedding.weight" if args["use_dn"] else None
    )
    return (
        *_backbone_rules(args),
        label,
        *_DINO_RULES,
        *DEFORMABLE_BODY_RULES,
        *head_rules(args),
    )


def check_aliases(state: Mapping[str, Tensor], args: Mapping[str, Any]) -> None:
    """The decoder's head copies, and with shared heads every layer index, hold the tensors
    that are converted; anything else would be dropped silently."""
    shared = _shared(with_official_defaults(args))
    for key, value in state.items():
        match = re.fullmatch(r"(transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)", key)
        if match is None or (match.group(1) is None and (match.group(3) == "0" or not shared)):
            continue
        index = "0" if shared else match.group(3)
        own = f"{match.group(2)}.{index}.{match.group(4)}"
        if own not in state or not torch.equal(state[own], value):
            raise UserError(
                f"{key} differs from {own}: DINO writes the decoder's heads as aliases of one "
                "module, so the checkpoint and its args (dec_pred_*_embed_share) disagree"
            )


def _check_supported(args: Mapping[str, Any]) -> None:
    for name, value in _FIXED.items():
        if args.get(name, value) != value:
            raise UserError(
                f"DINO checkpoints with {name}={args[name]!r} are not supported (the released "
                f"models use {value!r})"
            )
    if args["nms_iou_threshold"] > 0:
        raise UserError(
            "DINO's --nms_iou_threshold is class-agnostic NMS, which detrkit does not provide; "
            "convert with nms_iou_threshold=-1 in --args-json"
        )
    if args["pe_temperatureH"] != args["pe_temperatureW"]:
        raise UserError(
            "DINO checkpoints with pe_temperatureH != pe_temperatureW are not supported"
        )
    if args["backbone"] not in BACKBONES:
        raise UserError(
            f"DINO backbone '{args['backbone']}' is not supported; known: {sorted(BACKBONES)}"
        )


def dino_backbone(args: Mapping[str, Any]) -> BackboneConfig:
    """``--backbone``, ``--dilation``, ``--lr_backbone``; a Swin trains every stage with drop path
    0.2 and ``--use_checkpoint`` checkpoints its blocks."""
    name, trainable = BACKBONES[args["backbone"]], args["lr_backbone"] > 0
    if not is_swin(args):
        return BackboneConfig(name=name, dilation=args["dilation"], trainable=trainable)
    return BackboneConfig(
        name=name,
        trainable=trainable,
        frozen_stages=0,
        drop_path_rate=_SWIN_DROP_PATH,
        checkpointing=bool(args["use_checkpoint"]),
    )


def denoising_from_args(args: Mapping[str, Any]) -> DenoisingConfig | None:
    """``--use_dn``, ``--dn_number``, ``--dn_label_noise_ratio``, ``--dn_box_noise_scale``."""
    if not args["use_dn"]:
        return None
    rows = args["dn_labelbook_size"] + 1
    if rows not in (args["num_classes"], args["num_classes"] + 1):
        raise UserError(
            f"DINO's dn_labelbook_size ({args['dn_labelbook_size']}) must be num_classes or "
            f"num_classes - 1 (num_classes={args['num_classes']})"
        )
    return DenoisingConfig(
        dn_number=args["dn_number"],
        label_noise_ratio=args["dn_label_noise_ratio"],
        box_noise_scale=args["dn_box_noise_scale"],
        extra_label_row=rows == args["num_classes"] + 1,
    )


def _num_backbone_stages(args: Mapping[str, Any]) -> int | None:
    """``--return_interm_indices`` ([1, 2, 3] = C3-C5, [0, 1, 2, 3] = C2-C5); None = the
    default (up to three stages)."""
    stages = len(args["return_interm_indices"])
    return None if stages == min(args["num_feature_levels"], 3) else stages


def _loss(args: Mapping[str, Any]) -> LossConfig:
    """The decoder's terms; the selected proposals' (``_interm``) terms are the same times
    ``--interm_loss_coef``, without box terms under ``--no_interm_box_loss``."""
    cls, box, giou = args["cls_loss_coef"], args["bbox_loss_coef"], args["giou_loss_coef"]
    coef, no_box = args["interm_loss_coef"], args["no_interm_box_loss"]
    encoder = {}
    if coef != 1.0 or no_box:
        encoder = dict(
            encoder_class_weight=cls * coef,
            encoder_bbox_weight=0.0 if no_box else box * coef,
            encoder_giou_weight=0.0 if no_box else giou * coef,
        )
    return LossConfig(
        class_loss="sigmoid_focal",
        class_weight=cls,
        bbox_weight=box,
        giou_weight=giou,
        focal_alpha=args["focal_alpha"],
        aux_loss=args["aux_loss"],
        **encoder,
    )


def dino_model_config(args: Mapping[str, Any]) -> ModelConfig:
    """The detrkit model equal to a DINO run's ``args`` (docs/methods.md#dino-flags)."""
    args = with_official_defaults(args)
    _check_supported(args)
    layer = dict(
        ffn_dim=args["dim_feedforward"],
        dropout=args["dropout"],
        attention="ms_deform",
        activation=args["transformer_activation"],
    )
    detached = args["use_detached_boxes_dec_out"]
    return ModelConfig(
        num_classes=args["num_classes"],
        hidden_dim=args["hidden_dim"],
        num_heads=args["nheads"],
        num_queries=args["num_queries"],
        num_feature_levels=args["num_feature_levels"],
        num_backbone_stages=_num_backbone_stages(args),
        box_refine="iterative" if detached else "look_forward_twice",
        shared_heads=_shared(args),
        inverse_sigmoid_eps=_DINO_EPS,
        queries=QueryConfig(kind="dino"),
        backbone=dino_backbone(args),
        position=PositionConfig(kind="sine", temperature=float(args["pe_temperatureH"])),
        encoder=TransformerConfig(
            num_layers=args["enc_layers"], num_points=args["enc_n_points"], **layer
        ),
        decoder=TransformerConfig(
            num_layers=args["dec_layers"],
            num_points=args["dec_n_points"],
            query_pos="from_reference",
            output_norm=True,
            **layer,
        ),
        matcher=MatcherConfig(args["set_cost_class"], args["set_cost_bbox"], args["set_cost_giou"]),
        loss=_loss(args),
        top_k=args["num_select"],
        schemes=scheme_settings(denoising=denoising_from_args(args)),
    )


def dino_train_config(args: Mapping[str, Any]) -> TrainConfig:
    """Optimiser and schedule; DINO's default parameter groups give only the backbone its own
    lr (no sampling-offset multiplier)."""
    args = with_official_defaults(args)
    default_groups = args["param_dict_type"] == "default"
    return TrainConfig(
        epochs=args["epochs"],
        lr=args["lr"],
        lr_backbone=args["lr_backbone"],
        lr_linear_proj_mult=1.0 if default_groups else args["lr_linear_proj_mult"],
        weight_decay=args["weight_decay"],
        lr_drop=args["lr_drop"],
        clip_max_norm=args["clip_max_norm"],
        seed=args["seed"],
        ema_decay=args["ema_decay"] if args["use_ema"] else None,
    )


def dino_config(args: Mapping[str, Any]) -> ExperimentConfig:
    """The detrkit config equal to an official DINO run's ``args``."""
    merged = with_official_defaults(args)
    return ExperimentConfig(
        model=dino_model_config(merged),
        data=DataConfig(batch_size=merged["batch_size"]),
        train=dino_train_config(merged),
    )
