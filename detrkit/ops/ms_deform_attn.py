# SPDX-License-Identifier: Apache-2.0
"""Multi-scale deformable attention sampling (docs/methods.md#deformable-attention), in pure
PyTorch.

Shared notation (all implementations take the same arguments):

* ``value`` [N, S, M, Dh]: per-head values, S = sum_l H_l * W_l, the levels concatenated in
  order, each flattened row-major.
* ``spatial_shapes`` [L, 2] int64: (H_l, W_l) per level.
* ``level_start`` [L] int64: offset of each level in S (both implementations derive the
  offsets from ``spatial_shapes``; the argument keeps the usual signature).
* ``sampling_locations`` [N, Lq, M, L, P, 2]: (x, y) in [0, 1] of each level's padded map;
  values outside [0, 1] are allowed (off-map neighbours count as zero).
* ``attention_weights`` [N, Lq, M, L, P]: already normalised.
* result [N, Lq, M * Dh], heads concatenated in head order.

Sampling is ``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` with
grid = 2 * loc - 1, i.e. pixel coordinate = loc * W - 0.5 (docs/methods.md#implementation-notes).

:func:`ms_deform_attn_reference` is that formulation verbatim and serves as the oracle; it
materialises every sampled value ([N * M, Dh, Lq, L * P]) before the weighted sum.
:func:`ms_deform_attn_fused` gives the same numbers and gradients without doing so: every sample
becomes four (table row, weight) pairs on a zero-bordered copy of the value table, the bilinear
weight and the attention weight folded into one scalar, and ``F.embedding_bag`` sums the
weighted rows per (batch, query, head). Its backward is written by hand (:class:`FusedSampling`).
Both run in float32 (float64 if an input is) with autocast disabled, like the CUDA kernel.

The fused autograd function lives in ``fused_sampling.py``. ONNX export traces the reference
(``grid_sample`` is a standard ONNX op; the fused path's autograd function is not exportable):
:func:`ms_deform_attn` picks it inside :func:`use_implementation` and whenever
``torch.onnx.is_in_onnx_export()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from detrkit.ops.fused_sampling import PAD, FusedSampling, table_kind, value_grad_kind

__all__ = [
    "fused_path",
    "ms_deform_attn",
    "ms_deform_attn_fused",
    "ms_deform_attn_reference",
    "use_implementation",
]

# Images are processed in chunks of about this many samples (N * Lq * M * L * P): the working
# set of one encoder image at 800 x 1066 (2.3 M samples) stays cache- and allocator-friendly;
# two at once are measurably slower per image on CPU.
SAMPLES_PER_CHUNK = 2**22
IMPLEMENTATIONS = ("fused", "reference")
# What ms_deform_attn runs when not told; use_implementation changes it for a block.
_default_implementation = "fused"


@contextmanager
def use_implementation(implementation: str) -> Iterator[None]:
    """Run every :func:`ms_deform_attn` call in the block with ``implementation`` ("fused" or
    "reference") unless the call names one, e.g. the reference while exporting to ONNX."""
    global _default_implementation
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}: use 'fused' or 'reference'")
    previous, _default_implementation = _default_implementation, implementation
    try:
        yield
    finally:
        _default_implementation = previous


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    level_start: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Per-level ``grid_sample`` formulation (docs/methods.md#deformable-attention) (the oracle).

    Args:
        value: [N, S, M, Dh].
        spatial_shapes: [L, 2] int64 (H_l, W_l), or the same as Python pairs
            (``EncoderMemory.shapes()``; under ``torch.export`` they stay symbolic).
        level_start: [L] int64 (unused, see the module docstring).
        sampling_locations: [N, Lq, M, L, P, 2] (x, y), normalised to [0, 1].
        attention_weights: [N, Lq, M, L, P].

    Returns:
        [N, Lq, M * Dh] in ``value``'s dtype (computed in at least float32).
    """
    return _in_float32(_reference, value, spatial_shapes, sampling_locations, attention_weights)


def _reference(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    locations: Tensor,
    weights: Tensor,
) -> Tensor:
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = locations.shape
    if isinstance(spatial_shapes, Tensor):
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    else:
        shapes = list(spatial_shapes)
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    sampled = []
    for level, (height, width) in enumerate(shapes):
        # [N, H*W, M, Dh] -> [N*M, Dh, H, W]
        level_value = value_levels[level].flatten(2).transpose(1, 2)
        level_value = level_value.reshape(batch * num_heads, head_dim, height, width)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(
                level_value, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )
    # [N*M, Dh, Lq, L*P] weighted by [N*M, 1, Lq, L*P] and summed over the samples.
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, -1)
    out = (stacked * weights).sum(-1).view(batch, num_heads * head_dim, num_queries)
    return out.transpose(1, 2).contiguous()


