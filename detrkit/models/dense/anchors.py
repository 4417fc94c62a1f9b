# SPDX-License-Identifier: Apache-2.0
"""Anchor grids with mmdetection 2.x ``AnchorGenerator`` semantics.

Every level l has ``A = len(ratios) * len(scales)`` base anchors centred on
``center_offset * base_size`` (xyxy pixels); the grid places them at ``(x * stride, y * stride)``
for every feature location. Order: levels one after another, locations row-major (y, then x),
then the A anchors of a location, ratio-major / scale-minor (``scale_major=True``: index
``ratio_index * len(scales) + scale_index``). The float32 arithmetic follows mmdetection's so
that the anchors (and hence their IoUs) are bitwise the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AnchorGenerator:
    """Square-stride anchor generator.

    Attributes:
        strides: pixel stride of every level.
        ratios: height / width ratios.
        scales: anchor sizes relative to the base size; None = the octave scales
            ``octave_base_scale * 2 ** (i / scales_per_octave)``, i < scales_per_octave.
        octave_base_scale, scales_per_octave: used when ``scales`` is None.
        base_sizes: base size of every level; None = the level's stride.
        center_offset: anchor centre as a fraction of the base size (0 = the location's corner).
        scale_major: True = ratio-major, scale-minor order (mmdetection's default).
    """

    strides: tuple[int, ...]
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    scales: tuple[float, ...] | None = None
    octave_base_scale: float | None = 4
    scales_per_octave: int | None = 3
    base_sizes: tuple[int, ...] | None = None
    center_offset: float = 0.0
    scale_major: bool = True

    def __post_init__(self) -> None:
        if self.scales is None and (self.octave_base_scale is None or not self.scales_per_octave):
            raise ValueError("give either scales or octave_base_scale and scales_per_octave")
        if self.base_sizes is not None and len(self.base_sizes) != len(self.strides):
            raise ValueError("base_sizes needs one entry per stride")

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> int:
        """Anchors per feature location (the same on every level)."""
        return len(self.ratios) * len(self.scale_values())

    def scale_values(self) -> tuple[float, ...]:
        if self.scales is not None:
            return tuple(self.scales)
        # float64 products rounded once to float32, as mmdetection's numpy -> torch.Tensor.
        octave = [2 ** (i / self.scales_per_octave) for i in range(self.scales_per_octave)]
        return tuple(s * self.octave_base_scale for s in octave)

    def base_anchors(self, level: int) -> Tensor:
        """[A, 4] float32 xyxy anchors of ``level`` around its centre."""
        size = self.strides[level] if self.base_sizes is None else self.base_sizes[level]
        scales = torch.tensor(self.scale_values(), dtype=torch.float32)
        ratios = torch.tensor(self.ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        if self.scale_major:
            ws = (size * w_ratios[:, None] * scales[None, :]).view(-1)
            hs = (size * h_ratios[:, None] * scales[None, :]).view(-1)
        else:
            ws = (size * scales[:, None] * w_ratios[None, :]).view(-1)
            hs = (size * scales[:, None] * h_ratios[None, :]).view(-1)
        cx, cy = self.center_offset * size, self.center_offset * size
        return torch.stack((cx - 0.5 * ws, cy - 0.5 * hs, cx + 0.5 * ws, cy + 0.5 * hs), dim=-1)

    def grid(
        self,
        sizes: Sequence[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> list[Tensor]:
        """Anchors of every level: ``sizes[l] = (H_l, W_l)`` -> [H_l * W_l * A, 4] xyxy pixels."""
        if len(sizes) != self.num_levels:
            raise ValueError(f"{len(sizes)} feature maps for {self.num_levels} anchor levels")
        grids = []
        for level, (height, width) in enumerate(sizes):
            base = self.base_anchors(level).to(device=device, dtype=dtype)
            stride = self.strides[level]
            shift_x = torch.arange(0, width, device=device).to(dtype) * stride
            shift_y = torch.arange(0, height, device=device).to(dtype) * stride
            xx = shift_x.repeat(len(shift_y))
            yy = shift_y.view(-1, 1).repeat(1, len(shift_x)).view(-1)
            shifts = torch.stack((xx, yy, xx, yy), dim=-1)
            grids.append((base[None, :, :] + shifts[:, None, :]).view(-1, 4))
        return grids

    def valid_flags(
        self,
        sizes: Sequence[tuple[int, int]],
        valid_size: tuple[int, int],
        device: torch.device | str = "cpu",
    ) -> list[Tensor]:
        """[H_l * W_l * A] bool per level: True where the location lies inside the image's
        ``valid_size = (h, w)`` pixels (mmdetection: its ``pad_shape``), i.e. in the first
        ``ceil(h / stride)`` rows and ``ceil(w / stride)`` columns."""
        flags = []
        height, width = valid_size
        for level, (feat_h, feat_w) in enumerate(sizes):
            stride = self.strides[level]
            valid_h = min(math.ceil(height / stride), feat_h)
            valid_w = min(math.ceil(width / stride), feat_w)
            valid_x = torch.zeros(feat_w, dtype=torch.bool, device=device)
            valid_y = torch.zeros(feat_h, dtype=torch.bool, device=device)
            valid_x[:valid_w] = True
            valid_y[:valid_h] = True
            valid = valid_y[:, None] & valid_x[None, :]
            flags.append(valid.reshape(-1, 1).expand(-1, self.num_base_anchors).reshape(-1))
        return flags
