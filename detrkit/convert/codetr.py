# SPDX-License-Identifier: Apache-2.0
"""Official Co-DETR checkpoints (Sense-X/Co-DETR, mmdetection 2.x layout) -> detrkit keys.

The rules are derived from the model config (``config.model`` of a ``projects/configs/co_*``
file): which norm follows which operation comes from each layer's ``operation_order``, the
encoder's prediction branches sit at index ``num_layers`` of ``cls_branches`` /
``reg_branches``, and the neck's extra levels follow its inputs. The collaborative auxiliary
heads (RPN, RoI, ATSS and their query projections) are dropped by default (a model without
the collaborative scheme); ``with_collaborative=True`` maps them to
``schemes.collaborative.*`` (``schemes.collaborative``) instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from detrkit.convert.codetr_atss import atss_rules
from detrkit.convert.codetr_aux import faster_rcnn_rules
from detrkit.convert.codetr_config import num_feature_levels, operation_order, query_head
from detrkit.convert.rules import ConversionResult, RenameRule, SplitRule, convert_state_dict

_WB = r"(weight|bias)"
_MSDA = r"(sampling_offsets|attention_weights|value_proj|output_proj)"
_HEAD = r"query_head\.transformer"
# mmcv's FFN: layers.0 = Sequential(Linear, act, dropout), layers.1 = Linear.
_FFN_LINEARS = (("0.0", "linear1"), ("1", "linear2"))
# An mmdet MLP branch (Linear, ReLU, Linear, ReLU, Linear) -> detrkit MLP layers 0, 1, 2.
_BRANCH_LAYERS = (("0", "0"), ("2", "1"), ("4", "2"))

# Training-only parts of Co-DETR that detrkit does not build (yet).
AUXILIARY_RULES = (
    RenameRule(r"(rpn_head|roi_head|bbox_head)\..+", None),
    RenameRule(rf"{_HEAD}\.aux_pos_trans(_norm)?\..+", None),
    # Co-Deformable-DETR's positive-query projections and per-head position offsets.
    RenameRule(rf"{_HEAD}\.(pos_feats_trans|pos_feats_norm)\..+", None),
    RenameRule(rf"{_HEAD}\.head_pos_embed\.weight", None),
    RenameRule(r"query_head\.downsample\..+", None),
)
# Co-DETR's collaborative parts -> the ``collaborative`` scheme (official heads: RoI head 0,
# ATSS ``bbox_head.0``); put before AUXILIARY_RULES (the first matching rule wins).
_SCHEME = "schemes.collaborative"
COLLABORATIVE_RULES = (
    *faster_rcnn_rules(0, f"{_SCHEME}.rpn", f"{_SCHEME}.roi"),
    *atss_rules(0, f"{_SCHEME}.atss"),
    RenameRule(rf"query_head\.downsample\.(0|1)\.{_WB}", rf"{_SCHEME}.pyramid.downsample.\1.\2"),
    RenameRule(
        rf"{_HEAD}\.aux_pos_trans(_norm)?\.(\d+)\.{_WB}", rf"{_SCHEME}.aux_pos_trans\1.\2.\3"
    ),
    # Co-Deformable-DETR's positive-query feature projections and per-head scalar offsets.
    RenameRule(rf"{_HEAD}\.pos_feats_(trans|norm)\.(\d+)\.{_WB}", rf"{_SCHEME}.pos_feats_\1.\2.\3"),
    RenameRule(rf"{_HEAD}\.head_pos_embed\.weight", f"{_SCHEME}.head_pos_embed.weight"),
)
BACKBONE_RULES = (
    # FrozenBatchNorm2d keeps no step counter.
    RenameRule(r"backbone\..+\.num_batches_tracked", None),
    RenameRule(r"backbone\.(.+)", r"backbone.\1"),
)


def _layer_rules(stack: str, layer: Mapping[str, Any]) -> list[RenameRule]:
    """Norms, FFN and deformable attention of an mmcv layer stack ("encoder" / "decoder")."""
    prefix = rf"{_HEAD}\.{stack}\.layers\.(\d+)"
    ops = operation_order(layer)
    rules = [
        RenameRule(rf"{prefix}\.norms\.{index}\.{_WB}", rf"{stack}.layers.\1.{op}_norm.\2")
        for index, op in enumerate(ops)
    ]
    rules += [
        RenameRule(rf"{prefix}\.ffns\.0\.layers\.{src}\.{_WB}", rf"{stack}.layers.\1.ffn.{dst}.\2")
        for src, dst in _FFN_LINEARS
    ]
    attentions = [op for op in ops if op != "ffn"]
    for index, op in enumerate(attentions):
        # The encoder's deformable self-attention is the module itself; the decoder's wraps it.
        target = f"{stack}.layers.\\1.{op}" + ("" if stack == "encoder" else ".attn")
        if op == "self_attn" and stack == "decoder":
            rules.append(
                RenameRule(
                    rf"{prefix}\.attentions\.{index}\.attn\.out_proj\.{_WB}",
                    rf"{target}.out_proj.\2",
                )
            )
        else:
            rules.append(
                RenameRule(rf"{prefix}\.attentions\.{index}\.{_MSDA}\.{_WB}", rf"{target}.\2.\3")
            )
    return rules


def _branch_rules(source: str, index: str, target: str) -> list[RenameRule]:
    """``query_head.{cls,reg}_branches.{index}`` -> ``target`` (a Linear or an MLP)."""
    weight = r"(?P<w>weight|bias)"
    if source == "cls":
        return [RenameRule(rf"query_head\.cls_branches\.{index}\.{weight}", rf"{target}.\g<w>")]
    return [
        RenameRule(
            rf"query_head\.reg_branches\.{index}\.{src}\.{weight}", rf"{target}.layers.{dst}.\g<w>"
        )
        for src, dst in _BRANCH_LAYERS
    ]


def _head_rules(num_layers: int) -> list[RenameRule]:
    """The encoder branch (index ``num_layers``, first) and one branch per decoder layer."""
    rules = _branch_rules("cls", str(num_layers), "queries.class_embed")
    rules += _branch_rules("reg", str(num_layers), "queries.bbox_embed")
    rules += _branch_rules("cls", r"(?P<l>\d+)", r"head.class_embed.\g<l>")
    return rules + _branch_rules("reg", r"(?P<l>\d+)", r"head.bbox_embed.\g<l>")


def codetr_rules(model: Mapping[str, Any]) -> tuple[RenameRule, ...]:
    """Every rename rule of a Co-DINO / Co-Deformable-DETR checkpoint described by ``model``
    (the mmdet config)."""
    head = query_head(model)
    transformer = head["transformer"]
    num_inputs = len(model["neck"]["in_channels"])
    rules = list(AUXILIARY_RULES + BACKBONE_RULES)
    rules += [
        RenameRule(r"neck\.convs\.(\d+)\.conv\.(weight|bias)", r"neck.projections.\1.0.\2"),
        RenameRule(r"neck\.convs\.(\d+)\.gn\.(weight|bias)", r"neck.projections.\1.1.\2"),
    ]
    extra_levels = num_feature_levels(head) - num_inputs
    for extra in range(extra_levels):
        level = num_inputs + extra
        rules += [
            RenameRule(
                rf"neck\.extra_convs\.{extra}\.conv\.{_WB}", rf"neck.projections.{level}.0.\1"
            ),
            RenameRule(
                rf"neck\.extra_convs\.{extra}\.gn\.{_WB}", rf"neck.projections.{level}.1.\1"
            ),
        ]
    rules += [
        RenameRule(rf"{_HEAD}\.level_embeds", "encoder.level_embed"),
        RenameRule(rf"{_HEAD}\.(enc_output|enc_output_norm)\.{_WB}", r"queries.\1.\2"),
        RenameRule(rf"{_HEAD}\.query_embed\.weight", "queries.tgt_embed.weight"),
        # Co-Deformable-DETR's two-stage proposal embedding and mixed-selection content.
        RenameRule(rf"{_HEAD}\.(pos_trans|pos_trans_norm)\.{_WB}", r"queries.\1.\2"),
        RenameRule(r"query_head\.query_embedding\.weight", "queries.query_embed.weight"),
        RenameRule(
            rf"{_HEAD}\.decoder\.ref_point_head\.0\.{_WB}",
            r"decoder.query_pos_head.mlp.layers.0.\1",
        ),
        RenameRule(
            rf"{_HEAD}\.decoder\.ref_point_head\.2\.{_WB}",
            r"decoder.query_pos_head.mlp.layers.1.\1",
        ),
        RenameRule(rf"{_HEAD}\.decoder\.norm\.{_WB}", r"decoder.output_norm.\1"),
        RenameRule(
            r"query_head\.label_embedding\.weight", "schemes.denoising.label_embedding.weight"
        ),
    ]
    rules += _layer_rules("encoder", transformer["encoder"]["transformerlayers"])
    rules += _layer_rules("decoder", transformer["decoder"]["transformerlayers"])
    rules += _head_rules(transformer["decoder"]["num_layers"])
    return tuple(rules)


def codetr_splits(model: Mapping[str, Any]) -> tuple[SplitRule, ...]:
    """The decoder self-attention's stacked (q, k, v) ``in_proj`` tensors."""
    layer = query_head(model)["transformer"]["decoder"]["transformerlayers"]
    ops = [op for op in operation_order(layer) if op != "ffn"]
    index = ops.index("self_attn")
    return (
        SplitRule(
            rf"{_HEAD}\.decoder\.layers\.(\d+)\.attentions\.{index}\.attn\.in_proj_{_WB}",
            tuple(
                rf"decoder.layers.\1.self_attn.attn.{p}.\2" for p in ("q_proj", "k_proj", "v_proj")
            ),
        ),
    )


def convert_codetr(
    state: Mapping[str, Tensor],
    model: Mapping[str, Any],
    *,
    with_denoising: bool = True,
    with_collaborative: bool = False,
) -> ConversionResult:
    """Convert an official Co-DINO state dict; the neck's convolutions, which have no bias in
    the original (a GroupNorm follows), get zero biases. ``with_denoising=False`` drops the
    denoising label table (a model built without the scheme); ``with_collaborative=True``
    keeps the auxiliary heads for a model with the ``collaborative`` scheme (RPN + RoI head 0
    and ATSS head 0 of the checkpoint)."""
    rules = codetr_rules(model)
    if with_collaborative:
        rules = COLLABORATIVE_RULES + rules
    if not with_denoising:
        rules = (RenameRule(r"query_head\.label_embedding\.weight", None),) + rules
    result = convert_state_dict(state, rules, codetr_splits(model))
    for key, weight in list(result.state_dict.items()):
        if key.startswith("neck.projections.") and key.endswith(".0.weight"):
            bias = key[: -len("weight")] + "bias"
            result.state_dict.setdefault(bias, torch.zeros(weight.shape[0], dtype=weight.dtype))
    return result
