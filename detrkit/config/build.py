# SPDX-License-Identifier: Apache-2.0
"""The only place where configuration becomes modules."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from torch import Tensor, nn

from detrkit.config.checks import validate_model_config
from detrkit.config.schema import (
    BackboneConfig,
    ExperimentConfig,
    InferenceConfig,
    ModelConfig,
)
from detrkit.errors import UserError
from detrkit.layers.attention import CrossAttention, SelfAttention
from detrkit.layers.deformable import DeformableCrossAttention
from detrkit.layers.ffn import FFN
from detrkit.layers.position import LearnedPositionEmbedding, SinePositionEmbedding
from detrkit.layers.smca import GaussianCrossAttention
from detrkit.losses.criterion import SetCriterion
from detrkit.losses.quality_focal import QualityFocalTerm
from detrkit.losses.terms import GIoUTerm, L1Term, SigmoidFocalTerm, SoftmaxCrossEntropyTerm
from detrkit.matching.costs import FocalClassCost, SoftmaxClassCost
from detrkit.matching.hungarian import HungarianAssigner
from detrkit.models.backbones import BackboneSpec, build_backbone
from detrkit.models.decoder import Decoder, DecoderLayer
from detrkit.models.deformable_encoder import DeformableEncoder, DeformableEncoderLayer
from detrkit.models.detector import QueryDetector
from detrkit.models.dino_queries import DinoQuerySelector
from detrkit.models.encoder import DetrEncoder, EncoderLayer
from detrkit.models.heads import DetectionHead
from detrkit.models.neck import ChannelMapper
from detrkit.models.postprocess import SoftmaxPostprocess, SoftNms, TopKSigmoidPostprocess
from detrkit.models.queries import LearnedQueries, LearnedQueriesWithReference
from detrkit.models.reference_position import ReferencePositionHead
from detrkit.models.refine import BoxRefiner
from detrkit.models.smca_encoder import SmcaConvEncoder, SmcaConvEncoderLayer
from detrkit.models.two_stage import TwoStageQuerySelector
from detrkit.schemes.base import TrainingScheme
from detrkit.schemes.registry import SchemeContext, scheme_spec
from detrkit.structures import Supervision


def resolved_num_classes(cfg: ModelConfig, num_classes: int | None = None) -> int:
    """The class count from the config, else from the data; an error if neither gives one."""
    value = cfg.num_classes if cfg.num_classes is not None else num_classes
    if value is None:
        raise UserError("model.num_classes is not set and no dataset provides categories")
    return value


def num_logits(cfg: ModelConfig, num_classes: int) -> int:
    """Softmax heads carry an extra "no object" logit."""
    return num_classes + 1 if cfg.loss.class_loss == "softmax_ce" else num_classes


def build_position(cfg: ModelConfig) -> nn.Module:
    if cfg.position.kind == "learned":
        return LearnedPositionEmbedding(cfg.hidden_dim)
    return SinePositionEmbedding(cfg.hidden_dim, cfg.position.temperature, cfg.position.offset)


def backbone_spec(cfg: BackboneConfig) -> BackboneSpec:
    """``model.backbone`` as the backbones' own spec (the model side never sees the schema);
    the two share their field names (tested)."""
    return BackboneSpec(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(BackboneSpec)})


def backbone_stages(cfg: ModelConfig) -> tuple[str, ...]:
    """Backbone stages feeding the neck, ending at C5: C5 alone, up to C3-C5, or
    ``model.num_backbone_stages`` of them (4 = C2-C5); extra levels come after."""
    count = cfg.num_backbone_stages
    if count is None:
        count = min(cfg.num_feature_levels, 3)
    return ("c2", "c3", "c4", "c5")[-count:]


def neck_strides(cfg: ModelConfig, backbone_strides: Mapping[str, int]) -> tuple[int, ...]:
    """Stride in input pixels of every neck level: the backbone stages, then extra levels, each
    of twice the previous stride."""
    strides = [backbone_strides[stage] for stage in backbone_stages(cfg)]
    while len(strides) < cfg.num_feature_levels:
        strides.append(strides[-1] * 2)
    return tuple(strides)


def memory_strides(cfg: ModelConfig, level_strides: tuple[int, ...]) -> tuple[int, ...]:
    """Stride of every level of the encoder's memory (SMCA's convolutional encoder replaces its
    finest level by a stride-2 downsampling of it)."""
    if cfg.encoder.attention == "smca_conv":
        return (level_strides[0] * 2,) + level_strides[1:]
    return level_strides


def build_encoder(cfg: ModelConfig) -> nn.Module:
    enc, dim = cfg.encoder, cfg.hidden_dim
    if enc.attention == "smca_conv":
        levels = cfg.num_feature_levels
        conv_layers = [
            SmcaConvEncoderLayer(
                dim,
                enc.ffn_dim,
                levels,
                cfg.smca.encoder_kernel,
                shared_cross_scale=cfg.smca.shared_cross_scale,
                dropout=enc.dropout,
                activation=enc.activation,
            )
            for _ in range(enc.num_layers)
        ]
        return SmcaConvEncoder(conv_layers, levels, dim)
    if enc.attention == "ms_deform":
        layers = [
            DeformableEncoderLayer(
                dim,
                cfg.num_heads,
                enc.ffn_dim,
                num_levels=cfg.num_feature_levels,
                num_points=enc.num_points,
                dropout=enc.dropout,
                activation=enc.activation,
            )
            for _ in range(enc.num_layers)
        ]
        return DeformableEncoder(
            layers, cfg.num_feature_levels, dim, checkpointing=enc.checkpointing
        )
    layers = [
        EncoderLayer(
            dim,
            cfg.num_heads,
            enc.ffn_dim,
            dropout=enc.dropout,
            activation=enc.activation,
            pre_norm=enc.pre_norm,
        )
        for _ in range(enc.num_layers)
    ]
    final_norm = nn.LayerNorm(dim) if enc.pre_norm else None
    return DetrEncoder(layers, final_norm, checkpointing=enc.checkpointing)


def build_cross_attention(
    cfg: ModelConfig, index: int = 0, memory_strides: tuple[int, ...] = ()
) -> nn.Module:
    """Layer ``index``'s cross-attention; ``memory_strides``: each memory level's stride."""
    dec = cfg.decoder
    if dec.attention == "ms_deform":
        return DeformableCrossAttention(
            cfg.hidden_dim, cfg.num_heads, cfg.num_feature_levels, dec.num_points
        )
    if dec.attention == "smca":
        smca = cfg.smca
        return GaussianCrossAttention(
            cfg.hidden_dim,
            cfg.num_heads,
            memory_strides,
            dropout=dec.dropout,
            scale=smca.scale,
            smooth=smca.smooth,
            predicts_reference=index == 0,
            head_mixture=smca.head_mixture,
            num_plain_queries=cfg.num_queries // 2 if smca.query_mixture else 0,
            first_image_level_weights=smca.first_image_level_weights,
        )
    return CrossAttention(cfg.hidden_dim, cfg.num_heads, dec.dropout)


def build_decoder(
    cfg: ModelConfig, taps: tuple[str, ...] = (), memory_strides: tuple[int, ...] = ()
) -> Decoder:
    """The decoder; ``taps`` names the operations whose outputs the schemes read;
    ``memory_strides`` gives each memory level's stride in input pixels."""
    dec, dim = cfg.decoder, cfg.hidden_dim
    layers = [
        DecoderLayer(
            self_attn=SelfAttention(dim, cfg.num_heads, dec.dropout),
            cross_attn=build_cross_attention(cfg, index, memory_strides),
            ffn=FFN(dim, dec.ffn_dim, dec.dropout, dec.activation),
            dim=dim,
            dropout=dec.dropout,
            pre_norm=dec.pre_norm,
            order=dec.order,
            taps=taps,
        )
        for index in range(dec.num_layers)
    ]
    # DETR (and SMCA) normalise every layer's output before its heads; Deformable DETR does
    # not; DINO does.
    use_norm = dec.output_norm
    if use_norm is None:
        use_norm = dec.attention in ("global", "smca")
    from_reference = dec.query_pos == "from_reference"
    return Decoder(
        layers,
        output_norm=nn.LayerNorm(dim) if use_norm else None,
        refiner=BoxRefiner(cfg.box_refine, cfg.inverse_sigmoid_eps),
        checkpointing=dec.checkpointing,
        query_pos_head=ReferencePositionHead(dim) if from_reference else None,
    )


