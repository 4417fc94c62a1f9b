# SPDX-License-Identifier: Apache-2.0
"""Official SMCA-DETR checkpoints (docs/methods.md#smca-detr-checkpoints): single-scale (repository
root) and multi-scale
(``Multi_scale_SMCA.zip``, kernel-5 ``transformer.py`` and kernel-7 ``transformer_44_dot_4.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from detrkit.config.schema import ExperimentConfig, LossConfig, SmcaConfig
from detrkit.convert.rules import RenameRule
from detrkit.errors import UserError

# ``--dynamic_scale`` -> ``model.smca.scale``.
SCALE_MODES = {
    "type1": "none",
    "type2": "isotropic",
    "type3": "per_axis",
    "type4": "covariance_like",
}
# SMCA's class loss weight is hard-coded (docs/methods.md#smca-detr-training); ``--eos_coef`` is
# parsed but unused.
CLASS_WEIGHT = 2.0
# Multi-scale SMCA keeps the best 500 (query, class) pairs per image
# (docs/methods.md#smca-detr-inference).
MULTI_SCALE_TOP_K = 500

_DEC = r"transformer\.decoder\.layers\.(\d+)"
_CROSS = r"decoder.layers.\1.cross_attn"
_WB = r"(weight|bias)"
# The Gaussian prior's predictors, per decoder layer (point1 in the first layer only).
DECODER_PRIOR_RULES = (
    RenameRule(rf"{_DEC}\.norm4\.{_WB}", rf"{_CROSS}.norm.\2"),
    RenameRule(rf"{_DEC}\.point1\.layers\.(\d)\.{_WB}", rf"{_CROSS}.reference_head.layers.\2.\3"),
    RenameRule(rf"{_DEC}\.point2\.{_WB}", rf"{_CROSS}.offset_head.\2"),
    RenameRule(rf"{_DEC}\.point3\.{_WB}", rf"{_CROSS}.scale_head.\2"),
    RenameRule(rf"{_DEC}\.point4\.{_WB}", rf"{_CROSS}.level_head.\2"),
)


def _smca_options(args: Mapping[str, Any], **changes: Any) -> SmcaConfig:
    scale = args.get("dynamic_scale", "type1")
    if scale not in SCALE_MODES:
        raise UserError(
            f"unknown SMCA --dynamic_scale {scale!r}; expected one of {list(SCALE_MODES)}"
        )
    return SmcaConfig(scale=SCALE_MODES[scale], smooth=float(args.get("smooth", 8)), **changes)


def _focal_loss(loss: LossConfig) -> LossConfig:
    return replace(loss, class_loss="sigmoid_focal", class_weight=CLASS_WEIGHT)


def smca_config(detr: ExperimentConfig, args: Mapping[str, Any]) -> ExperimentConfig:
    """The detrkit config equal to an official single-scale SMCA run's ``args``
    (docs/methods.md#smca-detr-single-scale),
    given ``detr``, the DETR config of the same ``args``: the Gaussian-modulated decoder, 92
    sigmoid logits (the 92nd is never a target but can be predicted, as in the original) and
    the top-``num_queries`` postprocessing."""
    if "head_mixture" in args or "query_mixture" in args:
        raise UserError(
            "these are multi-scale SMCA arguments (--head_mixture/--query_mixture exist only in "
            "Multi_scale_SMCA.zip): convert with --from smca_ms (transformer.py, kernel 5) or "
            "--from smca_ms_k7 (transformer_44_dot_4.py, kernel 7)"
        )
    model = detr.model
    model = replace(
        model,
        num_classes=model.num_classes + 1,
        decoder=replace(model.decoder, attention="smca"),
        loss=_focal_loss(model.loss),
        top_k=args["num_queries"],
        smca=_smca_options(args),
    )
    return replace(detr, model=model)


_ENC = r"transformer\.encoder\.layers\.(\d+)"
_LEVEL_OF_STRIDE = {"8": "0", "16": "1", "32": "2", "64": "3"}
# Multi-scale: the neck's projections, the convolutional encoder and the decoder memory's
# downsampling (docs/methods.md#smca-detr-checkpoints). Keys are named after ResNet-50's channels
# and strides whatever
# the backbone.
MULTI_SCALE_RULES = (
    RenameRule(r"input_proj_512\.(weight|bias)", r"neck.projections.0.0.\1"),
    RenameRule(r"input_proj_1024\.(weight|bias)", r"neck.projections.1.0.\1"),
    RenameRule(r"input_proj_2048\.(weight|bias)", r"neck.projections.2.0.\1"),
    RenameRule(r"input_proj_2048_3\.(weight|bias)", r"neck.projections.3.0.\1"),
    RenameRule(r"transformer\.level_embed", r"encoder.level_embed"),
    RenameRule(r"transformer\.conv\.(weight|bias)", r"encoder.downsample.\1"),
    *(
        RenameRule(rf"{_ENC}\.self_attn_{stride}\.{_WB}", rf"encoder.layers.\1.level_convs.{i}.\2")
        for stride, i in _LEVEL_OF_STRIDE.items()
    ),
    # high_to_low_{i} downsamples level i-1 into level i; low_to_high_{i} upsamples level i into
    # level i-1; the kernel-7 file shares one of each (no suffix).
    *(
        RenameRule(rf"{_ENC}\.{name}_{pair + 1}\.{_WB}", rf"encoder.layers.\1.{convs}.{pair}.\2")
        for name, convs in (("high_to_low", "down_convs"), ("low_to_high", "up_convs"))
        for pair in range(3)
    ),
    RenameRule(rf"{_ENC}\.high_to_low\.{_WB}", r"encoder.layers.\1.down_convs.0.\2"),
    RenameRule(rf"{_ENC}\.low_to_high\.{_WB}", r"encoder.layers.\1.up_convs.0.\2"),
    RenameRule(rf"{_ENC}\.conv_1\.{_WB}", r"encoder.layers.\1.input_proj.\2"),
    RenameRule(rf"{_ENC}\.conv_2\.{_WB}", r"encoder.layers.\1.output_proj.\2"),
    RenameRule(rf"{_ENC}\.norm1\.{_WB}", r"encoder.layers.\1.mix_norm.\2"),
    RenameRule(rf"{_ENC}\.norm2\.{_WB}", r"encoder.layers.\1.ffn_norm.\2"),
)


def smca_multi_scale_config(
    detr: ExperimentConfig, args: Mapping[str, Any], *, kernel_size: int, shared_cross_scale: bool
) -> ExperimentConfig:
    """The detrkit config equal to an official multi-scale SMCA run's ``args``
    (docs/methods.md#smca-detr-multi-scale) of the
    zip's ``transformer.py`` (kernel 5, one cross-scale convolution per level pair) or
    ``transformer_44_dot_4.py`` (kernel 7, shared), given the DETR config of the same ``args``.

    Each image's levels are weighted by its own level weights; ``with_original_bugs`` turns on
    the original's use of image 0's weights for the whole batch."""
    if args.get("dynamic_scale", "type1") != "type3":
        raise UserError(
            "multi-scale SMCA runs only with --dynamic_scale type3 (the other types crash in the "
            "original, docs/methods.md#smca-detr-multi-scale)"
        )
    model = detr.model
    options = _smca_options(
        args,
        head_mixture=bool(args.get("head_mixture")),
        query_mixture=bool(args.get("query_mixture")),
        encoder_kernel=kernel_size,
        shared_cross_scale=shared_cross_scale,
    )
    model = replace(
        model,
        num_classes=model.num_classes + 1,
        num_feature_levels=4,
        encoder=replace(model.encoder, attention="smca_conv"),
        decoder=replace(model.decoder, attention="smca"),
        loss=_focal_loss(model.loss),
        top_k=MULTI_SCALE_TOP_K,
        smca=options,
    )
    return replace(detr, model=model)


def with_original_bugs(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` computing what the multi-scale original computes, bug included: image 0's
    level weights applied to every image of a batch."""
    smca = replace(config.model.smca, first_image_level_weights=True)
    return replace(config, model=replace(config.model, smca=smca))
