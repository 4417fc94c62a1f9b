# SPDX-License-Identifier: Apache-2.0
"""SMCA's Gaussian-modulated cross-attention (docs/methods.md#smca-detr-single-scale).

Every decoder layer predicts, per query and head, a centre (the first layer's reference point
plus a per-head offset) and optionally per-head scales; the log-prior
``G = -|d| / smooth`` of the (scaled) squared distance ``d`` between that centre and every memory
token is added to the cross-attention logits after the padding mask and before the softmax. With
several memory levels (multi-scale SMCA) the softmax runs within each level and the levels are
mixed with weights the query predicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.layers.attention import MultiHeadAttention
from detrkit.layers.ffn import MLP
from detrkit.structures import EncoderMemory

# Scale values each head predicts per level, by scale mode (the original's type1..type4).
SCALES_PER_HEAD = {"none": 0, "isotropic": 1, "per_axis": 2, "covariance_like": 3}
# The original measures distances in pixels of the stride-32 map; multi-scale SMCA multiplies the
# distances of a level of stride s by s / 32 (0.5, 0.5, 1, 2 for its strides 16, 16, 32, 64).
REFERENCE_STRIDE = 32
_REFERENCE_MLP_LAYERS = 3


def token_grid(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """[height * width, 2] float (x, y) = (column, row) of every token of a map, row-major."""
    rows = torch.arange(height, dtype=torch.float32, device=device)
    cols = torch.arange(width, dtype=torch.float32, device=device)
    grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack((grid_x, grid_y), -1).reshape(-1, 2)


def gaussian_log_prior(
    centres: Tensor,
    scales: Tensor | None,
    grid: Tensor,
    mode: str,
    smooth: float,
    distance_scale: float = 1.0,
) -> Tensor:
    """SMCA's spatial log-prior of one memory level.

    Args:
        centres: [B, Q, H, 2] (x, y) per query and head, in pixels of the level's map.
        scales: [B, Q, H, k] non-negative scales (k = ``SCALES_PER_HEAD[mode]``), or None.
        grid: [S, 2] (x, y) of the level's tokens (``token_grid``).
        mode: "none" (d = Dx + Dy), "isotropic" (s (Dx + Dy)), "per_axis" (sx Dx + sy Dy) or
            "covariance_like" (s1 Dx + s2 Dy + s3 Dx Dy), with Dx, Dy the squared distances.
        smooth: divisor of the log-prior.
        distance_scale: multiplies d (multi-scale SMCA's per-level factor).

    Returns:
        [B, H, Q, S] log-prior, <= 0.
    """
    squared = (centres[:, :, :, None, :] - grid).pow(2)  # [B, Q, H, S, 2]
    if mode == "none":
        distance = squared.sum(-1)
    elif mode == "isotropic":
        distance = squared.sum(-1) * scales
    elif mode == "per_axis":
        distance = (squared * scales[:, :, :, None, :]).sum(-1)
    elif mode == "covariance_like":
        # The third term multiplies the two *squared* distances, as the original does.
        terms = torch.cat((squared, squared.prod(-1, keepdim=True)), -1)
        distance = (terms * scales[:, :, :, None, :]).sum(-1)
    else:
        raise ValueError(f"unknown SMCA scale mode {mode!r}; choose one of {list(SCALES_PER_HEAD)}")
    return (-(distance * distance_scale).abs() / smooth).permute(0, 2, 1, 3)


def level_softmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    dropout_p: float,
    *,
    level_sizes: Sequence[int],
    level_weights: Tensor,
) -> Tensor:
    """Attention whose softmax runs within each memory level, the levels then weighted.

    Args:
        q: [B, H, Q, d]; k, v: [B, H, S, d] with S = sum(level_sizes).
        mask: [B, H|1, Q, S] float added to the logits (-inf on blocked keys), bool (True =
            allowed) or None.
        dropout_p: dropout on the attention weights.
        level_sizes: tokens of each level, in memory order.
        level_weights: [B, Q, L] weights of the levels (each row sums to 1).

    Returns:
        [B, H, Q, d].
    """
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None and mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        logits = logits + mask
    levels = logits.split(list(level_sizes), dim=-1)
    weights = [
        level.softmax(-1) * level_weights[:, None, :, index, None]
        for index, level in enumerate(levels)
    ]
    weights = F.dropout(torch.cat(weights, -1), p=dropout_p, training=dropout_p > 0)
    return weights @ v


class GaussianCrossAttention(nn.Module):
    """Dense cross-attention modulated by SMCA's Gaussian-like spatial prior.

    Args:
        dim: width D.
        num_heads: attention heads H.
        level_strides: stride in input pixels of every memory level, in memory order.
        dropout: dropout on the attention weights.
        scale: scale mode (see ``gaussian_log_prior``).
        smooth: divisor of the log-prior.
        predicts_reference: this layer predicts the reference points (the first layer).
        head_mixture: only the first H // 2 heads are modulated.
        num_plain_queries: the first this many queries are unmodulated and get the reference
            0.5 (logit 0, i.e. no reference in the box head): query mixture.
        first_image_level_weights: use image 0's level weights for every image (the
            multi-scale original's indexing bug).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        level_strides: Sequence[int],
        *,
        dropout: float = 0.0,
        scale: str = "per_axis",
        smooth: float = 8.0,
        predicts_reference: bool = False,
        head_mixture: bool = False,
        num_plain_queries: int = 0,
        first_image_level_weights: bool = False,
    ) -> None:
        super().__init__()
        num_levels, per_head = len(level_strides), SCALES_PER_HEAD[scale]
        self.attn = MultiHeadAttention(dim, num_heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.reference_head = (
            MLP(dim, dim, 2, _REFERENCE_MLP_LAYERS) if predicts_reference else None
        )
        self.offset_head = nn.Linear(dim, num_levels * num_heads * 2)
        self.scale_head = nn.Linear(dim, num_levels * num_heads * per_head) if per_head else None
        self.level_head = nn.Linear(dim, num_levels) if num_levels > 1 else None
        self.num_heads, self.level_strides = num_heads, tuple(level_strides)
        self.scale, self.smooth = scale, smooth
        self.num_modulated_heads = num_heads // 2 if head_mixture else num_heads
        self.num_plain_queries = num_plain_queries
        self.first_image_level_weights = first_image_level_weights
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier weights as the original's transformer-wide init; scales start at exactly 1."""
        heads = [self.offset_head, self.level_head]
        heads += list(self.reference_head.layers) if self.reference_head is not None else []
        for head in heads:
            if head is not None:
                nn.init.xavier_uniform_(head.weight)
        if self.scale_head is not None:
            nn.init.zeros_(self.scale_head.weight)
            nn.init.ones_(self.scale_head.bias)

    def predict_reference(self, content: Tensor, pos: Tensor | None) -> Tensor | None:
        """[B, Q, 2] sigmoid-space (x, y) reference points from the first layer's input, or None
        for the layers that reuse them."""
        if self.reference_head is None:
            return None
        reference = self.reference_head(self._modulation_input(content, pos)).float().sigmoid()
        if self.num_plain_queries:
            plain = reference.new_full(reference[:, : self.num_plain_queries].shape, 0.5)
            reference = torch.cat((plain, reference[:, self.num_plain_queries :]), 1)
        return reference

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor | None,
        reference: Tensor,
        memory: EncoderMemory,
        layer_input: Tensor | None = None,
    ) -> Tensor:
        """Attend the queries to the memory under the spatial prior.

        Args:
            query, query_pos: [B, Q, D].
            reference: [B, Q, 2] sigmoid-space (x, y) of the unpadded image.
            memory: encoder output; needs ``image_sizes``.
            layer_input: [B, Q, D] the decoder layer's input, from which the centre offsets,
                scales and level weights are predicted (``query`` when None).

        Returns:
            [B, Q, D].
        """
        modulation = self._modulation_input(
            query if layer_input is None else layer_input, query_pos
        )
        prior = self.prior(modulation, reference, memory).to(query.dtype)
        q = query if query_pos is None else query + query_pos
        key = memory.tokens + memory.pos
        kernel = None
        if self.level_head is not None:
            kernel = partial(
                level_softmax_attention,
                level_sizes=[height * width for height, width in memory.shapes()],
                level_weights=self._level_weights(modulation),
            )
        return self.attn(
            q,
            key,
            memory.tokens,
            key_padding_mask=memory.padding_mask,
            attn_bias=prior,
            kernel=kernel,
        )

    def prior(self, modulation: Tensor, reference: Tensor, memory: EncoderMemory) -> Tensor:
        """[B, H, Q, S] float32 log-prior over every memory token.

        Args:
            modulation: [B, Q, D] normalised layer input + position (the predictors' input).
            reference: [B, Q, 2] sigmoid-space (x, y).
            memory: gives the level shapes and each image's unpadded size.
        """
        if memory.image_sizes is None:
            raise ValueError("SMCA needs EncoderMemory.image_sizes (each image's unpadded size)")
        if len(memory.spatial_shapes) != len(self.level_strides):
            raise ValueError(
                f"memory has {len(memory.spatial_shapes)} levels, the prior was built for "
                f"strides {self.level_strides}"
            )
        batch, num_queries, _ = modulation.shape
        num_levels, heads = len(self.level_strides), self.num_heads
        offsets = (
            self.offset_head(modulation).float().view(batch, num_queries, num_levels, heads, 2)
        )
        scales = None
        if self.scale_head is not None:
            scales = self.scale_head(modulation).float().pow(2)
            scales = scales.view(batch, num_queries, num_levels, heads, -1)
        # Centres in pixels of each level's map: the reference spans the unpadded image.
        image_wh = memory.image_sizes.flip(-1).float()[:, None, None, :]
        base = reference.float()[:, :, None, :] * image_wh  # [B, Q, 1, 2] in input pixels
        priors = []
        for level, ((height, width), stride) in enumerate(zip(memory.shapes(), self.level_strides)):
            grid = token_grid(height, width, modulation.device)
            centres = base / stride + offsets[:, :, level]
            level_scales = None if scales is None else scales[:, :, level]
            factor = stride / REFERENCE_STRIDE
            priors.append(
                gaussian_log_prior(centres, level_scales, grid, self.scale, self.smooth, factor)
            )
        return self._mix(torch.cat(priors, -1))

    def _mix(self, prior: Tensor) -> Tensor:
        """Zero the prior of unmodulated heads (head mixture) and queries (query mixture)."""
        if self.num_modulated_heads == self.num_heads and not self.num_plain_queries:
            return prior
        heads = torch.arange(self.num_heads, device=prior.device) < self.num_modulated_heads
        queries = torch.arange(prior.shape[2], device=prior.device) >= self.num_plain_queries
        return prior * (heads[:, None, None] & queries[None, :, None]).to(prior.dtype)

    def _level_weights(self, modulation: Tensor) -> Tensor:
        """[B, Q, L] softmax weights of the memory levels."""
        weights = self.level_head(modulation).softmax(-1)
        if self.first_image_level_weights:
            weights = weights[:1].expand_as(weights)
        return weights

    def _modulation_input(self, layer_input: Tensor, pos: Tensor | None) -> Tensor:
        return self.norm(layer_input if pos is None else layer_input + pos)
