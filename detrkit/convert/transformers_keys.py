# SPDX-License-Identifier: Apache-2.0
"""detrkit state-dict keys and their Hugging Face transformers names (DETR, Deformable DETR).

One table, read in both directions: :func:`hf_keys` gives, for a detrkit key, every transformers
key holding the same tensor (several for heads transformers keeps twice, e.g. Deformable DETR's
``bbox_embed.i`` and the decoder's ``model.decoder.bbox_embed.i`` used for refinement). The
importer fills each detrkit key from them, the exporter writes each of them.
"""

from __future__ import annotations

import re

from detrkit.convert.transformers_config import DETR, HfModel

_WB = r"(weight|bias)"
_BN = r"(weight|bias|running_mean|running_var)"
_MSDA = r"(sampling_offsets|attention_weights|value_proj|output_proj)"
_P = "model.backbone.model."

# detrkit backbone (torchvision ResNet) -> transformers' ResNetBackbone.
_HF_RESNET_RULES = (
    (r"backbone\.conv1\.weight", _P + r"embedder.embedder.convolution.weight"),
    (rf"backbone\.bn1\.{_BN}", _P + r"embedder.embedder.normalization.\1"),
    (
        r"backbone\.layer(\d)\.(\d+)\.conv(\d)\.weight",
        _P + r"encoder.stages.{s}.layers.\2.layer.{k}.convolution.weight",
    ),
    (
        rf"backbone\.layer(\d)\.(\d+)\.bn(\d)\.{_BN}",
        _P + r"encoder.stages.{s}.layers.\2.layer.{k}.normalization.\4",
    ),
    (
        r"backbone\.layer(\d)\.(\d+)\.downsample\.0\.weight",
        _P + r"encoder.stages.{s}.layers.\2.shortcut.convolution.weight",
    ),
    (
        rf"backbone\.layer(\d)\.(\d+)\.downsample\.1\.{_BN}",
        _P + r"encoder.stages.{s}.layers.\2.shortcut.normalization.\3",
    ),
)
# timm's ResNet has torchvision's names.
_TIMM_RULES = ((r"backbone\.(.+)", _P + r"\1"),)

_COMMON_RULES = (
    (r"neck\.position\.row_embed\.weight", "model.position_embedding.row_embeddings.weight"),
    (r"neck\.position\.col_embed\.weight", "model.position_embedding.column_embeddings.weight"),
    (r"queries\.query_embed\.weight", "model.query_position_embeddings.weight"),
    (
        rf"(encoder|decoder)\.layers\.(\d+)\.self_attn\.attn\.(q|k|v)_proj\.{_WB}",
        r"model.\1.layers.\2.self_attn.\3_proj.\4",
    ),
    (
        rf"(encoder|decoder)\.layers\.(\d+)\.self_attn\.attn\.out_proj\.{_WB}",
        r"model.\1.layers.\2.self_attn.o_proj.\3",
    ),
    (
        rf"(encoder|decoder)\.layers\.(\d+)\.ffn\.linear(1|2)\.{_WB}",
        r"model.\1.layers.\2.mlp.fc\3.\4",
    ),
    (
        rf"(encoder|decoder)\.layers\.(\d+)\.self_attn_norm\.{_WB}",
        r"model.\1.layers.\2.self_attn_layer_norm.\3",
    ),
    (
        rf"(encoder|decoder)\.layers\.(\d+)\.ffn_norm\.{_WB}",
        r"model.\1.layers.\2.final_layer_norm.\3",
    ),
    (
        rf"decoder\.layers\.(\d+)\.cross_attn_norm\.{_WB}",
        r"model.decoder.layers.\1.encoder_attn_layer_norm.\2",
    ),
)

_DETR_RULES = (
    (rf"neck\.projections\.0\.0\.{_WB}", r"model.input_projection.\1"),
    (
        rf"decoder\.layers\.(\d+)\.cross_attn\.attn\.(q|k|v)_proj\.{_WB}",
        r"model.decoder.layers.\1.encoder_attn.\2_proj.\3",
    ),
    (
        rf"decoder\.layers\.(\d+)\.cross_attn\.attn\.out_proj\.{_WB}",
        r"model.decoder.layers.\1.encoder_attn.o_proj.\2",
    ),
    (rf"decoder\.output_norm\.{_WB}", r"model.decoder.layernorm.\1"),
    (rf"head\.class_embed\.0\.{_WB}", r"class_labels_classifier.\1"),
    (rf"head\.bbox_embed\.0\.layers\.(\d)\.{_WB}", r"bbox_predictor.layers.\1.\2"),
)

