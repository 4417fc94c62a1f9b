# SPDX-License-Identifier: Apache-2.0
"""MS-DETR mixed supervision: one-to-many supervision of the primary queries
(docs/methods.md#ms-detr)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from detrkit.errors import UserError
from detrkit.layers.ffn import FFN
from detrkit.layers.residual import AddNorm
from detrkit.matching.one_to_many import TopKQualityAssigner
from detrkit.models.queries import MAIN_GROUP
from detrkit.schemes.base import TrainingScheme
from detrkit.schemes.registry import SchemeContext, SchemeSpec, register_scheme
from detrkit.structures import DecoderOutput, PredictionGroup, QuerySet, Supervision

MIXED_GROUP = "ms_o2m"
TAP = "cross_attn"


@dataclass(frozen=True)
class MixedConfig:
    """``model.schemes.mixed``: MS-DETR mixed supervision, one-to-many supervision of the
    primary queries.

    Attributes:
        predict_from: where the one-to-many predictions read the decoder: "cross_attn" = each
            layer's state right after cross-attention (the root implementation, needs
            ``model.decoder.order`` to start with cross_attn) or "layer_output" = the same
            hidden states as the one-to-one predictions (implementation (a)).
        separate_class_heads: the one-to-many predictions get their own class heads, copied from
            the detection head after initialisation (implementation (a)); box heads are shared.
        aux_ffn: a second FFN per decoder layer on the tapped hidden state (``--use_aux_ffn``).
        merge_one_to_one: add each layer's one-to-one Hungarian pairs to its one-to-many pairs
            (``--use_indices_merge``, parsed but never wired in the original: off).
        k: queries kept per ground-truth box (``--o2m_matcher_k``, not wired in the original).
        threshold: quality threshold of a positive (``--o2m_matcher_threshold``, likewise).
        positive_fraction: positives are subsampled to this fraction of the queries.
        box_quality: weight of IoU in the quality 0.7 IoU + 0.3 score.
        class_weight, bbox_weight, giou_weight: the group's loss weights
            (``--o2m_cls_loss_coef`` / ``--o2m_bbox_loss_coef`` / ``--o2m_giou_loss_coef``).
    """

    predict_from: Literal["cross_attn", "layer_output"] = "cross_attn"
    separate_class_heads: bool = False
    aux_ffn: bool = True
    merge_one_to_one: bool = False
    k: int = 6
    threshold: float = 0.4
    positive_fraction: float = 0.25
    box_quality: float = 0.7
    class_weight: float = 2.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0


class AuxiliaryFFN(nn.Module):
    """A second FFN block (residual + LayerNorm) on the tapped hidden state of one layer."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.ffn = FFN(dim, ffn_dim, dropout)
        self.norm = AddNorm(dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, Q, D] -> [B, Q, D]."""
        return self.norm(x, self.ffn)


class MixedSupervision(TrainingScheme):
    """Predict again from the inference queries' decoder states and supervise those predictions
    one-to-many with the quality assigner (no extra queries).

    The root implementation reads each layer's state right after cross-attention (the decoder
    must run cross-attention first and tap it), optionally through an auxiliary FFN, and predicts
    with the detection head. Implementation (a) reads the layer outputs themselves and predicts
    with its own class heads (copies of the head's, taken after initialisation) and the shared
    box heads.

    Args:
        dim, ffn_dim, dropout: shape of the auxiliary FFNs.
        num_layers: decoder layers.
        predict_from: "cross_attn" (the tap, root) or "layer_output" (implementation (a)).
        aux_ffn: use an auxiliary FFN per layer (``--use_aux_ffn``).
        class_heads: separate class predictors for the one-to-many predictions, or None to use
            the detection head's.
        supervision: how the one-to-many predictions are assigned and weighed.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_layers: int,
        dropout: float,
        *,
        predict_from: Literal["cross_attn", "layer_output"] = "cross_attn",
        aux_ffn: bool = True,
        class_heads: nn.ModuleList | None = None,
        supervision: Supervision | None = None,
    ) -> None:
        super().__init__()
        self.supervision = supervision or Supervision(TopKQualityAssigner())
        self.predict_from = predict_from
        self.tap_points = (TAP,) if predict_from == "cross_attn" else ()
        self.aux_ffn = (
            nn.ModuleList(AuxiliaryFFN(dim, ffn_dim, dropout) for _ in range(num_layers))
            if aux_ffn
            else None
        )
        self.class_heads = class_heads

    def tap_groups(
        self, decoded: DecoderOutput, queries: QuerySet, head: nn.Module
    ) -> list[PredictionGroup]:
        main = next(g for g in queries.groups if g.at_inference)
        states = decoded.taps[TAP] if self.predict_from == "cross_attn" else decoded.hidden
        states = states[:, :, main.start : main.stop]
        if self.aux_ffn is not None:
            states = torch.stack([ffn(layer) for ffn, layer in zip(self.aux_ffn, states)])
        references = None
        if decoded.references is not None:
            references = tuple(r[:, main.start : main.stop] for r in decoded.references)
        logits, boxes = head.predict(states, references, class_embed=self.class_heads)
        return [PredictionGroup(MIXED_GROUP, logits, boxes, supervision=self.supervision)]


def build(context: SchemeContext, options: MixedConfig) -> MixedSupervision:
    """The scheme with its quality assigner, its term weights and, for implementation (a),
    class heads copied from the initialised detection head."""
    model, decoder = context.model, context.model.decoder
    assigner = TopKQualityAssigner(
        options.k,
        options.threshold,
        options.positive_fraction,
        options.box_quality,
        score="softmax" if model.loss.class_loss == "softmax_ce" else "sigmoid",
    )
    weights = {"cls": options.class_weight, "l1": options.bbox_weight, "giou": options.giou_weight}
    supervision = Supervision(
        assigner,
        term_weights=weights,
        merge_with=MAIN_GROUP if options.merge_one_to_one else None,
    )
    class_heads = None
    if options.separate_class_heads:
        class_heads = copy.deepcopy(context.head.class_embed)
    return MixedSupervision(
        model.hidden_dim,
        decoder.ffn_dim,
        decoder.num_layers,
        decoder.dropout,
        predict_from=options.predict_from,
        aux_ffn=options.aux_ffn,
        class_heads=class_heads,
        supervision=supervision,
    )


def check(model, options: MixedConfig) -> None:
    if options.predict_from == "cross_attn" and model.decoder.order[0] != "cross_attn":
        raise UserError(
            "model.schemes.mixed.predict_from=cross_attn (MS-DETR) supervises the state "
            "right after cross-attention, which must come first: set "
            "model.decoder.order=[cross_attn,self_attn,ffn], or predict from the layer "
            "outputs with model.schemes.mixed.predict_from=layer_output (implementation (a))"
        )


register_scheme(SchemeSpec("mixed", MixedConfig, build, check, family="MS-DETR"))
