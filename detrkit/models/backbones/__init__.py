# SPDX-License-Identifier: Apache-2.0
"""Backbone families; importing a module registers its names (see ``registry``)."""

from detrkit.models.backbones import resnet  # noqa: F401  (registers resnet18/34/50/101)
from detrkit.models.backbones.registry import (
    backbone_names,
    build_backbone,
    check_backbone_name,
    register,
)

__all__ = ["backbone_names", "build_backbone", "check_backbone_name", "register"]