_DEFORMABLE_RULES = (
    (rf"neck\.projections\.(\d+)\.(0|1)\.{_WB}", r"model.input_proj.\1.\2.\3"),
    (r"encoder\.level_embed", "model.level_embed"),
    (
        rf"encoder\.layers\.(\d+)\.self_attn\.{_MSDA}\.{_WB}",
        r"model.encoder.layers.\1.self_attn.\2.\3",
    ),
    (
        rf"decoder\.layers\.(\d+)\.cross_attn\.attn\.{_MSDA}\.{_WB}",
        r"model.decoder.layers.\1.encoder_attn.\2.\3",
    ),
    (rf"queries\.reference_points\.{_WB}", r"model.reference_points.\1"),
    (
        rf"queries\.(enc_output|enc_output_norm|pos_trans|pos_trans_norm)\.{_WB}",
        r"model.\1.\2",
    ),
)
_HEAD = re.compile(
    r"(head\.(class_embed|bbox_embed)\.(\d+)|queries\.(class_embed|bbox_embed))\.(.+)"
)


def hf_keys(key: str, model: HfModel, shared: bool) -> tuple[str, ...]:
    """Every transformers key holding detrkit's ``key``; () for ``num_batches_tracked``, which
    transformers' frozen BatchNorm lacks.

    Args:
        key: a detrkit state-dict key.
        model: the transformers architecture.
        shared: detrkit has one head for every decoder layer (Deformable DETR without
            refinement): it maps onto each of transformers' per-layer heads.

    Raises:
        KeyError: ``key`` has no transformers counterpart.
    """
    if key.endswith("num_batches_tracked"):
        return ()
    if model.family != DETR and _HEAD.fullmatch(key):
        return _deformable_head_keys(key, model, shared)
    rules = _HF_RESNET_RULES if model.backbone.layout == "resnet" else _TIMM_RULES
    family = _DETR_RULES if model.family == DETR else _DEFORMABLE_RULES
    for pattern, template in (*rules, *_COMMON_RULES, *family):
        match = re.fullmatch(pattern, key)
        if match:
            return (_expand(match, template),)
    raise KeyError(key)


def _expand(match: re.Match, template: str) -> str:
    """``re`` expansion plus the ResNet indices: torchvision's layer s / conv k are transformers'
    stage s-1 / layer k-1."""
    if "{s}" in template:
        groups = match.groups()
        template = template.replace("{s}", str(int(groups[0]) - 1))
        if "{k}" in template:
            template = template.replace("{k}", str(int(groups[2]) - 1))
    return match.expand(template)


def _deformable_head_keys(key: str, model: HfModel, shared: bool) -> tuple[str, ...]:
    """Deformable DETR's heads: ``class_embed.i`` / ``bbox_embed.i`` for decoder layer i (all
    layers for a shared head), index L for the two-stage encoder head; the decoder keeps copies
    (``model.decoder.bbox_embed`` with refinement, ``model.decoder.class_embed`` in two-stage)."""
    match = _HEAD.fullmatch(key)
    kind = match.group(2) or match.group(4)
    rest = match.group(5)
    if match.group(4):  # the two-stage encoder head
        layers = [model.decoder_layers]
    elif shared:
        layers = list(range(model.decoder_layers))
    else:
        layers = [int(match.group(3))]
    copies = (kind == "bbox_embed" and model.refine) or (kind == "class_embed" and model.two_stage)
    names = []
    for layer in layers:
        names.append(f"{kind}.{layer}.{rest}")
        if copies:
            names.append(f"model.decoder.{kind}.{layer}.{rest}")
    return tuple(names)


def tied_source(hf_key: str) -> str | None:
    """The index-0 key a tied Deformable DETR head key stands for (``class_embed.2.bias`` ->
    ``class_embed.0.bias``), None for keys that are not per-layer heads or already index 0."""
    match = re.fullmatch(r"((?:model\.decoder\.)?(?:class_embed|bbox_embed))\.(\d+)\.(.+)", hf_key)
    if match is None or match.group(2) == "0":
        return None
    return f"{match.group(1)}.0.{match.group(3)}"


def legacy_renamed(key: str) -> str:
    """transformers 4 names of DETR / Deformable DETR weights in today's names (what
    transformers' own conversion mapping does when it loads them)."""
    key = key.replace("model.backbone.conv_encoder.", "model.backbone.")
    key = re.sub(r"\.(self_attn|encoder_attn)\.out_proj\.", r".\1.o_proj.", key)
    return re.sub(r"\.layers\.(\d+)\.fc(1|2)\.", r".layers.\1.mlp.fc\2.", key)
