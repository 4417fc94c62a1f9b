# SPDX-License-Identifier: Apache-2.0
"""The fused deformable-sampling autograd function behind ``ms_deform_attn_fused``.

Every sample becomes four (table row, weight) pairs on a zero-bordered copy of the value table,
the bilinear weight and the attention weight folded into one scalar; ``F.embedding_bag`` sums the
weighted rows per (batch, query, head). The backward is written by hand: weight and location
gradients from the dot products of the output gradient with each neighbour row, the value gradient
by summing samples per neighbour pixel. Notation as in ``ms_deform_attn.py``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FusedSampling", "table_kind", "value_grad_kind"]

_INT32_MAX = 2**31 - 1
# Devices on which d loss / d folded weight comes from torch.sparse.sampled_addmm.
_SAMPLED_ADDMM_DEVICES = ("cpu",)

# A sample's pixel coordinate is clamped to [-PAD, size]: its two neighbours along an axis then
# lie in [-PAD, size + 1], which a zero border of PAD pixels on each side covers. Every sample
# with no neighbour on the map (coordinate < -1 or >= size) reads only zeros and gets zero
# gradients, exactly grid_sample's zero padding, without any per-neighbour mask.
PAD = 2


class _PaddedLayout:
    """Row arithmetic of the zero-bordered value table [N, S_pad, M, Dh] (flattened to rows).

    Level l occupies (H_l + 2 PAD) x (W_l + 2 PAD) padded pixels, row-major, levels in order;
    the row of (n, padded pixel p, head m) is (n * S_pad + p) * M + m.
    """

    def __init__(self, spatial_shapes: Tensor, batch: int, num_heads: int) -> None:
        self.shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        self.padded_shapes = [(h + 2 * PAD, w + 2 * PAD) for h, w in self.shapes]
        self.padded_sizes = [h * w for h, w in self.padded_shapes]
        self.num_padded = sum(self.padded_sizes)
        self.num_tokens = sum(h * w for h, w in self.shapes)
        self.batch, self.num_heads = batch, num_heads
        self.num_rows = batch * self.num_padded * num_heads

    def pad(self, value: Tensor) -> Tensor:
        """[N, S, M, Dh] -> [N, S_pad, M, Dh] with zero borders."""
        batch, _, num_heads, head_dim = value.shape
        padded = value.new_zeros(batch, self.num_padded, num_heads, head_dim)
        parts = zip(value.split([h * w for h, w in self.shapes], 1), self._inner(padded))
        for part, target in parts:
            target.copy_(part.reshape(target.shape))
        return padded

    def _inner(self, padded: Tensor) -> list[Tensor]:
        """Views [N, H, W, M, Dh] of the inner (unpadded) pixels of every level."""
        views = []
        for part, (h, w) in zip(padded.split(self.padded_sizes, 1), self.shapes):
            part = part.view(part.shape[0], h + 2 * PAD, w + 2 * PAD, *part.shape[2:])
            views.append(part[:, PAD : PAD + h, PAD : PAD + w])
        return views

    def padded_corner_rows(self, low_rows: Tensor) -> Tensor:
        """[N, Lq, M, L, P] padded low rows -> [N, Lq, M, 4, L, P] rows of the four neighbours
        in the padded table, ordered (y, x), (y, x + 1), (y + 1, x), (y + 1, x + 1)."""
        num_points = low_rows.shape[-1]
        widths = torch.tensor([w for _, w in self.padded_shapes], device=low_rows.device)
        line = (widths.view(-1, 1).expand(-1, num_points) * self.num_heads).to(low_rows.dtype)
        rows = low_rows.new_empty(*low_rows.shape[:3], 4, *low_rows.shape[3:])
        rows[:, :, :, 0] = low_rows
        torch.add(low_rows, self.num_heads, out=rows[:, :, :, 1])
        torch.add(low_rows, line, out=rows[:, :, :, 2])
        torch.add(rows[:, :, :, 2], self.num_heads, out=rows[:, :, :, 3])
        return rows

    def low_rows(self, low: Tensor, index_dtype: torch.dtype) -> Tensor:
        """Padded-table row of every sample's low neighbour (the value gradient is summed in
        this index space, where off-map neighbours land in the border).

        Args:
            low: [2 (x, y), N, Lq, M, L, P] integer-valued low neighbour, in [-PAD, size].

        Returns:
            [N, Lq, M, L, P].
        """
        device, num_points = low.device, low.shape[-1]
        # Per-level constants are expanded to [L, P] so that broadcasting them runs over long
        # contiguous rows (a size-P inner loop is several times slower).
        widths = torch.tensor([w for _, w in self.padded_shapes], device=device)
        widths = widths.view(-1, 1).expand(-1, num_points)
        starts = torch.tensor([0] + self.padded_sizes[:-1], device=device).cumsum(0).view(-1, 1)
        num_heads = self.num_heads
        base = torch.arange(self.batch, device=device).view(-1, 1, 1, 1, 1) * self.num_padded
        base = (base + starts + PAD * widths + PAD) * num_heads  # low pixel is shifted by PAD
        base = base + torch.arange(num_heads, device=device).view(-1, 1, 1)
        low = low.to(index_dtype)
        low_rows = low[1] * (widths * num_heads).to(index_dtype)
        return low_rows.add_(low[0], alpha=num_heads).add_(base.to(index_dtype))

    def corner_rows(self, low: Tensor, index_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Rows of every sample's four neighbours in the *unpadded* table [N * S * M, Dh] (the
        value tensor itself), each clamped onto its map, and which neighbours are on the map.

        Args:
            low: [2 (x, y), N, Lq, M, L, P] integer-valued low neighbour, in [-PAD, size].

        Returns:
            rows [N, Lq, M, 4, L, P] and on_map [2 (x, y), 2 (low, high), N, Lq, M, L, P]
            bool; neighbours ordered (y, x), (y, x + 1), (y + 1, x), (y + 1, x + 1).
        """
        device, num_points = low.device, low.shape[-1]
        sizes = torch.tensor([[w, h] for h, w in self.shapes], device=device).t()
        sizes = sizes.view(2, 1, 1, 1, -1, 1).expand(-1, -1, -1, -1, -1, num_points)
        neighbours = torch.stack((low, low + 1), 1)  # [2 (x, y), 2 (low, high), ...]
        last = (sizes - 1).to(low).unsqueeze(1)
        on_map = (neighbours >= 0) & (neighbours <= last)
        clamped = torch.minimum(neighbours.clamp_(min=0), last).to(index_dtype)
        starts = torch.tensor([0] + [h * w for h, w in self.shapes[:-1]], device=device)
        starts = starts.cumsum(0).view(-1, 1)
        num_heads = self.num_heads
        base = torch.arange(self.batch, device=device).view(-1, 1, 1, 1, 1) * self.num_tokens
        base = (base + starts) * num_heads + torch.arange(num_heads, device=device).view(-1, 1, 1)
        line = (sizes[0] * num_heads).to(index_dtype)
        columns = clamped[0] * num_heads  # [2 (x, x + 1), ...]
        lines = clamped[1] * line + base.to(index_dtype)  # [2 (y, y + 1), ...]
        rows = lines.new_empty(*lines.shape[1:4], 4, *lines.shape[4:])
        for corner in range(4):
            dy, dx = divmod(corner, 2)
            torch.add(lines[dy], columns[dx], out=rows[:, :, :, corner])
        return rows, on_map


