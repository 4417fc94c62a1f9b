# SPDX-License-Identifier: Apache-2.0
"""The building blocks of MPViT (multi-path vision transformer),
docs/methods.md#mpvit-and-coat-mpvit.

Attribute names follow the official implementation so that its checkpoints load by name
(``conv``/``bn``, ``patch_conv.{dwconv,pwconv,bn}``, ``MHCA_layers``, ``InvRes``, ...). One
deliberate difference: a block does not register its encoder's shared ``cpe``/``crpe`` as its own
children (the official state dicts list them again under every block, as aliases). The encoder
owns them and passes them to each block's ``forward``, so every tensor has exactly one key.

Shapes: B batch, C channels, H x W a feature map, N = H * W tokens, h heads, Ch = C / h.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from timm.layers import DropPath
from torch import Tensor, nn

NormFactory = Callable[[int], nn.Module]
# Depthwise window size -> heads of the convolutional relative position encoding.
CRPE_WINDOWS = {3: 2, 5: 3, 7: 3}


def _init_conv(conv: nn.Conv2d) -> None:
    """N(0, sqrt(2 / fan_out)) with fan_out = k_h * k_w * C_out, as the original."""
    fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))


def _init_norm(norm: nn.Module) -> None:
    if isinstance(norm, nn.BatchNorm2d):
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)


class ConvBN(nn.Module):
    """Official ``Conv2d_BN``: bias-free conv -> BatchNorm -> activation (Hardswish or none).

    [B, C_in, H, W] -> [B, C_out, H / stride, W / stride].
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        norm: NormFactory,
        *,
        kernel_size: int = 1,
        stride: int = 1,
        act: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = norm(out_dim)
        self.act = nn.Hardswish() if act else nn.Identity()
        _init_conv(self.conv)
        _init_norm(self.bn)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class DWConvBN(nn.Module):
    """Official ``DWConv2d_BN``: depthwise k x k -> pointwise 1 x 1 (no biases) -> BN -> Hardswish.

    [B, C, H, W] -> [B, C, H / stride, W / stride].
    """

    def __init__(self, dim: int, norm: NormFactory, *, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        pad = (kernel_size - 1) // 2
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, stride, pad, groups=dim, bias=False)
        self.pwconv = nn.Conv2d(dim, dim, 1, bias=False)
        self.bn = norm(dim)
        self.act = nn.Hardswish()
        for conv in (self.dwconv, self.pwconv):
            _init_conv(conv)
        _init_norm(self.bn)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.pwconv(self.dwconv(x))))


