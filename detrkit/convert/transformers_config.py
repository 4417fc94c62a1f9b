# SPDX-License-Identifier: Apache-2.0
"""The detrkit config of a Hugging Face transformers ``config.json`` (DETR, Deformable DETR).

Reads the plain JSON, so importing needs no ``transformers`` package. Every model option comes
from the transformers config; what detrkit cannot reproduce is refused with one line
(docs/transformers.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from detrkit.config.schema import (
    BackboneConfig,
    ExperimentConfig,
    LossConfig,
    MatcherConfig,
    ModelConfig,
    PositionConfig,
    QueryConfig,
    TrainConfig,
    TransformerConfig,
)
from detrkit.data.labels import LabelMap
from detrkit.errors import UserError

logger = logging.getLogger(__name__)

SUPPORTED = "DetrForObjectDetection and DeformableDetrForObjectDetection with a ResNet backbone"
DETR, DEFORMABLE = "detr", "deformable_detr"
_ARCHITECTURES = {DETR: "DetrForObjectDetection", DEFORMABLE: "DeformableDetrForObjectDetection"}
# (layer_type, depths) of transformers' ResNetConfig -> detrkit backbone, with its stage widths.
_HF_RESNETS = {
    ("basic", (2, 2, 2, 2)): ("resnet18", (64, 128, 256, 512)),
    ("basic", (3, 4, 6, 3)): ("resnet34", (64, 128, 256, 512)),
    ("bottleneck", (3, 4, 6, 3)): ("resnet50", (256, 512, 1024, 2048)),
    ("bottleneck", (3, 4, 23, 3)): ("resnet101", (256, 512, 1024, 2048)),
}
_TIMM_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
# Extra key detrkit's exporter writes when category ids are not the logit indices.
CATEGORY_IDS_KEY = "detrkit_category_ids"
UNUSED_NAME = "N/A"


@dataclass(frozen=True)
class HfBackbone:
    """The backbone a transformers config describes.

    Attributes:
        name: detrkit backbone name (resnet18/34/50/101).
        layout: "resnet" (transformers' own ResNet, ``embedder`` / ``encoder.stages`` keys) or
            "timm" (timm's ResNet, torchvision-like ``conv1`` / ``layer1`` keys).
        out_indices: stages returned (1 = C2 .. 4 = C5).
        dilation: DC5 (timm only).
    """

    name: str
    layout: str
    out_indices: tuple[int, ...]
    dilation: bool = False


@dataclass(frozen=True)
class HfModel:
    """What the converter needs to know about a transformers checkpoint besides its tensors.

    Attributes:
        family: "detr" or "deformable_detr" (``model_type``).
        backbone: the backbone.
        decoder_layers: decoder depth L.
        refine: ``with_box_refine``.
        two_stage: ``two_stage`` (encoder proposals; the encoder head is stored at index L).
        tied: ``tie_word_embeddings`` (Deformable DETR's per-layer heads tied to index 0).
    """

    family: str
    backbone: HfBackbone
    decoder_layers: int
    refine: bool = False
    two_stage: bool = False
    tied: bool = False


def refuse(where: str, what: str) -> UserError:
    """One-line refusal naming the file and what detrkit supports."""
    return UserError(f"{where}: {what}; detrkit imports and exports {SUPPORTED}")


def hf_model(hf: Mapping[str, Any], where: str) -> HfModel:
    """Check the architecture of a transformers config and describe it (raises UserError)."""
    family = hf.get("model_type")
    if family not in _ARCHITECTURES:
        raise refuse(where, f"model_type '{family}' is not supported")
    for name in hf.get("architectures") or ():
        if name != _ARCHITECTURES[family]:
            raise refuse(where, f"architecture '{name}' is not supported")
    if family == DETR and hf.get("auxiliary_loss"):
        raise UserError(
            f"{where}: DETR with auxiliary_loss=true is refused: transformers' DetrDecoder then "
            "feeds each layer's LayerNorm output to the next layer and applies the final LayerNorm "
            "twice, unlike DETR and detrkit, so its predictions differ; if the weights were "
            "trained with auxiliary_loss=false (or come from the official DETR), set it to false "
            "in config.json and convert again (detrkit's own model.loss.aux_loss is a training "
            "option that does not change predictions)"
        )
    refine = bool(hf.get("with_box_refine", False))
    two_stage = bool(hf.get("two_stage", False))
    if two_stage and not refine:
        raise refuse(where, "two_stage without with_box_refine is not a valid configuration")
    return HfModel(
        family=family,
        backbone=hf_backbone(hf, where),
        decoder_layers=int(hf["decoder_layers"]),
        refine=refine,
        two_stage=two_stage,
        tied=family == DEFORMABLE and bool(hf.get("tie_word_embeddings", True)),
    )


def hf_backbone(hf: Mapping[str, Any], where: str) -> HfBackbone:
    """The ResNet of ``backbone_config`` (transformers' ResNetConfig or a timm backbone), or of the
    older ``use_timm_backbone`` / ``backbone`` keys of transformers 4 configs."""
    sub = hf.get("backbone_config")
    levels = int(hf.get("num_feature_levels", 1))
    default_out = (2, 3, 4) if hf.get("model_type") == DEFORMABLE and levels > 1 else (1, 2, 3, 4)
    dilation = bool(hf.get("dilation") or False)
    if isinstance(sub, Mapping) and sub.get("model_type") == "resnet":
        return _hf_resnet(sub, where, dilation)
    if isinstance(sub, Mapping) and sub.get("model_type") == "timm_backbone":
        name = sub.get("backbone")
        out = tuple(sub.get("out_indices") or default_out)
        dilation = dilation or sub.get("output_stride") == 16
    elif sub is None and hf.get("use_timm_backbone", True):
        name = hf.get("backbone") or "resnet50"
        out = tuple((hf.get("backbone_kwargs") or {}).get("out_indices") or default_out)
    else:
        kind = sub.get("model_type") if isinstance(sub, Mapping) else sub
        raise refuse(where, f"backbone '{kind}' is not supported")
    if name not in _TIMM_RESNETS:
        raise refuse(where, f"timm backbone '{name}' is not supported (only {_TIMM_RESNETS})")
    return HfBackbone(name, "timm", out, dilation)


def _hf_resnet(sub: Mapping[str, Any], where: str, dilation: bool) -> HfBackbone:
    key = (sub.get("layer_type", "bottleneck"), tuple(sub.get("depths", ())))
    if key not in _HF_RESNETS:
        raise refuse(where, f"ResNetConfig {key} is not ResNet-18/34/50/101")
    name, widths = _HF_RESNETS[key]
    # detrkit's ResNet is torchvision's: stride on the 3x3 conv, stride-1 first stage, 64-wide stem.
    expected = dict(
        hidden_sizes=list(widths),
        embedding_size=64,
        hidden_act="relu",
        downsample_in_first_stage=False,
        downsample_in_bottleneck=False,
        num_channels=3,
    )
    for field, value in expected.items():
        if sub.get(field, value) != value:
            raise refuse(
                where, f"ResNetConfig {field}={sub.get(field)!r} (torchvision's is {value})"
            )
    if dilation:
        raise refuse(where, "dilation (DC5) with transformers' own ResNet")
    out = sub.get("out_indices") or [int(s.removeprefix("stage")) for s in sub["out_features"]]
    return HfBackbone(name, "resnet", tuple(int(i) for i in out))


def experiment_config(
    hf: Mapping[str, Any], model: HfModel, num_logits: int, shared: bool | None, where: str
) -> ExperimentConfig:
    """The detrkit config equal to the transformers config.

    Args:
        hf: the ``config.json`` contents.
        model: :func:`hf_model` of it.
        num_logits: rows of the class head in the weights (DETR: classes + no-object).
        shared: Deformable DETR without refinement: whether the per-layer heads are equal
            (one detrkit head) or not (``model.shared_heads=False``); None elsewhere.
        where: the file, for errors.
    """
    _warn_training_differences(hf, where)
    if model.family == DETR:
        return ExperimentConfig(model=_detr_model(hf, model, num_logits, where))
    # The Deformable family trains sampling offsets and reference points at 0.1x the lr.
    return ExperimentConfig(
        model=_deformable_model(hf, model, num_logits, shared, where),
        train=TrainConfig(lr_linear_proj_mult=0.1),
    )


def _common(hf: Mapping[str, Any], model: HfModel, where: str) -> dict[str, Any]:
    heads = {hf.get("encoder_attention_heads"), hf.get("decoder_attention_heads")}
    if len(heads) != 1:
        raise refuse(where, f"different encoder and decoder head counts {sorted(heads)}")
    activation = hf.get("activation_function", "relu")
    if activation not in ("relu", "gelu"):
        raise refuse(where, f"activation_function '{activation}' (detrkit has relu and gelu)")
    position = hf.get("position_embedding_type", "sine")
    if position not in ("sine", "learned"):
        raise refuse(where, f"position_embedding_type '{position}'")
    return dict(
        hidden_dim=int(hf["d_model"]),
        num_heads=int(heads.pop()),
        backbone=BackboneConfig(name=model.backbone.name, dilation=model.backbone.dilation),
        matcher=MatcherConfig(
            float(hf.get("class_cost", 1)),
            float(hf.get("bbox_cost", 5)),
            float(hf.get("giou_cost", 2)),
        ),
        layer=dict(dropout=float(hf.get("dropout", 0.1)), activation=activation),
        position=position,
    )


def _detr_model(hf: Mapping[str, Any], model: HfModel, num_logits: int, where: str) -> ModelConfig:
    common = _common(hf, model, where)
    if model.backbone.out_indices[-1] != 4:
        raise refuse(where, f"DETR backbone out_indices {model.backbone.out_indices} end before C5")
    layer = common.pop("layer")
    return ModelConfig(
        num_classes=num_logits - 1,
        num_queries=int(hf["num_queries"]),
        position=PositionConfig(kind=common.pop("position")),
        encoder=TransformerConfig(
            num_layers=int(hf["encoder_layers"]), ffn_dim=int(hf["encoder_ffn_dim"]), **layer
        ),
        decoder=TransformerConfig(
            num_layers=int(hf["decoder_layers"]), ffn_dim=int(hf["decoder_ffn_dim"]), **layer
        ),
        loss=LossConfig(
            class_loss="softmax_ce",
            class_weight=1.0,  # transformers' weight of loss_ce is fixed at 1
            bbox_weight=float(hf.get("bbox_loss_coefficient", 5)),
            giou_weight=float(hf.get("giou_loss_coefficient", 2)),
            eos_coef=float(hf.get("eos_coefficient", 0.1)),
            aux_loss=False,  # auxiliary_loss=true is refused (hf_model)
        ),
        **common,
    )


def _deformable_model(
    hf: Mapping[str, Any], model: HfModel, num_logits: int, shared: bool | None, where: str
) -> ModelConfig:
    common = _common(hf, model, where)
    layer = dict(common.pop("layer"), attention="ms_deform")
    levels = int(hf.get("num_feature_levels", 4))
    out = model.backbone.out_indices
    if levels == 1:
        out = out[-1:]
    if list(out) != list(range(5 - len(out), 5)) or len(out) > levels:
        raise refuse(where, f"backbone out_indices {list(out)} are not the last stages up to C5")
    return ModelConfig(
        num_classes=num_logits,
        # transformers' two-stage decoder reads two_stage_num_proposals proposals
        num_queries=int(hf["two_stage_num_proposals" if model.two_stage else "num_queries"]),
        num_feature_levels=levels,
        num_backbone_stages=len(out),
        box_refine="iterative" if model.refine else "none",
        # Unequal heads without refinement: one per layer (equal or tied ones: the shared head).
        shared_heads=False if shared is False else None,
        queries=QueryConfig(kind="two_stage" if model.two_stage else "learned_with_reference"),
        position=PositionConfig(kind=common.pop("position"), offset=-0.5),
        encoder=TransformerConfig(
            num_layers=int(hf["encoder_layers"]),
            ffn_dim=int(hf["encoder_ffn_dim"]),
            num_points=int(hf.get("encoder_n_points", 4)),
            **layer,
        ),
        decoder=TransformerConfig(
            num_layers=int(hf["decoder_layers"]),
            ffn_dim=int(hf["decoder_ffn_dim"]),
            num_points=int(hf.get("decoder_n_points", 4)),
            **layer,
        ),
        loss=LossConfig(
            class_loss="sigmoid_focal",
            class_weight=1.0,  # transformers' weight of loss_ce is fixed at 1
            bbox_weight=float(hf.get("bbox_loss_coefficient", 5)),
            giou_weight=float(hf.get("giou_loss_coefficient", 2)),
            focal_alpha=float(hf.get("focal_alpha", 0.25)),
            aux_loss=bool(hf.get("auxiliary_loss", False)),
        ),
        top_k=100,
        **common,
    )


def _warn_training_differences(hf: Mapping[str, Any], where: str) -> None:
    """Training-only settings detrkit has no place for: predictions are unaffected."""
    dropout = hf.get("dropout", 0.1)
    notes = [
        f"{name}={hf[name]} (detrkit uses dropout={dropout} there)"
        for name in ("attention_dropout", "activation_dropout")
        if name in hf and hf[name] != dropout
    ]
    notes += [
        f"{name}={hf[name]} (not supported, ignored)"
        for name in ("encoder_layerdrop", "decoder_layerdrop")
        if hf.get(name)
    ]
    if hf.get("model_type") == DEFORMABLE and hf.get("focal_alpha", 0.25) != 0.25:
        notes.append("focal_alpha != 0.25 (transformers' matcher fixes 0.25, detrkit's uses it)")
    if notes:
        logger.warning("%s: training settings that differ in detrkit: %s", where, "; ".join(notes))


def label_map(hf: Mapping[str, Any], num_classes: int, where: str) -> LabelMap:
    """Label i <-> category id i (the id2label key), named by id2label; logit indices
    id2label lacks, or names "N/A", are unused slots (COCO-style heads). Category ids written
    by detrkit's exporter (``detrkit_category_ids``) are restored."""
    raw = hf.get("id2label") or {}
    names = {int(k): str(v) for k, v in raw.items()}
    if any(not 0 <= k < num_classes for k in names):
        raise UserError(
            f"{where}: id2label keys {sorted(names)[:5]}... are not logit indices "
            f"0..{num_classes - 1} of the class head; fix id2label in config.json"
        )
    ids = tuple(hf.get(CATEGORY_IDS_KEY) or range(num_classes))
    if len(ids) != num_classes:
        raise UserError(f"{where}: {CATEGORY_IDS_KEY} has {len(ids)} ids for {num_classes} labels")
    labels = [names.get(i, UNUSED_NAME) for i in range(num_classes)]
    unused = [ids[i] for i, name in enumerate(labels) if name == UNUSED_NAME]
    if len(unused) == num_classes:
        return LabelMap.identity(num_classes)
    return LabelMap(ids, tuple(labels), tuple(unused))
