# SPDX-License-Identifier: Apache-2.0
"""Swin Transformer (V1) backbones built from timm's modules, as H-DETR uses them
(docs/methods.md#h-detr-architecture).

The parameters are timm's ``SwinTransformer`` modules (``pretrained=False``, never a download);
the forward pass is driven here for three reasons:

* **any input size.** Detection images have arbitrary H, W. The patch embedding pads the image
  to a multiple of 4, each block pads its map to a multiple of the window, each patch merging
  pads odd maps to even; every stage's map is ``ceil(H / stride)`` rows, like the ResNets'.
* **the original window order.** The official detection Swin (H-DETR's backbone) pads a map
  *before* the cyclic shift; timm shifts first and pads after. The two agree whenever each
  stage's map is a multiple of the window (e.g. 224 x 224 with window 7) and differ along the
  bottom/right border otherwise, so converted H-DETR checkpoints need the official order.
* **detection outputs.** Stages are returned NCHW, each through its own extra LayerNorm
  (``norm1/2/3`` for c3/c4/c5, the originals' ``out_indices`` (1, 2, 3)).

Parameter names follow timm: patch merging sits at the *start* of the next stage
(``layers.{i+1}.downsample``); official checkpoints, which keep it at the end of stage i, are
renamed on load (:func:`timm_layout`).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from detrkit.errors import UserError
from detrkit.models.backbones.registry import register, resolved_frozen_stages
from detrkit.models.backbones.spec import BackboneSpec
from detrkit.models.backbones.weights import read_state_dict

logger = logging.getLogger(__name__)

PATCH_SIZE = 4  # docs/methods.md#h-detr-architecture: patch 4, ape False, patch_norm True


@dataclass(frozen=True)
class SwinVariant:
    """Width C (stage channels C, 2C, 4C, 8C), blocks and heads per stage, window size, and
    the image size of ImageNet pre-training (informational: no absolute position embedding)."""

    embed_dim: int
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    window_size: int = 7
    pretrain_size: int = 224


# H-DETR's Swin variants (docs/methods.md#h-detr-architecture: tiny, small, large) and the Swin
# paper (base).
SWIN_VARIANTS = {
    "swin_tiny": SwinVariant(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "swin_small": SwinVariant(96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "swin_base": SwinVariant(128, (2, 2, 18, 2), (4, 8, 16, 32)),
    "swin_large": SwinVariant(192, (2, 2, 18, 2), (6, 12, 24, 48)),
    "swin_base_window12": SwinVariant(128, (2, 2, 18, 2), (4, 8, 16, 32), 12, 384),
    "swin_large_window12": SwinVariant(192, (2, 2, 18, 2), (6, 12, 24, 48), 12, 384),
}
_STAGES = ("c2", "c3", "c4", "c5")
_STRIDES = (4, 8, 16, 32)


class SwinBackbone(nn.Module):
    """A Swin-V1 returning the requested stages as NCHW maps, each after its own LayerNorm.

    Args:
        name: a key of ``SWIN_VARIANTS``.
        return_stages: subset of ("c2", "c3", "c4", "c5") in increasing stride; stages after
            the last one requested are not built.
        drop_path_rate: stochastic depth, rising linearly over all blocks to this value
            (H-DETR's ``--drop_path_rate``, 0.2 by default).
        trainable: False freezes every parameter.
        frozen_stages: leading stages kept frozen: 0 = none (H-DETR), k >= 1 = the patch
            embedding and the first k stages (as for the ResNets).
        checkpointing: recompute each block's activations in the backward pass (what H-DETR
            always does inside Swin); only while training.

    Attributes:
        out_channels: stage -> channels (C, 2C, 4C, 8C for c2..c5).
        strides: stage -> stride in input pixels (4, 8, 16, 32).
    """

    def __init__(
        self,
        name: str,
        *,
        return_stages: Sequence[str] = ("c3", "c4", "c5"),
        drop_path_rate: float = 0.2,
        trainable: bool = True,
        frozen_stages: int = 0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        variant = SWIN_VARIANTS[name]
        net = SwinTransformer(
            img_size=variant.pretrain_size,
            patch_size=PATCH_SIZE,
            num_classes=0,
            embed_dim=variant.embed_dim,
            depths=variant.depths,
            num_heads=variant.num_heads,
            window_size=variant.window_size,
            # Fixed window and shift at every stage, whatever the map size (the original).
            always_partition=True,
            strict_img_size=False,
            drop_path_rate=drop_path_rate,
            embed_layer=functools.partial(PatchEmbed, dynamic_img_pad=True),
        )
        indices = sorted(_STAGES.index(stage) for stage in return_stages)
        self.name, self.checkpointing = name, checkpointing
        self.return_stages = tuple(_STAGES[i] for i in indices)
        self.patch_embed = net.patch_embed
        self.layers = net.layers[: indices[-1] + 1]
        channels = [variant.embed_dim * 2**i for i in range(len(_STAGES))]
        for i in indices:
            self.add_module(f"norm{i}", nn.LayerNorm(channels[i]))
        self.out_channels = {_STAGES[i]: channels[i] for i in indices}
        self.strides = {_STAGES[i]: _STRIDES[i] for i in indices}
        frozen = ("patch_embed.",) + tuple(f"layers.{i}." for i in range(frozen_stages))
        for param_name, param in self.named_parameters():
            keep_frozen = frozen_stages > 0 and param_name.startswith(frozen)
            param.requires_grad_(trainable and not keep_frozen)

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        """pixels: [B, 3, H, W] -> {stage: [B, C_s, ceil(H / s), ceil(W / s)]}."""
        x = self.patch_embed(pixels)  # [B, H / 4, W / 4, C], channels last
        outputs = {}
        for index, stage in enumerate(self.layers):
            x = stage.downsample(x)
            for block in stage.blocks:
                x = self._run_block(block, x)
            if _STAGES[index] in self.return_stages:
                normed = getattr(self, f"norm{index}")(x)
                outputs[_STAGES[index]] = normed.permute(0, 3, 1, 2).contiguous()
        return outputs

    def _run_block(self, block: SwinTransformerBlock, x: Tensor) -> Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(swin_block_forward, block, x, use_reentrant=False)
        return swin_block_forward(block, x)

    def load_pretrained(self, path: str | Path) -> None:
        """Load local ImageNet Swin weights: the official layout (microsoft/Swin-Transformer,
        also H-DETR's ``backbone.0.body.*``) or timm's, ``.pth`` or ``.safetensors``.

        The classifier, the final norm and the index/mask buffers are dropped; the extra output
        norms may be absent (they start fresh, as in H-DETR). Anything else that does not fit
        is a ``UserError`` naming the keys.
        """
        state = timm_layout(read_state_dict(Path(path)))
        state = {k: v for k, v in state.items() if _stage_of(k) < len(self.layers)}
        own = self.state_dict()
        missing = [k for k in own if k not in state and not re.match(r"norm\d\.", k)]
        unexpected = [k for k in state if k not in own]
        mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
        if missing or unexpected or mismatched:
            raise UserError(
                f"{path} does not hold weights of model.backbone.name={self.name}: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shape {mismatched[:3]}; "
                f"check model.backbone.name (one of {', '.join(SWIN_VARIANTS)})"
            )
        self.load_state_dict(state, strict=False)  # every key was checked above
        logger.info("loaded backbone weights from %s (%d tensors)", path, len(state))


def swin_block_forward(block: SwinTransformerBlock, x: Tensor) -> Tensor:
    """One Swin block in the official detection order: norm, pad, shift, window attention.

    Args:
        block: a timm block (its norms, attention, MLP, drop paths, window and shift).
        x: [B, H, W, C] for any H, W.

    Returns:
        [B, H, W, C].
    """
    _, height, width, dim = x.shape
    (win_h, win_w), shift = block.window_size, block.shift_size
    # Pad *before* shifting: the padded border is rolled with the map, as in the original.
    padded = F.pad(block.norm1(x), (0, 0, 0, -width % win_w, 0, -height % win_h))
    mask = None
    if any(shift):
        padded = torch.roll(padded, (-shift[0], -shift[1]), dims=(1, 2))
        mask = block.get_attn_mask(padded)  # [num_windows, w*w, w*w]: regions of the padded map
    windows = window_partition(padded, block.window_size).flatten(1, 2)
    windows = block.attn(windows, mask=mask).view(-1, win_h, win_w, dim)
    attended = window_reverse(windows, block.window_size, padded.shape[1], padded.shape[2])
    if any(shift):
        attended = torch.roll(attended, shift, dims=(1, 2))
    x = x + block.drop_path1(attended[:, :height, :width])
    return x + block.drop_path2(block.mlp(block.norm2(x)))


# Keys a backbone never loads: classifier, final norm, buffers rebuilt from the window size.
_DROPPED = re.compile(r"head\..*|norm\.(weight|bias)|.*\.(relative_position_index|attn_mask)")
_PREFIXES = ("module.", "backbone.0.body.", "backbone.")


def timm_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Any Swin state dict (official or timm, bare or inside a detector) in this module's names.

    The official layout is recognised by its ``layers.0.downsample``, which timm never has.
    """
    if any(k.startswith("backbone.0.body.") for k in state):  # a whole DETR-style checkpoint
        state = {k: v for k, v in state.items() if k.startswith("backbone.0.body.")}
    renamed = {_strip_prefixes(k): v for k, v in state.items()}
    official = any(k.startswith("layers.0.downsample.") for k in renamed)
    out = {}
    for key, value in renamed.items():
        if _DROPPED.fullmatch(key):
            continue
        if official:
            key = re.sub(
                r"^layers\.(\d+)\.downsample\.",
                lambda m: f"layers.{int(m[1]) + 1}.downsample.",
                key,
            )
        out[key] = value
    return out


def _strip_prefixes(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def _stage_of(key: str) -> int:
    """The stage index of a ``layers.{i}.*`` key; -1 for anything else."""
    match = re.match(r"layers\.(\d+)\.", key)
    return int(match[1]) if match else -1


@register(*SWIN_VARIANTS)
def build_swin(cfg: BackboneSpec, stages: Sequence[str]) -> SwinBackbone:
    if cfg.dilation:
        raise UserError("model.backbone.dilation (DC5) applies to ResNets, not to Swin")
    return SwinBackbone(
        cfg.name,
        return_stages=stages,
        drop_path_rate=cfg.drop_path_rate,
        trainable=cfg.trainable,
        frozen_stages=resolved_frozen_stages(cfg, family_default=0),
        checkpointing=cfg.checkpointing,
    )