def _bilinear(spatial_shapes: Tensor, locations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Planar pixel geometry of every sample.

    Args:
        spatial_shapes: [L, 2] (H, W).
        locations: [N, Lq, M, L, P, 2] (x, y) in [0, 1].

    Returns:
        low [2 (x, y), N, Lq, M, L, P]: integer-valued low neighbour (as float), in
        [-PAD, size]; frac [2, N, Lq, M, L, P]: the fractional part; sizes
        (W, H) expanded to [2, 1, 1, 1, L, P].
    """
    num_points = locations.shape[-2]
    sizes = spatial_shapes.t().flip(0).to(locations).view(2, 1, 1, 1, -1, 1)
    sizes = sizes.expand(-1, -1, -1, -1, -1, num_points).contiguous()
    pixel = locations.new_empty(2, *locations.shape[:-1])
    # Exactly grid_sample's arithmetic (grid = 2 * loc - 1, pixel = (grid + 1) * size / 2 - 0.5)
    # so that floor() agrees with it even when a coordinate lands on an integer.
    torch.mul(locations.permute(5, 0, 1, 2, 3, 4), 2, out=pixel)
    pixel.sub_(1).add_(1).mul_(sizes / 2).sub_(0.5)
    # fmax/fmin also send NaN coordinates to the border, where they read zeros.
    torch.fmax(pixel, pixel.new_tensor(-float(PAD)), out=pixel)
    torch.fmin(pixel, sizes, out=pixel)
    low = pixel.floor()
    return low, pixel.sub_(low), sizes


def table_kind(num_samples: int, num_padded_rows: int) -> str:
    """What the forward gathers from: "padded", a zero-bordered copy of the values (no
    per-neighbour masks; the copy is cheap next to the samples, encoder), or "direct", the value
    tensor itself with off-map neighbours masked (no copy of a large table that few samples
    read, decoder)."""
    return "padded" if num_samples >= num_padded_rows else "direct"


def value_grad_kind(num_samples: int, num_padded_rows: int) -> str:
    """How the value gradient is summed: "dense" (every padded row, sliced into place) when
    there are at least as many samples as rows (encoder), else "sparse" (occupied rows only)."""
    return "dense" if num_samples >= num_padded_rows else "sparse"


class FusedSampling(torch.autograd.Function):
    """Gather-and-sum forward on a zero-bordered value table; hand-written backward.

    Forward: each sample's four neighbours are rows of the padded table, with folded weights
    c = a * wy * wx (a: attention weight; wy, wx: 1-d bilinear weights); one ``embedding_bag``
    sums the 4 L P weighted rows of each (batch, query, head). Tensors are kept planar ([2, ...]
    or [..., 4, L, P]) so that every elementwise op runs over long contiguous rows.

    Backward, with G = d loss / d output per (batch, query, head):

    * d c_k = <G, v_k>, a sampled dense-dense product (see :func:`_corner_grads`); the
      attention weight and the fractional coordinates get theirs by the product rule (the floor
      is piecewise constant, as in ``grid_sample``'s backward).
    * d value = sum over samples of c_k G added to row k. Rather than scattering 4 rows per
      sample, the samples are sorted by the row of their low neighbour and one ``embedding_bag``
      per neighbour type (00, 01, 10, 11) sums c G per low row; each sum is then added at its
      neighbour's pixel, by slicing when there are more samples than rows (encoder) and with
      ``index_add_`` on the occupied rows only otherwise (decoder). Sorting the n samples is
      much cheaper than ``embedding_bag``'s own backward, which sorts and scatters all 4 n rows.
    """

    @staticmethod
    def forward(ctx, value, spatial_shapes, locations, weights):
        weights = weights.contiguous()
        batch, _, num_heads, head_dim = value.shape
        num_queries = locations.shape[1]
        layout = _PaddedLayout(spatial_shapes, batch, num_heads)
        # int32 indices (rows, sample numbers, CSR offsets) make the gathers markedly faster.
        fits = max(layout.num_rows, 4 * weights.numel()) < _INT32_MAX
        index_dtype = torch.int32 if fits else torch.int64
        low, frac, sizes = _bilinear(spatial_shapes, locations)
        low_rows = layout.low_rows(low, index_dtype)
        corner_weights = torch.empty(
            *weights.shape[:3], 4, *weights.shape[3:], dtype=value.dtype, device=value.device
        )
        if table_kind(low_rows.numel(), layout.num_rows) == "padded":
            table = layout.pad(value).view(-1, head_dim)
            rows, on_map = layout.padded_corner_rows(low_rows), None
        else:
            table = value.contiguous().view(-1, head_dim)
            rows, on_map = layout.corner_rows(low, index_dtype)
        _corner_weights(weights, frac, out=corner_weights.unbind(3), on_map=on_map)
        entries = (batch * num_queries * num_heads, 4 * locations.shape[3] * locations.shape[4])
        rows, corner_weights = rows.view(entries), corner_weights.view(entries)
        out = F.embedding_bag(rows, table, per_sample_weights=corner_weights, mode="sum")
        # The padded table's corner rows are four additions away from the low rows: rebuilt in
        # the backward pass instead of kept (4 indices per sample, for every layer).
        kept_rows = rows if on_map is not None else None
        ctx.save_for_backward(table, weights, frac, sizes, kept_rows, low_rows, on_map)
        ctx.entries = entries
        ctx.layout = layout
        return out.view(batch, num_queries, num_heads * head_dim)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        table, weights, frac, sizes, rows, low_rows, on_map = ctx.saved_tensors
        layout = ctx.layout
        if rows is None:
            rows = layout.padded_corner_rows(low_rows).view(ctx.entries)
        grad = grad_out.reshape(rows.shape[0], table.shape[-1]).contiguous()
        grad_value = grad_locations = grad_weights = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_corners = _corner_grads(grad, table, rows).view(
                *weights.shape[:3], 4, *weights.shape[3:]
            )
            if on_map is not None:
                # Off-map neighbours read zeros in grid_sample: no gradient flows through them.
                grad_corners.mul_(_corner_mask(on_map))
            grad_locations, grad_weights = _sample_grads(grad_corners, weights, frac, sizes)
        if ctx.needs_input_grad[0]:
            grad_value = _value_grad(grad, weights, frac, low_rows, layout)
        return grad_value, None, grad_locations, grad_weights


def _corner_mask(on_map: Tensor) -> Tensor:
    """[2 (x, y), 2, N, Lq, M, L, P] bool -> [N, Lq, M, 4, L, P] bool, corners 00, 01, 10, 11."""
    (x0, x1), (y0, y1) = on_map
    return torch.stack((y0 & x0, y0 & x1, y1 & x0, y1 & x1), 3)


def _corner_grads(grad: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """<grad[b], table[rows[b, k]]> for every bag b and entry k: [B, K].

    Args:
        grad: [B, Dh].
        table: [R, Dh].
        rows: [B, K] int32 or int64.
    """
    if grad.device.type in _SAMPLED_ADDMM_DEVICES:
        # A sampled dense-dense product: its CPU kernel is about twice as fast as
        # embedding_bag's per-sample-weight backward (one BLAS dot call per entry).
        num_bags, num_entries = rows.shape
        crow = torch.arange(
            0, num_bags * num_entries + 1, max(num_entries, 1), dtype=rows.dtype, device=rows.device
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            pattern = torch.sparse_csr_tensor(
                crow,
                rows.view(-1),
                grad.new_zeros(rows.numel()),
                size=(num_bags, table.shape[0]),
                check_invariants=False,
            )
        return torch.sparse.sampled_addmm(pattern, grad, table.t()).values().view(rows.shape)
    with torch.enable_grad():
        leaf = grad.new_zeros(rows.shape, requires_grad=True)
        out = F.embedding_bag(rows, table, per_sample_weights=leaf, mode="sum")
    return torch.autograd.grad(out, leaf, grad)[0]


def _sample_grads(
    grad_corners: Tensor, weights: Tensor, frac: Tensor, sizes: Tensor
) -> tuple[Tensor, Tensor]:
    """Product rule through c_ij = a * wy_i * wx_j, wy = (1 - fy, fy), wx = (1 - fx, fx).

    Args:
        grad_corners: [N, Lq, M, 4 (ij = 00, 01, 10, 11), L, P].
        weights: a, [N, Lq, M, L, P].
        frac: (fx, fy), [2, N, Lq, M, L, P].
        sizes: (W, H), [2, 1, 1, 1, L, P].

    Returns:
        d locations [N, Lq, M, L, P, 2] and d weights [N, Lq, M, L, P].
    """
    g00, g01, g10, g11 = grad_corners.unbind(3)
    fx, fy = frac
    step0, step1 = g01 - g00, g11 - g10  # along x, in the low / high row
    row0 = torch.addcmul(g00, fx, step0)  # sum_j G_0j wx_j
    row1 = torch.addcmul(g10, fx, step1)
    # d/d fx = sum_i wy_i (G_i1 - G_i0); d/d fy = row1 - row0; d/d a = sum_i wy_i row_i.
    grad_x = torch.addcmul(step0, fy, step1.sub_(step0))
    grad_y = row1.sub_(row0)
    grad_weights = torch.addcmul(row0, fy, grad_y)
    # d pixel / d loc = size (W for x, H for y).
    grad_locations = weights.new_empty(*weights.shape, 2)
    for axis, grad_axis in enumerate((grad_x, grad_y)):
        torch.mul(grad_axis.mul_(weights), sizes[axis], out=grad_locations[..., axis])
    return grad_locations, grad_weights


def _corner_weights(
    weights: Tensor,
    frac: Tensor,
    out: tuple[Tensor, ...] | None = None,
    on_map: Tensor | None = None,
) -> list[Tensor]:
    """The four folded weights a * wy * wx of every sample (neighbours 00, 01, 10, 11).

    Args:
        weights: a, [...].
        frac: (fx, fy), [2, ...].
        out: optional four tensors [...] to write into.
        on_map: optional [2 (x, y), 2 (low, high), ...] bool; off-map neighbours get weight 0.
    """
    fx, fy = frac
    wx0, wx1 = 1 - fx, fx
    weight_y0, weight_y1 = (1 - fy).mul_(weights), fy * weights
    if on_map is not None:
        (x0, x1), (y0, y1) = on_map
        wx0, wx1 = wx0.mul_(x0), wx1 * x1
        weight_y0, weight_y1 = weight_y0.mul_(y0), weight_y1.mul_(y1)
    pairs = [(weight_y0, wx0), (weight_y0, wx1), (weight_y1, wx0), (weight_y1, wx1)]
    if out is None:
        return [wy * wx for wy, wx in pairs]
    return [torch.mul(wy, wx, out=target) for (wy, wx), target in zip(pairs, out)]


def _value_grad(
    grad: Tensor, weights: Tensor, frac: Tensor, low_rows: Tensor, layout: _PaddedLayout
) -> Tensor:
    """d value [N, S, M, Dh] (see :class:`FusedSampling`).

    Args:
        grad: [B, Dh], B = N * Lq * M.
        weights: [N, Lq, M, L, P].
        frac: [2, N, Lq, M, L, P].
        low_rows: [N, Lq, M, L, P].
    """
    num_levels, num_points = low_rows.shape[-2:]
    samples_per_bag = num_levels * num_points
    sorted_rows, order = torch.sort(low_rows.reshape(-1), stable=True)
    order = order.to(low_rows.dtype)
    bags = torch.div(order, samples_per_bag, rounding_mode="floor")
    # One gather of packed (a, fx, fy) triples: the gather is bound by cache misses on the
    # scattered order, so one 12-byte read per sample beats three 4-byte ones, and
    # recomputing the four corner weights from them beats gathering four.
    packed = torch.stack((weights.reshape(-1), frac[0].reshape(-1), frac[1].reshape(-1)), 1)
    sorted_a, sorted_fx, sorted_fy = packed.index_select(0, order).unbind(1)
    sorted_weights = _corner_weights(sorted_a, torch.stack((sorted_fx, sorted_fy)))
    if value_grad_kind(low_rows.numel(), layout.num_rows) == "dense":
        return _dense_value_grad(grad, bags, sorted_rows, sorted_weights, layout)
    levels = torch.div(order % samples_per_bag, num_points, rounding_mode="floor")
    return _sparse_value_grad(grad, bags, levels, sorted_rows, sorted_weights, layout)


def _dense_value_grad(
    grad: Tensor,
    bags: Tensor,
    sorted_rows: Tensor,
    sorted_weights: list[Tensor],
    layout: _PaddedLayout,
) -> Tensor:
    """Many samples per row (encoder): sums for every padded row, shifted by slicing."""
    counts = torch.bincount(sorted_rows, minlength=layout.num_rows)
    offsets = (counts.cumsum(0) - counts).to(bags.dtype)
    head_dim = grad.shape[-1]
    grad_value = grad.new_zeros(layout.batch, layout.num_tokens, layout.num_heads, head_dim)
    value_levels = grad_value.split([h * w for h, w in layout.shapes], 1)
    for corner, corner_weights in enumerate(sorted_weights):
        summed = F.embedding_bag(bags, grad, offsets, per_sample_weights=corner_weights, mode="sum")
        summed = summed.view(layout.batch, layout.num_padded, layout.num_heads, head_dim)
        dy, dx = divmod(corner, 2)
        parts = zip(value_levels, summed.split(layout.padded_sizes, 1), layout.shapes)
        for target, part, (height, width) in parts:
            # Pixel (y, x) is neighbour (dy, dx) of padded low pixel (y + PAD - dy, x + PAD - dx).
            part = part.view(layout.batch, height + 2 * PAD, width + 2 * PAD, *part.shape[2:])
            part = part[:, PAD - dy : PAD - dy + height, PAD - dx : PAD - dx + width]
            target.view(part.shape).add_(part)
    return grad_value


def _sparse_value_grad(
    grad: Tensor,
    bags: Tensor,
    levels: Tensor,
    sorted_rows: Tensor,
    sorted_weights: list[Tensor],
    layout: _PaddedLayout,
) -> Tensor:
    """Few samples per row (decoder): sums for occupied rows only, added at their pixels."""
    unique_rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
    offsets = (counts.cumsum(0) - counts).to(bags.dtype)
    # Decode the low pixel of each occupied row: row = (n * S_pad + start_l + y' W'_l + x') M + m.
    level = levels.index_select(0, offsets).long()
    device, num_heads = grad.device, layout.num_heads
    shapes = torch.tensor(layout.shapes, device=device).index_select(0, level)
    height, width = shapes.unbind(-1)
    padded_starts = torch.tensor([0] + layout.padded_sizes[:-1], device=device).cumsum(0)
    starts = torch.tensor([0] + [h * w for h, w in layout.shapes[:-1]], device=device).cumsum(0)
    head = unique_rows.long() % num_heads
    pixel = torch.div(unique_rows.long(), num_heads, rounding_mode="floor")
    image = torch.div(pixel, layout.num_padded, rounding_mode="floor")
    pixel = pixel - image * layout.num_padded - padded_starts.index_select(0, level)
    low_y = torch.div(pixel, width + 2 * PAD, rounding_mode="floor") - PAD
    low_x = pixel - (low_y + PAD) * (width + 2 * PAD) - PAD
    base = image * layout.num_tokens + starts.index_select(0, level)
    # One spare row at the end collects the neighbours that fall off the map.
    num_rows = layout.batch * layout.num_tokens * num_heads
    grad_value = grad.new_zeros(num_rows + 1, grad.shape[-1])
    for corner, corner_weights in enumerate(sorted_weights):
        summed = F.embedding_bag(bags, grad, offsets, per_sample_weights=corner_weights, mode="sum")
        dy, dx = divmod(corner, 2)
        y, x = low_y + dy, low_x + dx
        inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
        targets = torch.where(inside, (base + y * width + x) * num_heads + head, num_rows)
        grad_value.index_add_(0, targets, summed)
    return grad_value[:num_rows].view(layout.batch, layout.num_tokens, num_heads, -1)
