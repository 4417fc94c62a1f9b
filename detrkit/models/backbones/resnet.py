# SPDX-License-Identifier: Apache-2.0
"""ResNet backbones from torchvision with frozen BatchNorm (docs/methods.md#resnet-backbone)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import FrozenBatchNorm2d

from detrkit.errors import UserError
from detrkit.models.backbones.registry import register, resolved_frozen_stages
from detrkit.models.backbones.spec import BackboneSpec
from detrkit.models.backbones.weights import load_checked, read_state_dict

logger = logging.getLogger(__name__)

_STAGE_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
_STAGES = ("c2", "c3", "c4", "c5")
# Parameter-name prefixes of each stage; the originals freeze stage 0 and 1
# (docs/methods.md#resnet-backbone).
_STAGE_PREFIXES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
_NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}


class ResNetBackbone(nn.Module):
    """A torchvision ResNet returning the requested stages as a dict.

    Args:
        name: "resnet18" | "resnet34" | "resnet50" | "resnet101".
        return_stages: subset of ("c2", "c3", "c4", "c5") in increasing stride.
        dilation: DC5; layer4 keeps stride 16 with dilation 2.
        trainable: train the stages after ``frozen_stages``; False freezes every parameter.
        frozen_stages: 1 freezes the stem and layer1 (the originals), 0 trains everything.
        norm: "frozen_bn" or "bn" (trainable BatchNorm, for training from scratch).
        checkpointing: recompute each of layer1..4's activations in the backward pass (training
            only; needs frozen BatchNorm, whose recomputation changes no statistics).

    Attributes:
        out_channels: stage -> channels, known before the first forward.
        strides: stage -> stride in input pixels.
    """

    def __init__(
        self,
        name: str,
        *,
        return_stages: Sequence[str] = ("c5",),
        dilation: bool = False,
        trainable: bool = True,
        frozen_stages: int = 1,
        norm: str = "frozen_bn",
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if dilation and name in ("resnet18", "resnet34"):
            raise UserError(f"model.backbone.dilation (DC5) needs a bottleneck ResNet, not {name}")
        if checkpointing and norm == "bn":
            # The recomputed forward would update the running statistics a second time.
            raise UserError(
                "model.backbone.checkpointing needs model.backbone.norm=frozen_bn: recomputing "
                "trainable BatchNorm would update its running statistics twice"
            )
        self.checkpointing = checkpointing
        net = getattr(torchvision.models, name)(
            weights=None,
            norm_layer=_NORMS[norm],
            replace_stride_with_dilation=[False, False, dilation],
        )
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )
        self.return_stages = tuple(return_stages)
        channels = dict(zip(_STAGES, _STAGE_CHANNELS[name]))
        strides = dict(zip(_STAGES, (4, 8, 16, 16 if dilation else 32)))
        self.out_channels = {s: channels[s] for s in self.return_stages}
        self.strides = {s: strides[s] for s in self.return_stages}
        # Stage 1 freezes the stem together with layer1, as the originals do.
        count = frozen_stages + 1 if frozen_stages > 0 else 0
        frozen = tuple(p for stage in _STAGE_PREFIXES[:count] for p in stage)
        for param_name, param in self.named_parameters():
            param.requires_grad_(trainable and not param_name.startswith(frozen))

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        """pixels: [B, 3, H, W] -> {stage: [B, C_s, H / stride_s, W / stride_s]}."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(pixels))))
        outputs = {}
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for stage, layer in zip(_STAGES, (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
            if stage in self.return_stages:
                outputs[stage] = x
        return outputs

    def load_pretrained(self, path: str | Path) -> None:
        """Load local ImageNet weights (torchvision or timm layout, .pth or .safetensors).

        The classifier (``fc.*``) is dropped; anything else unmatched is an error naming the keys.
        """
        state = read_state_dict(Path(path))
        state = {_strip_prefix(k): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        load_checked(self, state, path, "ResNet")


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "model.", "backbone.0.body.", "backbone."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


@register("resnet18", "resnet34", "resnet50", "resnet101")
def build_resnet(cfg: BackboneSpec, stages: Sequence[str]) -> ResNetBackbone:
    return ResNetBackbone(
        cfg.name,
        return_stages=stages,
        dilation=cfg.dilation,
        trainable=cfg.trainable,
        frozen_stages=resolved_frozen_stages(cfg, family_default=1),
        norm=cfg.norm,
        checkpointing=cfg.checkpointing,
    )