def build_queries(cfg: ModelConfig, num_logits_: int, num_extra: int = 0) -> nn.Module:
    rows = cfg.num_queries + num_extra
    kind = cfg.queries.kind
    if kind == "two_stage":
        return TwoStageQuerySelector(
            cfg.hidden_dim,
            num_logits_,
            mixed_selection=cfg.queries.mixed_selection,
            num_embeddings=rows,
            supervision=encoder_supervision(cfg),
        )
    if kind == "dino":
        # DINO's proposals are trained class-aware, on the selected ones only.
        supervision = replace(encoder_supervision(cfg), class_agnostic=False)
        return DinoQuerySelector(cfg.hidden_dim, num_logits_, rows, supervision=supervision)
    if kind == "learned_with_reference":
        return LearnedQueriesWithReference(rows, cfg.hidden_dim)
    return LearnedQueries(rows, cfg.hidden_dim)


def build_head(cfg: ModelConfig, num_logits_: int) -> DetectionHead:
    """Class and box predictors: one pair per decoder layer with box refinement, one shared
    pair without (or as ``model.shared_heads`` says)."""
    shared = cfg.box_refine == "none" if cfg.shared_heads is None else cfg.shared_heads
    head = DetectionHead(
        cfg.hidden_dim,
        num_logits_,
        cfg.decoder.num_layers,
        shared=shared,
        inverse_sigmoid_eps=cfg.inverse_sigmoid_eps,
    )
    sigmoid = cfg.loss.class_loss != "softmax_ce"
    if sigmoid and cfg.decoder.attention == "smca":
        head.init_class_prior()  # SMCA keeps DETR's box head initialisation
    elif sigmoid:
        proposals = cfg.queries.kind in ("two_stage", "dino")
        head.init_for_sigmoid(first_wh_bias=0.0 if proposals else -2.0)
    return head


