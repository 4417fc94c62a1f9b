# SPDX-License-Identifier: Apache-2.0
"""Model config checks: combinations of parts that cannot work together are refused before
anything is built, with a message naming the keys to change."""

from __future__ import annotations

from detrkit.config.schema import ModelConfig, SmcaConfig
from detrkit.errors import UserError
from detrkit.models.backbones import check_backbone_name
from detrkit.schemes.registry import scheme_spec


def validate_model_config(cfg: ModelConfig) -> None:
    """Reject combinations of parts that cannot work together, naming the keys to change."""
    _validate_smca(cfg)
    referenced = cfg.queries.kind != "learned"
    if cfg.decoder.attention == "ms_deform" and not referenced:
        raise UserError(
            "model.decoder.attention=ms_deform needs reference points: set "
            "model.queries.kind to learned_with_reference or two_stage"
        )
    if cfg.box_refine != "none" and not referenced:
        raise UserError(
            f"model.box_refine={cfg.box_refine} needs queries with reference boxes: "
            "set model.queries.kind to learned_with_reference or two_stage"
        )
    if cfg.queries.mixed_selection and cfg.queries.kind != "two_stage":
        raise UserError(
            "model.queries.mixed_selection only applies to model.queries.kind=two_stage"
        )
    if cfg.queries.kind in ("two_stage", "dino") and cfg.box_refine == "none":
        raise UserError(
            f"model.queries.kind={cfg.queries.kind} needs box refinement (the encoder proposal "
            "head is the last of the per-layer heads): set model.box_refine=iterative (or "
            "look_forward_twice, DINO)"
        )
    check_backbone_name(cfg.backbone.name)
    _validate_orders(cfg)
    if cfg.nms_iou_threshold is not None and cfg.loss.class_loss == "softmax_ce":
        raise UserError(
            "model.nms_iou_threshold applies to sigmoid heads (model.loss.class_loss="
            "sigmoid_focal or quality_focal); DETR's softmax postprocessing keeps one box per "
            "query"
        )
    if cfg.num_feature_levels < 1:
        raise UserError("model.num_feature_levels must be at least 1")
    _validate_levels(cfg)
    _validate_decoder_options(cfg)
    _validate_soft_nms(cfg)
    if not 0 < cfg.inverse_sigmoid_eps < 0.5:
        raise UserError(
            f"model.inverse_sigmoid_eps={cfg.inverse_sigmoid_eps} must lie in (0, 0.5) "
            "(1e-5 in Deformable DETR, 1e-3 in DINO)"
        )
    for name, options in cfg.schemes.items():
        check = scheme_spec(name).check
        if check is not None:
            check(cfg, options)


DECODER_OPS = ("self_attn", "cross_attn", "ffn")


def _validate_smca(cfg: ModelConfig) -> None:
    """SMCA's attention values sit on the right stack, and its options apply."""
    if cfg.encoder.attention == "smca" or cfg.decoder.attention == "smca_conv":
        raise UserError(
            "SMCA's cross-attention is model.decoder.attention=smca and multi-scale SMCA's "
            "convolutional encoder model.encoder.attention=smca_conv, not the other way round"
        )
    if cfg.decoder.attention != "smca":
        if cfg.smca != SmcaConfig() or cfg.encoder.attention == "smca_conv":
            raise UserError(
                "model.smca and model.encoder.attention=smca_conv configure SMCA: set "
                "model.decoder.attention=smca, or leave them at their defaults"
            )
        return
    if cfg.queries.kind != "learned" or cfg.box_refine != "none":
        raise UserError(
            "model.decoder.attention=smca predicts its reference points in the first decoder "
            "layer and keeps them: set model.queries.kind=learned and model.box_refine=none"
        )
    if cfg.encoder.attention == "smca_conv" and cfg.num_feature_levels < 2:
        raise UserError(
            "model.encoder.attention=smca_conv mixes feature levels: set "
            "model.num_feature_levels to at least 2 (4 in multi-scale SMCA)"
        )
    if cfg.smca.encoder_kernel < 1 or cfg.smca.encoder_kernel % 2 == 0:
        raise UserError(f"model.smca.encoder_kernel={cfg.smca.encoder_kernel} must be odd")
    if cfg.smca.smooth <= 0:
        raise UserError(f"model.smca.smooth={cfg.smca.smooth} must be positive")


def _validate_levels(cfg: ModelConfig) -> None:
    stages = cfg.num_backbone_stages
    if stages is None:
        return
    if not 1 <= stages <= 4:
        raise UserError(
            f"model.num_backbone_stages={stages} must be 1 to 4 (the last stages, ending at "
            "C5; 4 = C2-C5), or null for up to 3"
        )
    if stages > cfg.num_feature_levels:
        raise UserError(
            f"model.num_backbone_stages={stages} exceeds model.num_feature_levels="
            f"{cfg.num_feature_levels}: every backbone stage is one feature level (e.g. "
            "5 levels with 4 stages = C2-C5 + one extra level)"
        )


def _validate_decoder_options(cfg: ModelConfig) -> None:
    """Decoder-only keys, and DINO's query selection with positions from the references."""
    enc = cfg.encoder
    if enc.query_pos != "constant" or enc.output_norm is not None:
        raise UserError(
            "model.encoder.query_pos and model.encoder.output_norm are decoder options: set "
            "them under model.decoder"
        )
    dino = cfg.queries.kind == "dino"
    from_reference = cfg.decoder.query_pos == "from_reference"
    if dino and not from_reference:
        raise UserError(
            "model.queries.kind=dino brings no query positions: set "
            "model.decoder.query_pos=from_reference"
        )
    if from_reference and not dino:
        raise UserError(
            "model.decoder.query_pos=from_reference replaces the positions of queries that "
            "bring none: set model.queries.kind=dino (DINO's mixed query selection)"
        )


def _validate_soft_nms(cfg: ModelConfig) -> None:
    soft = cfg.soft_nms
    if soft is None:
        return
    if cfg.loss.class_loss == "softmax_ce":
        raise UserError(
            "model.soft_nms applies to sigmoid heads (model.loss.class_loss=sigmoid_focal or "
            "quality_focal); DETR's softmax postprocessing keeps one box per query"
        )
    if cfg.nms_iou_threshold is not None:
        raise UserError(
            "model.soft_nms and model.nms_iou_threshold are two NMS variants: set one of them "
            "to null"
        )
    if not 0 <= soft.iou_threshold <= 1 or soft.sigma <= 0 or soft.min_score < 0:
        raise UserError(
            "model.soft_nms: iou_threshold must lie in [0, 1], sigma must be positive and "
            "min_score must not be negative"
        )
    if soft.candidates is not None and soft.candidates < 1:
        raise UserError(
            f"model.soft_nms.candidates={soft.candidates} must be at least 1 (or null for "
            "model.num_queries)"
        )


def _validate_orders(cfg: ModelConfig) -> None:
    if sorted(cfg.decoder.order) != sorted(DECODER_OPS):
        raise UserError(
            f"model.decoder.order={list(cfg.decoder.order)} must list each of "
            f"{', '.join(DECODER_OPS)} once, e.g. [self_attn,cross_attn,ffn]"
        )
    if tuple(cfg.encoder.order) != DECODER_OPS:
        raise UserError("model.encoder.order is not used (the encoder has no cross-attention)")
