# SPDX-License-Identifier: Apache-2.0
"""MPViT backbones (tiny, xsmall, small, base) as in Deformable DETR with MPViT
(docs/methods.md#mpvit-and-coat-mpvit).

Written for detrkit (timm has no MPViT); module names follow the official implementation, so its
ImageNet checkpoints load with ``load_pretrained`` and its detection checkpoints convert by name.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import FrozenBatchNorm2d

from detrkit.errors import UserError
from detrkit.models.backbones.mpvit_layers import (
    ConvBN,
    MHCAStage,
    PatchEmbedStage,
    init_transformer_weights,
)
from detrkit.models.backbones.registry import register, resolved_frozen_stages
from detrkit.models.backbones.spec import BackboneSpec
from detrkit.models.backbones.weights import load_checked, read_state_dict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MPViTVariant:
    """Widths and depths of one MPViT size (4 stages, 8 heads everywhere)."""

    embed_dims: tuple[int, int, int, int]
    num_layers: tuple[int, int, int, int]
    mlp_ratio: float
    num_path: tuple[int, int, int, int] = (2, 3, 3, 3)
    num_heads: int = 8

    def out_dim(self, stage: int) -> int:
        """Channels leaving stage ``stage``: the next stage's width (the last keeps its own)."""
        return self.embed_dims[min(stage + 1, 3)]


