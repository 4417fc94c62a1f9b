# SPDX-License-Identifier: Apache-2.0
"""Backbone families; importing a module registers its names (see ``registry``)."""

from detrkit.models.backbones import (
    coat,  # noqa: F401  (registers coat_lite_tiny/mini/small/medium, coat_tiny/mini/small)
    mpvit,  # noqa: F401  (registers mpvit_tiny/xsmall/small/base)
    resnet,  # noqa: F401  (registers resnet18/34/50/101)
    swin,  # noqa: F401  (registers swin_tiny/small/base/large)
)
from detrkit.models.backbones.registry import (
    backbone_names,
    build_backbone,
    check_backbone_name,
    register,
)
from detrkit.models.backbones.spec import BackboneSpec

__all__ = ["BackboneSpec", "backbone_names", "build_backbone", "check_backbone_name", "register"]
