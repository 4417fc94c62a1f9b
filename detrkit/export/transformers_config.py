# SPDX-License-Identifier: Apache-2.0
"""Which detrkit models transformers can run, and their transformers ``config.json``.

transformers has DETR and Deformable DETR (optionally with box refinement and two-stage
proposals) on a ResNet. Anything whose *inference* differs is refused with one line; training-only
settings transformers lacks are dropped and reported (docs/transformers.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from detrkit.config.schema import ModelConfig
from detrkit.convert.transformers_config import (
    CATEGORY_IDS_KEY,
    DEFORMABLE,
    DETR,
    SUPPORTED,
    HfBackbone,
    HfModel,
)
from detrkit.data.labels import LabelMap
from detrkit.errors import UserError

# detrkit ResNet -> transformers ResNetConfig (layer_type, depths, hidden_sizes).
_RESNETS = {
    "resnet18": ("basic", [2, 2, 2, 2], [64, 128, 256, 512]),
    "resnet34": ("basic", [3, 4, 6, 3], [64, 128, 256, 512]),
    "resnet50": ("bottleneck", [3, 4, 6, 3], [256, 512, 1024, 2048]),
    "resnet101": ("bottleneck", [3, 4, 23, 3], [256, 512, 1024, 2048]),
}
_DEFAULT_ORDER = ("self_attn", "cross_attn", "ffn")
_DEFORMABLE_EPS = 1e-5


@dataclass
class ExportPlan:
    """What the exporter writes.

    Attributes:
        model: the transformers architecture (family, backbone, heads).
        shared: detrkit has one head for every decoder layer.
        config: keyword arguments of ``DetrConfig`` / ``DeformableDetrConfig`` (the backbone as
            a ``ResNetConfig`` dict under ``backbone_config``).
        notes: training-only settings transformers does not have, dropped.
    """

    model: HfModel
    shared: bool
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def refuse(what: str) -> UserError:
    return UserError(f"cannot export to transformers: {what}; transformers runs {SUPPORTED}")


def export_plan(cfg: ModelConfig, labels: LabelMap) -> ExportPlan:
    """Check that transformers computes what ``cfg`` computes and write its config.

    Raises:
        UserError: one line naming the first option transformers lacks.
    """
    family = _family(cfg)
    stages = _stages(cfg, family)
    _check_common(cfg, family)
    shared = cfg.box_refine == "none" if cfg.shared_heads is None else cfg.shared_heads
    refine = cfg.box_refine == "iterative"
    if refine and shared:
        raise refuse("shared heads with box refinement (model.shared_heads=true)")
    model = HfModel(
        family=family,
        backbone=HfBackbone(cfg.backbone.name, "resnet", stages),
        decoder_layers=cfg.decoder.num_layers,
        refine=refine,
        two_stage=cfg.queries.kind == "two_stage",
        # Per-layer heads need tie_word_embeddings=false: transformers would tie them to layer 0.
        tied=family == DEFORMABLE and shared,
    )
    plan = ExportPlan(model, shared, _config(cfg, model, labels))
    plan.notes = _dropped(cfg, family)
    return plan


def _family(cfg: ModelConfig) -> str:
    attention = (cfg.encoder.attention, cfg.decoder.attention)
    if cfg.queries.kind == "dino":
        raise refuse("DINO's query selection (model.queries.kind=dino)")
    if "smca" in attention or "smca_conv" in attention:
        raise refuse("SMCA attention")
    if cfg.backbone.name not in _RESNETS:
        raise refuse(f"backbone '{cfg.backbone.name}' (transformers' ResNet only)")
    if attention == ("global", "global"):
        return DETR
    if attention == ("ms_deform", "ms_deform"):
        return DEFORMABLE
    raise refuse(f"encoder/decoder attention {attention}")


def _stages(cfg: ModelConfig, family: str) -> tuple[int, ...]:
    if family == DETR:
        if cfg.num_feature_levels != 1:
            raise refuse("multi-level DETR")
        return (4,)
    count = cfg.num_backbone_stages or min(cfg.num_feature_levels, 3)
    return tuple(range(5 - count, 5))


def _check_common(cfg: ModelConfig, family: str) -> None:
    """Everything transformers fixes that detrkit lets vary."""
    enc, dec = cfg.encoder, cfg.decoder
    detr = family == DETR
    checks = [
        (cfg.backbone.dilation, "a dilated (DC5) backbone"),
        (enc.pre_norm or dec.pre_norm, "pre-norm layers"),
        (enc.activation != dec.activation, "different encoder and decoder activations"),
        (enc.dropout != dec.dropout, "different encoder and decoder dropout"),
        (tuple(dec.order) != _DEFAULT_ORDER, f"decoder order {dec.order}"),
        (dec.query_pos != "constant", "query positions from references"),
        (cfg.queries.mixed_selection, "mixed query selection"),
        (cfg.box_refine == "look_forward_twice", "look-forward-twice refinement"),
        (cfg.nms_iou_threshold is not None or cfg.soft_nms is not None, "NMS post-processing"),
        (cfg.clip_boxes, "clipped boxes"),
        (cfg.position.temperature != 10000.0, "a sine temperature other than 10000"),
        (cfg.position.offset != (0.0 if detr else -0.5), "this position offset"),
        (
            any(not float(v).is_integer() for v in _integer_fields(cfg)),
            "a matcher cost or box loss weight that is not a whole number (transformers "
            "stores them as integers)",
        ),
    ]
    if detr:
        checks += [
            (cfg.box_refine != "none", "DETR with box refinement"),
            (cfg.queries.kind != "learned", f"DETR with queries.kind={cfg.queries.kind}"),
            (cfg.loss.class_loss != "softmax_ce", "DETR without a softmax class head"),
            (dec.output_norm is False, "DETR without the decoder output norm"),
        ]
    else:
        checks += [
            (cfg.loss.class_loss != "sigmoid_focal", "Deformable DETR without a sigmoid head"),
            (bool(dec.output_norm), "a decoder output norm in Deformable DETR"),
            (cfg.inverse_sigmoid_eps != _DEFORMABLE_EPS, "an inverse-sigmoid clamp but 1e-5"),
        ]
    for failed, what in checks:
        if failed:
            raise refuse(what)


def _integer_fields(cfg: ModelConfig) -> tuple[float, ...]:
    """The values transformers' configs type as int: matcher costs and box loss weights."""
    matcher, loss = cfg.matcher, cfg.loss
    return (
        matcher.cost_class,
        matcher.cost_bbox,
        matcher.cost_giou,
        loss.bbox_weight,
        loss.giou_weight,
    )