VARIANTS = {
    "mpvit_tiny": MPViTVariant((64, 96, 176, 216), (1, 2, 4, 1), 2.0),
    "mpvit_xsmall": MPViTVariant((64, 128, 192, 256), (1, 2, 4, 1), 4.0),
    "mpvit_small": MPViTVariant((64, 128, 216, 288), (1, 3, 6, 3), 4.0),
    "mpvit_base": MPViTVariant((128, 224, 368, 480), (1, 3, 8, 3), 4.0),
}
# Our stage names by stride; the original calls them stage2 ... stage5.
_STAGES = ("c2", "c3", "c4", "c5")
_NORMS = {"bn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d}
# Keys of official checkpoints that are not parameters of ours: the ImageNet classifier, and the
# per-block copies of each encoder's shared cpe/crpe (aliases of the encoder-level tensors).
_NOT_OURS = re.compile(r"cls_head\..+|.+\.MHCA_layers\.\d+\.(cpe|crpe|factoratt_crpe\.crpe)\..+")


class MPViTBackbone(nn.Module):
    """MPViT returning the requested stages: c2..c5 at strides 4, 8, 16, 32.

    Args:
        name: "mpvit_tiny" | "mpvit_xsmall" | "mpvit_small" | "mpvit_base".
        return_stages: subset of ("c2", "c3", "c4", "c5") in increasing stride (Deformable DETR
            uses c3, c4, c5, the original's stage3..stage5).
        norm: "bn" (trainable BatchNorm; the original's SyncBN) or "frozen_bn".
        trainable: False freezes every parameter (and keeps BatchNorm statistics fixed).
        frozen_stages: 0 trains everything (the original); k > 0 freezes the stem and the first k
            stages (1 = stem + the stride-4 stage, like ResNet's stem + layer1; at most 4). Frozen
            parts stay in eval mode, so their BatchNorm statistics do not move either.
        drop_path_rate: stochastic depth, rising linearly from 0 over all transformer blocks.
        checkpointing: in training, recompute each stage's activations in the backward pass.

    Attributes:
        out_channels: stage -> channels, known before the first forward.
        strides: stage -> stride in input pixels.
    """

    def __init__(
        self,
        name: str,
        *,
        return_stages: Sequence[str] = ("c3", "c4", "c5"),
        norm: str = "bn",
        trainable: bool = True,
        frozen_stages: int = 0,
        drop_path_rate: float = 0.0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not 0 <= frozen_stages <= 4:
            raise UserError(f"model.backbone.frozen_stages must be 0..4 for {name}")
        variant = VARIANTS[name]
        self.stem = _stem(variant.embed_dims[0], _NORMS[norm])
        self.patch_embed_stages, self.mhca_stages = _stages(variant, _NORMS[norm], drop_path_rate)
        self.apply(init_transformer_weights)
        self.return_stages = tuple(return_stages)
        self.out_channels = {s: variant.out_dim(_STAGES.index(s)) for s in self.return_stages}
        self.strides = {s: 4 * 2 ** _STAGES.index(s) for s in self.return_stages}
        self.checkpointing = checkpointing
        # The stem counts as part of the first frozen stage, as in the ResNets.
        self._num_frozen = frozen_stages + 1 if frozen_stages else 0
        if not trainable:
            self._num_frozen = 5
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train()

    def _frozen_modules(self) -> Iterator[nn.Module]:
        """The stem, then stage by stage (patch embeddings and transformers): the frozen prefix."""
        parts = [(self.stem,), *zip(self.patch_embed_stages, self.mhca_stages)]
        for part in parts[: self._num_frozen]:
            yield from part

    def train(self, mode: bool = True) -> MPViTBackbone:
        """As ``nn.Module.train``, but frozen parts always stay in eval mode."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        """pixels: [B, 3, H, W] -> {stage: [B, C_s, ceil(H / stride_s), ceil(W / stride_s)]}."""
        x = self.stem(pixels)
        last = max(_STAGES.index(s) for s in self.return_stages)
        outputs = {}
        for index, stage in enumerate(_STAGES[: last + 1]):
            x = self._run_stage(index, x)
            if stage in self.return_stages:
                outputs[stage] = x
        return outputs

    def _run_stage(self, index: int, x: Tensor) -> Tensor:
        """Stage ``index``: [B, C, H, W] -> [B, C_out, H / s, W / s], checkpointed if asked."""

        def stage(inputs: Tensor) -> Tensor:
            return self.mhca_stages[index](self.patch_embed_stages[index](inputs))

        if not (self.checkpointing and self.training and torch.is_grad_enabled()):
            return stage(x)
        if torch.compiler.is_compiling():
            # Compiled, the recomputation is part of the traced graph, without the in-place
            # updates of BatchNorm statistics (and dynamo does not trace a ``context_fn``).
            return checkpoint(stage, x, use_reentrant=False)
        modules = (self.patch_embed_stages[index], self.mhca_stages[index])
        return checkpoint(
            stage,
            x,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _StatisticsUpdatedOnce(modules)),
        )

    def load_pretrained(self, path: str | Path) -> None:
        """Load an official MPViT ImageNet checkpoint (.pth or .safetensors, maybe wrapped in
        ``model``/``state_dict`` and prefixed ``module.``/``model.``).

        The classifier (``cls_head.*``) and the per-block aliases of the shared position
        encodings are dropped; anything else unmatched is a ``UserError`` naming the keys.
        """
        state = {_strip_prefix(k): v for k, v in read_state_dict(Path(path)).items()}
        state = {k: v for k, v in state.items() if not _NOT_OURS.fullmatch(k)}
        load_checked(self, state, path, "MPViT")


def _stem(dim: int, norm: type[nn.Module]) -> nn.Sequential:
    """Two 3 x 3 stride-2 ConvBN + Hardswish: [B, 3, H, W] -> [B, dim, H / 4, W / 4]."""
    return nn.Sequential(
        ConvBN(3, dim // 2, norm, kernel_size=3, stride=2, act=True),
        ConvBN(dim // 2, dim, norm, kernel_size=3, stride=2, act=True),
    )


def _stages(
    variant: MPViTVariant, norm: type[nn.Module], drop_path_rate: float
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """``patch_embed_stages`` and ``mhca_stages``; drop-path rates rise linearly over blocks."""
    blocks = sum(variant.num_layers)
    rates = [drop_path_rate * i / max(blocks - 1, 1) for i in range(blocks)]  # linspace(0, rate)
    embeds, stages = nn.ModuleList(), nn.ModuleList()
    for i, (dim, depth) in enumerate(zip(variant.embed_dims, variant.num_layers)):
        start = sum(variant.num_layers[:i])
        embeds.append(PatchEmbedStage(dim, variant.num_path[i], norm, downsample=i > 0))
        stages.append(
            MHCAStage(
                dim,
                variant.out_dim(i),
                num_path=variant.num_path[i],
                num_heads=variant.num_heads,
                mlp_ratio=variant.mlp_ratio,
                drop_paths=rates[start : start + depth],
                norm=norm,
            )
        )
    return embeds, stages


class _StatisticsUpdatedOnce:
    """Context for recomputing a checkpointed stage in backward (re-entrant: a graph may be
    backpropagated more than once). Its BatchNorms normalise with batch statistics as in the
    forward pass but leave their running statistics, updated by that pass already, as they are
    (momentum 0 and the batch counter restored on exit)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.norms = [
            m
            for module in modules
            for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
        ]
        self.saved: list[tuple[float | None, Tensor]] = []

    def __enter__(self) -> None:
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.norms]
        for norm in self.norms:
            norm.momentum = 0.0

    def __exit__(self, *exc_info) -> None:
        for norm, (momentum, count) in zip(self.norms, self.saved):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(count)


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


@register(*VARIANTS)
def build_mpvit(cfg: BackboneSpec, stages: Sequence[str]) -> MPViTBackbone:
    if cfg.dilation:
        raise UserError(f"model.backbone.dilation (DC5) is for ResNets, not {cfg.name}")
    return MPViTBackbone(
        cfg.name,
        return_stages=stages,
        norm=cfg.norm,
        trainable=cfg.trainable,
        frozen_stages=resolved_frozen_stages(cfg, family_default=0),
        drop_path_rate=cfg.drop_path_rate,
        checkpointing=cfg.checkpointing,
    )