class DWCPatchEmbed(nn.Module):
    """One path's patch embedding (official ``DWCPatchEmbed``): a ``DWConvBN``."""

    def __init__(self, dim: int, norm: NormFactory, *, stride: int) -> None:
        super().__init__()
        self.patch_conv = DWConvBN(dim, norm, kernel_size=3, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.patch_conv(x)


class PatchEmbedStage(nn.Module):
    """Official ``Patch_Embed_stage``: ``num_path`` embeddings applied one after the other.

    [B, C, H, W] -> num_path maps [B, C, H', W'] (path p embeds path p - 1's output); only the
    first embedding downsamples, and only when ``downsample``.
    """

    def __init__(self, dim: int, num_path: int, norm: NormFactory, *, downsample: bool) -> None:
        super().__init__()
        self.patch_embeds = nn.ModuleList(
            DWCPatchEmbed(dim, norm, stride=2 if downsample and i == 0 else 1)
            for i in range(num_path)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for embed in self.patch_embeds:
            x = embed(x)
            outputs.append(x)
        return outputs


class ConvPosEnc(nn.Module):
    """Convolutional position encoding: x + depthwise 3 x 3 conv(x), on tokens [B, N, C]."""

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        batch, _, channels = x.shape
        image = x.transpose(1, 2).reshape(batch, channels, *size)
        return (self.proj(image) + image).flatten(2).transpose(1, 2)


class ConvRelPosEnc(nn.Module):
    """Convolutional relative position encoding: q * depthwise-conv(v), per group of heads.

    The heads are split into windows (``CRPE_WINDOWS``: 2 heads see 3 x 3, 3 heads 5 x 5, 3 heads
    7 x 7). forward(q, v [B, h, N, Ch], size (H, W)) -> [B, h, N, Ch].
    """

    def __init__(self, head_dim: int, num_heads: int, windows: dict[int, int] = CRPE_WINDOWS):
        super().__init__()
        if sum(windows.values()) != num_heads:
            raise ValueError(f"crpe windows {windows} do not cover {num_heads} heads")
        self.splits = [heads * head_dim for heads in windows.values()]
        self.conv_list = nn.ModuleList(
            nn.Conv2d(channels, channels, k, 1, k // 2, groups=channels)
            for k, channels in zip(windows, self.splits)
        )

    def forward(self, q: Tensor, v: Tensor, size: tuple[int, int]) -> Tensor:
        batch, heads, tokens, head_dim = q.shape
        image = v.transpose(-1, -2).reshape(batch, heads * head_dim, *size)
        parts = torch.split(image, self.splits, dim=1)
        conv_v = torch.cat([conv(part) for conv, part in zip(self.conv_list, parts)], dim=1)
        conv_v = conv_v.reshape(batch, heads, head_dim, tokens).transpose(-1, -2)
        return q * conv_v


class FactorAttConvRelPosEnc(nn.Module):
    """Factorised attention plus crpe: proj(scale * Q (softmax_N(K)^T V) + crpe(Q, V)).

    forward(x [B, N, C], size, crpe) -> [B, N, C]; ``crpe`` is the encoder's shared module.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, size: tuple[int, int], crpe: ConvRelPosEnc) -> Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, h, N, Ch]
        context = k.softmax(dim=2).transpose(-1, -2) @ v  # [B, h, Ch, Ch]
        out = self.scale * (q @ context) + crpe(q, v, size)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on [B, N, C]."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MHCABlock(nn.Module):
    """x <- cpe(x); x <- x + FactorAtt(LN(x)); x <- x + MLP(LN(x)) on tokens [B, N, C]."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.factoratt_crpe = FactorAttConvRelPosEnc(dim, num_heads)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)

    def forward(
        self, x: Tensor, size: tuple[int, int], cpe: ConvPosEnc, crpe: ConvRelPosEnc
    ) -> Tensor:
        x = cpe(x, size)
        x = x + self.drop_path(self.factoratt_crpe(self.norm1(x), size, crpe))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class MHCAEncoder(nn.Module):
    """One path's transformer: ``MHCA_layers`` sharing one ``cpe`` and one ``crpe``.

    [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, drop_paths: Sequence[float]
    ) -> None:
        super().__init__()
        self.cpe = ConvPosEnc(dim)
        self.crpe = ConvRelPosEnc(dim // num_heads, num_heads)
        self.MHCA_layers = nn.ModuleList(  # noqa: N815  (the official name)
            MHCABlock(dim, num_heads, mlp_ratio, rate) for rate in drop_paths
        )

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for layer in self.MHCA_layers:
            tokens = layer(tokens, (height, width), self.cpe, self.crpe)
        return tokens.transpose(1, 2).reshape(batch, channels, height, width)


class InvResBlock(nn.Module):
    """Official ``ResBlock`` (the local path): x + conv2(act(norm(dwconv(conv1(x))))).

    conv1 is a 1 x 1 ConvBN + Hardswish, dwconv a bias-free depthwise 3 x 3, conv2 a 1 x 1 ConvBN.
    [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, dim: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, dim, norm, act=True)
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, bias=False)
        self.norm = norm(dim)
        self.act = nn.Hardswish()
        self.conv2 = ConvBN(dim, dim, norm)
        _init_conv(self.dwconv)
        _init_norm(self.norm)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.act(self.norm(self.dwconv(self.conv1(x)))))


class MHCAStage(nn.Module):
    """Official ``MHCA_stage``: a local path (``InvRes`` on path 0's input) and one transformer
    per path, concatenated and aggregated by a 1 x 1 ConvBN + Hardswish to ``out_dim``.

    forward(num_path maps [B, C, H, W]) -> [B, out_dim, H, W].
    """

    def __init__(
        self,
        dim: int,
        out_dim: int,
        *,
        num_path: int,
        num_heads: int,
        mlp_ratio: float,
        drop_paths: Sequence[float],
        norm: NormFactory,
    ) -> None:
        super().__init__()
        self.mhca_blks = nn.ModuleList(
            MHCAEncoder(dim, num_heads, mlp_ratio, drop_paths) for _ in range(num_path)
        )
        self.InvRes = InvResBlock(dim, norm)  # noqa: N815  (the official name)
        self.aggregate = ConvBN(dim * (num_path + 1), out_dim, norm, act=True)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        outputs = [self.InvRes(inputs[0])]
        outputs += [encoder(x) for encoder, x in zip(self.mhca_blks, inputs)]
        return self.aggregate(torch.cat(outputs, dim=1))


def init_transformer_weights(module: nn.Module) -> None:
    """Linear: trunc_normal(0.02), bias 0; LayerNorm: (1, 0) (apply with ``Module.apply``).

    The original truncates at +-2 (absolute, i.e. 100 sigma), so a clamped normal is the same
    distribution, and much faster on the CPU than ``nn.init.trunc_normal_``'s inverse-erf sampling.
    """
    if isinstance(module, nn.Linear):
        with torch.no_grad():
            nn.init.normal_(module.weight, std=0.02).clamp_(-2.0, 2.0)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