def ms_deform_attn_fused(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Same result and gradients as :func:`ms_deform_attn_reference`, faster and leaner.

    Differentiable w.r.t. ``value``, ``sampling_locations`` and ``attention_weights`` (first
    order only). Device-agnostic; tuned for CPU. NaN locations read zeros.

    Args:
        value: [N, S, M, Dh].
        spatial_shapes: [L, 2] int64 (H_l, W_l).
        level_start: [L] int64 (unused, see the module docstring).
        sampling_locations: [N, Lq, M, L, P, 2] (x, y), normalised to [0, 1].
        attention_weights: [N, Lq, M, L, P].

    Returns:
        [N, Lq, M * Dh] in ``value``'s dtype (computed in at least float32).
    """
    return _in_float32(_fused, value, spatial_shapes, sampling_locations, attention_weights)


def _fused(value: Tensor, spatial_shapes: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
    """Run :class:`FusedSampling` on batch chunks of at most ~SAMPLES_PER_CHUNK samples."""
    batch, images = value.shape[0], _images_per_chunk(locations)
    if images >= batch:
        return FusedSampling.apply(value, spatial_shapes, locations, weights)
    chunks = zip(value.split(images), locations.split(images), weights.split(images))
    return torch.cat([FusedSampling.apply(v, spatial_shapes, loc, w) for v, loc, w in chunks])


def fused_path(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, needs_value_grad: bool
) -> str:
    """The algorithm :func:`ms_deform_attn_fused` runs for these shapes, in words (benchmarks
    print it): the images per chunk and how the value gradient is summed.

    Args:
        value: [N, S, M, Dh].
        spatial_shapes: [L, 2] (H_l, W_l).
        sampling_locations: [N, Lq, M, L, P, 2].
    """
    batch, _, num_heads, _ = value.shape
    images = min(batch, _images_per_chunk(sampling_locations))
    padded = sum((int(h) + 2 * PAD) * (int(w) + 2 * PAD) for h, w in spatial_shapes.tolist())
    samples = sampling_locations[:images, ..., 0].numel()
    rows = images * padded * num_heads
    parts = [
        f"{table_kind(samples, rows)} table",
        f"{images} image{'s' if images > 1 else ''}/chunk",
    ]
    if needs_value_grad:
        parts.append(f"{value_grad_kind(samples, rows)} value grad")
    return ", ".join(parts)


def _images_per_chunk(locations: Tensor) -> int:
    samples_per_image = locations[:1, ..., 0].numel()
    return max(1, SAMPLES_PER_CHUNK // max(samples_per_image, 1))


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    implementation: str | None = None,
    level_shapes: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """Multi-scale deformable sampling; ``implementation`` is "fused" or "reference" (None: the
    one :func:`use_implementation` set, by default "fused"; always the reference while exporting
    to ONNX).

    Shapes as in :func:`ms_deform_attn_reference`: value [N, S, M, Dh], spatial_shapes [L, 2],
    level_start [L], sampling_locations [N, Lq, M, L, P, 2], attention_weights
    [N, Lq, M, L, P] -> [N, Lq, M * Dh]. ``level_shapes``: ``spatial_shapes`` as Python pairs,
    if known; the reference then loops over them (symbolic sizes stay symbolic).
    """
    if implementation is None:
        exporting = torch.onnx.is_in_onnx_export()
        implementation = "reference" if exporting else _default_implementation
    if implementation == "fused":
        return ms_deform_attn_fused(
            value, spatial_shapes, level_start, sampling_locations, attention_weights
        )
    if implementation == "reference":
        shapes = spatial_shapes if level_shapes is None else level_shapes
        return ms_deform_attn_reference(
            value, shapes, level_start, sampling_locations, attention_weights
        )
    raise ValueError(f"unknown implementation {implementation!r}: use 'fused' or 'reference'")


def _in_float32(
    op: Callable[..., Tensor],
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    locations: Tensor,
    weights: Tensor,
) -> Tensor:
    """Run ``op`` with autocast off, in float64 if any input is, else float32 (as the CUDA
    kernel, which only supports float/double); the result takes ``value``'s dtype."""
    dtype = torch.promote_types(torch.promote_types(value.dtype, locations.dtype), weights.dtype)
    if dtype != torch.float64:
        dtype = torch.float32
    with torch.autocast(value.device.type, enabled=False):
        out = op(value.to(dtype), spatial_shapes, locations.to(dtype), weights.to(dtype))
    return out.to(value.dtype)