def _number(value: float) -> int:
    return int(value)


def _config(cfg: ModelConfig, model: HfModel, labels: LabelMap) -> dict[str, Any]:
    layer_type, depths, widths = _RESNETS[cfg.backbone.name]
    stages = [f"stage{i}" for i in model.backbone.out_indices]
    dropout = cfg.encoder.dropout
    values: dict[str, Any] = dict(
        backbone_config=dict(
            model_type="resnet",
            layer_type=layer_type,
            depths=depths,
            hidden_sizes=widths,
            embedding_size=64,
            out_features=stages,
        ),
        use_timm_backbone=False,  # transformers' own ResNet: no timm, no hub download
        d_model=cfg.hidden_dim,
        encoder_layers=cfg.encoder.num_layers,
        decoder_layers=cfg.decoder.num_layers,
        encoder_ffn_dim=cfg.encoder.ffn_dim,
        decoder_ffn_dim=cfg.decoder.ffn_dim,
        encoder_attention_heads=cfg.num_heads,
        decoder_attention_heads=cfg.num_heads,
        num_queries=cfg.num_queries,
        dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=dropout,
        activation_function=cfg.encoder.activation,
        position_embedding_type=cfg.position.kind,
        class_cost=_number(cfg.matcher.cost_class),
        bbox_cost=_number(cfg.matcher.cost_bbox),
        giou_cost=_number(cfg.matcher.cost_giou),
        bbox_loss_coefficient=_number(cfg.loss.bbox_weight),
        giou_loss_coefficient=_number(cfg.loss.giou_weight),
        # DETR: auxiliary_loss=true changes transformers' decoder (docs/transformers.md).
        auxiliary_loss=model.family == DEFORMABLE and cfg.loss.aux_loss,
        id2label={i: name for i, name in enumerate(labels.names)},
        label2id={name: i for i, name in enumerate(labels.names)},
    )
    if model.family == DETR:
        values["eos_coefficient"] = cfg.loss.eos_coef
    else:
        values.update(
            num_feature_levels=cfg.num_feature_levels,
            encoder_n_points=cfg.encoder.num_points,
            decoder_n_points=cfg.decoder.num_points,
            with_box_refine=model.refine,
            two_stage=model.two_stage,
            two_stage_num_proposals=cfg.num_queries,
            focal_alpha=cfg.loss.focal_alpha,
            tie_word_embeddings=model.tied,
            # The PyTorch path: the same maths everywhere, no kernel fetched from the hub.
            disable_custom_kernels=True,
        )
    if labels.category_ids != tuple(range(labels.num_classes)):
        values[CATEGORY_IDS_KEY] = list(labels.category_ids)
    return values


def _dropped(cfg: ModelConfig, family: str) -> list[str]:
    """Training-only settings transformers has no place for."""
    notes = []
    if cfg.schemes:
        notes.append(f"training schemes {sorted(cfg.schemes)} dropped")
    if cfg.loss.class_weight != 1.0:
        notes.append(f"class loss weight {cfg.loss.class_weight} (transformers fixes 1)")
    if family == DETR and cfg.loss.aux_loss:
        notes.append("auxiliary_loss=false (transformers' auxiliary-loss DETR decoder differs)")
    if cfg.backbone.norm == "bn":
        notes.append("BatchNorm frozen (transformers freezes the backbone's statistics)")
    if cfg.queries.kind == "two_stage":
        notes.append("no encoder-proposal loss (transformers trains two-stage without it)")
    return notes
