# SPDX-License-Identifier: Apache-2.0
"""The only place where configuration becomes modules."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from detrkit.config.schema import ModelConfig
from detrkit.errors import UserError
from detrkit.layers.attention import CrossAttention, SelfAttention
from detrkit.layers.ffn import FFN
from detrkit.layers.position import LearnedPositionEmbedding, SinePositionEmbedding
from detrkit.losses.criterion import SetCriterion
from detrkit.losses.terms import GIoUTerm, L1Term, SigmoidFocalTerm, SoftmaxCrossEntropyTerm
from detrkit.matching.costs import FocalClassCost, SoftmaxClassCost
from detrkit.matching.hungarian import HungarianAssigner
from detrkit.models.backbone import ResNetBackbone
from detrkit.models.decoder import Decoder, DecoderLayer
from detrkit.models.detector import QueryDetector
from detrkit.models.encoder import DetrEncoder, EncoderLayer
from detrkit.models.heads import DetectionHead
from detrkit.models.neck import ChannelMapper
from detrkit.models.postprocess import SoftmaxPostprocess, TopKSigmoidPostprocess
from detrkit.models.queries import LearnedQueries


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


def build_encoder(cfg: ModelConfig) -> DetrEncoder:
    enc = cfg.encoder
    layers = [
        EncoderLayer(
            cfg.hidden_dim,
            cfg.num_heads,
            enc.ffn_dim,
            dropout=enc.dropout,
            activation=enc.activation,
            pre_norm=enc.pre_norm,
        )
        for _ in range(enc.num_layers)
    ]
    return DetrEncoder(layers, nn.LayerNorm(cfg.hidden_dim) if enc.pre_norm else None)


def build_decoder(cfg: ModelConfig) -> Decoder:
    dec, dim = cfg.decoder, cfg.hidden_dim
    layers = [
        DecoderLayer(
            self_attn=SelfAttention(dim, cfg.num_heads, dec.dropout),
            cross_attn=CrossAttention(dim, cfg.num_heads, dec.dropout),
            ffn=FFN(dim, dec.ffn_dim, dec.dropout, dec.activation),
            dim=dim,
            dropout=dec.dropout,
            pre_norm=dec.pre_norm,
        )
        for _ in range(dec.num_layers)
    ]
    return Decoder(layers, output_norm=nn.LayerNorm(dim))


def build_model(cfg: ModelConfig, num_classes: int | None = None) -> QueryDetector:
    """Assemble the detector described by ``cfg`` (weights freshly initialised)."""
    classes = resolved_num_classes(cfg, num_classes)
    backbone = ResNetBackbone(
        cfg.backbone.name,
        return_stages=("c5",),
        dilation=cfg.backbone.dilation,
        trainable=cfg.backbone.trainable,
        frozen_stages=cfg.backbone.frozen_stages,
        norm=cfg.backbone.norm,
    )
    if cfg.backbone.weights:
        backbone.load_pretrained(cfg.backbone.weights)
    neck = ChannelMapper(
        list(backbone.out_channels.values()), cfg.hidden_dim, position=build_position(cfg)
    )
    return QueryDetector(
        backbone=backbone,
        neck=neck,
        encoder=build_encoder(cfg),
        queries=LearnedQueries(cfg.num_queries, cfg.hidden_dim),
        decoder=build_decoder(cfg),
        head=DetectionHead(cfg.hidden_dim, num_logits(cfg, classes), cfg.decoder.num_layers),
        num_queries=cfg.num_queries,
    )


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
        class_term = SigmoidFocalTerm(loss.focal_alpha, loss.focal_gamma)
    matcher = cfg.matcher
    hungarian = HungarianAssigner(
        class_cost,
        cost_class=matcher.cost_class,
        cost_bbox=matcher.cost_bbox,
        cost_giou=matcher.cost_giou,
    )
    return SetCriterion(
        assigners={"hungarian": hungarian},
        terms={"cls": class_term, "l1": L1Term(), "giou": GIoUTerm()},
        term_weights={"cls": loss.class_weight, "l1": loss.bbox_weight, "giou": loss.giou_weight},
        aux_loss=loss.aux_loss,
        reduce_num_boxes=reduce_num_boxes,
    )


def build_postprocess(cfg: ModelConfig) -> nn.Module:
    """Softmax heads keep every query (DETR); sigmoid heads take the top-k (query, class) pairs."""
    if cfg.loss.class_loss == "softmax_ce":
        return SoftmaxPostprocess()
    return TopKSigmoidPostprocess(cfg.top_k or 100)
