# SPDX-License-Identifier: Apache-2.0
"""CoaT and CoaT-Lite backbones built from ``timm.models.coat``
(docs/methods.md#mpvit-and-coat-coat).

The detector takes the class-token-free outputs of scales 2-4 (``x2_nocls``, ``x3_nocls``,
``x4_nocls`` in the original: strides 8, 16, 32, no final norm), after the parallel blocks for
CoaT. timm's modules and parameter names are the original's; detrkit runs its own stage loop so
that it can

* take any input size: timm's ``forward_features`` uses the patch embeddings' fixed grid size
  (224 / 4 ...), the original computes it from the input, as this loop does;
* recompute blocks in the backward pass (``checkpointing``; timm's CoaT refuses it);
* keep every parameter in one place: the blocks' shared ``cpe``/``crpe`` modules and the
  parallel blocks' ``mlp3``/``mlp4`` (= ``mlp2``) are used but not registered a second time, so
  nothing is aliased (the original state dicts list those aliases; they are dropped on loading).

No final norms, classification head or ``aggregate`` are built (timm ``return_interm_layers``).
Stochastic depth is one constant rate for every block, as in the original and in timm.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.coat import insert_cls, remove_cls
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from detrkit.errors import UserError
from detrkit.models.backbones.registry import register, resolved_frozen_stages
from detrkit.models.backbones.spec import BackboneSpec
from detrkit.models.backbones.weights import read_state_dict

logger = logging.getLogger(__name__)

# Channels of scales 1-4 (strides 4, 8, 16, 32).
CHANNELS = {
    "coat_lite_tiny": (64, 128, 256, 320),
    "coat_lite_mini": (64, 128, 320, 512),
    "coat_lite_small": (64, 128, 320, 512),
    "coat_lite_medium": (128, 256, 320, 512),
    "coat_tiny": (152, 152, 152, 152),
    "coat_mini": (152, 216, 216, 216),
    "coat_small": (152, 320, 320, 320),
}
_STAGES = ("c2", "c3", "c4", "c5")
_STRIDES = (4, 8, 16, 32)
# Classification-only weights of ImageNet checkpoints (the original drops the same names).
CLASSIFIER_KEYS = re.compile(r"(norm[1-4]|head|aggregate)\.")
# Second names of shared modules in the original / timm state dicts.
ALIAS_KEYS = re.compile(
    r"serial_blocks[1-4]\.\d+\.(cpe|factoratt_crpe\.crpe)\."
    r"|parallel_blocks\.\d+\.(factoratt_crpe[234]\.crpe|mlp[34])\."
)


class CoaTBackbone(nn.Module):
    """A timm CoaT / CoaT-Lite returning the requested stages as a dict.

    Args:
        name: a key of ``CHANNELS`` (timm model name).
        return_stages: subset of ("c2", "c3", "c4", "c5") in increasing stride, ending with "c5"
            (scale 4 always runs: the parallel blocks and the neck's extra level need it).
        trainable: False freezes every parameter.
        frozen_stages: k in 0..4 freezes the first k scales: their patch embedding, class token,
            shared ``cpe``/``crpe`` (which the parallel blocks reuse) and serial blocks. The
            original trains everything (0).
        drop_path_rate: stochastic depth of every block (constant, not increasing with depth).
        checkpointing: recompute each block's activations in the backward pass when training.

    Attributes:
        body: the timm ``CoaT`` (state-dict names as in the original, under ``body.``).
        out_channels: stage -> channels, known before the first forward.
        strides: stage -> stride in input pixels.
    """

    def __init__(
        self,
        name: str,
        *,
        return_stages: Sequence[str] = ("c3", "c4", "c5"),
        trainable: bool = True,
        frozen_stages: int = 0,
        drop_path_rate: float = 0.0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.return_stages = tuple(return_stages)
        if not self.return_stages or self.return_stages[-1] != "c5":
            raise ValueError(f"CoaT returns stages ending with c5, not {self.return_stages}")
        if not 0 <= frozen_stages <= 4:
            raise UserError(
                f"model.backbone.frozen_stages={frozen_stages}: CoaT has 4 stages (use 0..4)"
            )
        self.name, self.checkpointing = name, checkpointing
        self.body = timm.create_model(
            name,
            pretrained=False,
            num_classes=0,
            return_interm_layers=True,
            out_features=["x1_nocls", "x2_nocls", "x3_nocls", "x4_nocls"],
            drop_path_rate=drop_path_rate,
        )
        _unregister_shared_modules(self.body)
        channels = dict(zip(_STAGES, CHANNELS[name]))
        strides = dict(zip(_STAGES, _STRIDES))
        self.out_channels = {s: channels[s] for s in self.return_stages}
        self.strides = {s: strides[s] for s in self.return_stages}
        frozen = tuple(f"{part}{i}" for i in range(1, frozen_stages + 1) for part in _STAGE_PARTS)
        for param_name, param in self.body.named_parameters():
            param.requires_grad_(trainable and param_name.split(".")[0] not in frozen)

    @property
    def has_parallel_blocks(self) -> bool:
        return self.body.parallel_blocks is not None

    def forward(self, pixels: Tensor) -> dict[str, Tensor]:
        """pixels: [B, 3, H, W] -> {stage: [B, C_s, H // stride_s, W // stride_s]}."""
        height, width = pixels.shape[-2:]
        if self.has_parallel_blocks:
            pad = (0, _nesting_pad(width), 0, _nesting_pad(height))
            pixels = F.pad(pixels, pad)
        tokens, sizes = self._serial_stages(pixels)
        if self.has_parallel_blocks:
            for block in self.body.parallel_blocks:
                tokens = self._run(self._parallel_step, block, *tokens, sizes)
        outputs = {}
        for i, stage in enumerate(_STAGES):
            if stage in self.return_stages:
                crop = (height // _STRIDES[i], width // _STRIDES[i])
                feature = _to_map(tokens[i], sizes[i])
                outputs[stage] = feature[..., : crop[0], : crop[1]].contiguous()
        return outputs

    def _serial_stages(self, pixels: Tensor) -> tuple[list[Tensor], list[tuple[int, int]]]:
        """pixels: [B, 3, H, W] -> tokens [B, 1 + h_i * w_i, C_i] of scales 1-4 and (h_i, w_i)."""
        tokens: list[Tensor] = []
        sizes: list[tuple[int, int]] = []
        x = pixels
        for i in range(1, 5):
            if i > 1:
                x = _to_map(tokens[-1], sizes[-1])
            embed = getattr(self.body, f"patch_embed{i}")
            x = embed.proj(x)  # [B, C_i, h_i, w_i]; the grid follows the input, as in the original
            size = (x.shape[-2], x.shape[-1])
            x = insert_cls(
                embed.norm(x.flatten(2).transpose(1, 2)), getattr(self.body, f"cls_token{i}")
            )
            for block in getattr(self.body, f"serial_blocks{i}"):
                x = self._run(block, x, size)
            tokens.append(x)
            sizes.append(size)
        return tokens, sizes

    def _parallel_step(
        self,
        block: nn.Module,
        x1: Tensor,
        x2: Tensor,
        x3: Tensor,
        x4: Tensor,
        sizes: list[tuple[int, int]],
    ) -> list[Tensor]:
        """One parallel block on the tokens [B, 1 + h_i * w_i, C_i] of scales 1-4; the shared
        ``cpe`` of scales 2-4 runs first, as in the original (scale 1 passes through)."""
        x2 = self.body.cpe2(x2, sizes[1])
        x3 = self.body.cpe3(x3, sizes[2])
        x4 = self.body.cpe4(x4, sizes[3])
        return list(block(x1, x2, x3, x4, sizes=sizes))

    def _run(self, function, *args):
        """``function(*args)``; recomputed in the backward pass when checkpointing in training."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    def load_pretrained(self, path: str | Path) -> None:
        """Load local ImageNet CoaT weights (original ``{"model": ...}`` .pth or timm .pth /
        .safetensors: the same names). Classification weights (``norm1``-``norm4``, ``head``,
        ``aggregate``) and the aliases of shared modules are dropped; anything else that does
        not fit is a ``UserError`` naming the keys."""
        state = read_state_dict(Path(path))
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {
            k: v
            for k, v in state.items()
            if not CLASSIFIER_KEYS.match(k) and not ALIAS_KEYS.match(k)
        }
        own = self.body.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
        if missing or unexpected or mismatched:
            raise UserError(
                f"{path} does not hold weights of {self.name}: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, wrong shape {mismatched[:3]}; "
                "check model.backbone.name"
            )
        self.body.load_state_dict(state, strict=True)
        logger.info("loaded backbone weights from %s (%d tensors)", path, len(state))


# Names of a scale's modules in ``CoaT`` (suffixed with the scale, 1-4).
_STAGE_PARTS = ("patch_embed", "cls_token", "cpe", "crpe", "serial_blocks")


def _unregister_shared_modules(body: nn.Module) -> None:
    """Keep the shared modules usable by the blocks but owned (and saved) once, by ``body``."""
    for i in range(1, 5):
        for block in getattr(body, f"serial_blocks{i}"):
            _unregister(block, "cpe")
            _unregister(block.factoratt_crpe, "crpe")
    for block in body.parallel_blocks or ():
        for i in (2, 3, 4):
            _unregister(getattr(block, f"factoratt_crpe{i}"), "crpe")
        _unregister(block, "mlp3")  # the same module as mlp2
        _unregister(block, "mlp4")


def _unregister(owner: nn.Module, name: str) -> None:
    """``owner.name`` stays the same module, as a plain attribute rather than a sub-module."""
    shared = owner._modules.pop(name)
    object.__setattr__(owner, name, shared)


def _to_map(tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """tokens: [B, 1 + h * w, C] with the class token first -> [B, C, h, w] without it."""
    batch, (height, width) = tokens.shape[0], size
    return remove_cls(tokens).reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()


def _nesting_pad(length: int) -> int:
    """Zero padding that makes the scale-2 grid (length // 8) a multiple of 4.

    The parallel blocks add scale 3 and 4 maps upsampled by 2 and 4 to the finer ones, which
    only fits then; the original raises a shape error otherwise. Sizes where it runs are kept.
    """
    return 0 if (length // 8) % 4 == 0 else -length % 32


@register(*CHANNELS)
def build_coat(cfg: BackboneSpec, stages: Sequence[str]) -> CoaTBackbone:
    """``cfg.norm`` does not apply (CoaT has LayerNorms only); DC5 is not available."""
    if cfg.dilation:
        raise UserError(f"model.backbone.dilation (DC5) needs a bottleneck ResNet, not {cfg.name}")
    return CoaTBackbone(
        cfg.name,
        return_stages=stages,
        trainable=cfg.trainable,
        frozen_stages=resolved_frozen_stages(cfg, family_default=0),
        drop_path_rate=cfg.drop_path_rate,
        checkpointing=cfg.checkpointing,
    )
