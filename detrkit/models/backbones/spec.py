# SPDX-License-Identifier: Apache-2.0
"""What a backbone factory is told: the backbones' own config, not the configuration schema.

``backbone_spec`` in the configuration package's ``build`` module translates ``model.backbone``
(``BackboneConfig``) into it, so the model side never imports the schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class BackboneSpec:
    """Everything a registered factory needs to build one backbone.

    Attributes:
        name: a registered backbone name (``backbone_names()``).
        dilation: DC5 (last stage with stride 1 and dilation 2); bottleneck ResNets only.
        weights: local path to ImageNet weights loaded after construction, never downloaded.
        trainable: False freezes every parameter.
        frozen_stages: leading stages kept frozen; None = the family's original setting.
        norm: "frozen_bn" or "bn" for families with BatchNorm (ignored by LayerNorm-only ones).
        drop_path_rate: stochastic depth of the transformer families.
        checkpointing: recompute each stage's activations in the backward pass.
    """

    name: str = "resnet50"
    dilation: bool = False
    weights: str | None = None
    trainable: bool = True
    frozen_stages: int | None = None
    norm: Literal["frozen_bn", "bn"] = "frozen_bn"
    drop_path_rate: float = 0.0
    checkpointing: bool = False