def build_model(cfg: ModelConfig, num_classes: int | None = None) -> QueryDetector:
    """Assemble the detector described by ``cfg`` (weights freshly initialised)."""
    validate_model_config(cfg)
    logits = num_logits(cfg, resolved_num_classes(cfg, num_classes))
    stages = backbone_stages(cfg)
    backbone = build_backbone(backbone_spec(cfg.backbone), stages)
    deformable = cfg.encoder.attention == "ms_deform"
    neck = ChannelMapper(
        list(backbone.out_channels.values()),
        cfg.hidden_dim,
        position=build_position(cfg),
        group_norm=deformable,
        num_extra_levels=cfg.num_feature_levels - len(stages),
    )
    head = build_head(cfg, logits)
    schemes = build_schemes(cfg, head, resolved_num_classes(cfg, num_classes), logits)
    num_extra = sum(scheme.extra_queries for scheme in schemes.values())
    taps = tuple(dict.fromkeys(t for scheme in schemes.values() for t in scheme.tap_points))
    strides = memory_strides(cfg, neck_strides(cfg, backbone.strides))
    return QueryDetector(
        backbone=backbone,
        neck=neck,
        encoder=build_encoder(cfg),
        queries=build_queries(cfg, logits, num_extra),
        decoder=build_decoder(cfg, taps, strides),
        head=head,
        num_queries=cfg.num_queries,
        schemes=schemes,
    )


def build_schemes(
    cfg: ModelConfig, head: DetectionHead, num_classes: int, num_logits_: int
) -> dict[str, TrainingScheme]:
    """The enabled training schemes by name, in ``model.schemes`` order (their query slots
    follow the inference ones in that order), each built by its registered builder. ``head``
    must already be initialised: schemes with their own class heads start as copies of it."""
    context = SchemeContext(model=cfg, head=head, num_classes=num_classes, num_logits=num_logits_)
    return {
        name: scheme_spec(name).build(context, options) for name, options in cfg.schemes.items()
    }


def encoder_supervision(cfg: ModelConfig) -> Supervision:
    """How the two-stage encoder proposals are trained: class-agnostic, with the decoder's
    weights unless ``model.loss.encoder_*_weight`` set their own, matched by their predicted
    boxes, or by their anchors without a class cost (MS-DETR, docs/methods.md#ms-detr-losses)."""
    loss = cfg.loss
    own = {
        "cls": loss.encoder_class_weight,
        "l1": loss.encoder_bbox_weight,
        "giou": loss.encoder_giou_weight,
    }
    weights = None
    if any(value is not None for value in own.values()):
        base = base_term_weights(cfg)
        weights = {term: base[term] if value is None else value for term, value in own.items()}
    by_anchors = loss.encoder_matching == "anchors"
    return Supervision(
        "hungarian_no_class" if by_anchors else "hungarian",
        term_weights=weights,
        class_agnostic=True,
        match_on="anchors" if by_anchors else "predictions",
    )


def base_term_weights(cfg: ModelConfig) -> dict[str, float]:
    loss = cfg.loss
    return {"cls": loss.class_weight, "l1": loss.bbox_weight, "giou": loss.giou_weight}


def build_criterion(
    cfg: ModelConfig,
    num_classes: int | None = None,
    reduce_num_boxes: Callable[[Tensor], Tensor] = lambda n: n,
) -> SetCriterion:
    """Matching and losses as configured (softmax CE or sigmoid focal, L1, GIoU)."""
    classes = resolved_num_classes(cfg, num_classes)
    loss = cfg.loss
    if loss.class_loss == "softmax_ce":
        class_cost, class_term = SoftmaxClassCost(), SoftmaxCrossEntropyTerm(classes, loss.eos_coef)
    else:
        class_cost = FocalClassCost(loss.focal_alpha, loss.focal_gamma)
        class_term = (
            QualityFocalTerm(loss.quality_beta)
            if loss.class_loss == "quality_focal"
            else SigmoidFocalTerm(loss.focal_alpha, loss.focal_gamma)
        )
    matcher = cfg.matcher
    costs = dict(cost_bbox=matcher.cost_bbox, cost_giou=matcher.cost_giou)
    assigners = {
        "hungarian": HungarianAssigner(class_cost, cost_class=matcher.cost_class, **costs),
        "hungarian_no_class": HungarianAssigner(class_cost, cost_class=0.0, **costs),
    }
    return SetCriterion(
        assigners=assigners,
        terms={"cls": class_term, "l1": L1Term(), "giou": GIoUTerm()},
        term_weights=base_term_weights(cfg),
        aux_loss=loss.aux_loss,
        reduce_num_boxes=reduce_num_boxes,
    )


def build_tta(cfg: ExperimentConfig) -> InferenceConfig:
    """The inference settings (test-time augmentation; none by default) with the passes' size
    cap resolved: ``inference.tta_max_size``, else ``data.max_size``."""
    inference = cfg.inference
    if inference.tta_max_size is None:
        inference = replace(inference, tta_max_size=cfg.data.max_size)
    return inference


def build_postprocess(cfg: ModelConfig, ignored_labels: Sequence[int] = ()) -> nn.Module:
    """Softmax heads keep every query (DETR); sigmoid heads take the top-k (query, class) pairs,
    after NMS or soft-NMS when configured. ``ignored_labels`` (``LabelMap.ignored_labels``)
    never produce a detection."""
    if cfg.loss.class_loss == "softmax_ce":
        return SoftmaxPostprocess(ignored_labels)
    soft = cfg.soft_nms
    soft_nms = None
    if soft is not None:
        soft_nms = SoftNms(
            candidates=cfg.num_queries if soft.candidates is None else soft.candidates,
            iou_threshold=soft.iou_threshold,
            sigma=soft.sigma,
            min_score=soft.min_score,
            method=soft.method,
        )
    return TopKSigmoidPostprocess(
        cfg.top_k or 100,
        cfg.nms_iou_threshold,
        ignored_labels,
        soft_nms=soft_nms,
        clip=cfg.clip_boxes,
    )
