# SPDX-License-Identifier: Apache-2.0
"""Multi-head attention with separate q/k/v projections, on ``scaled_dot_product_attention``.

Separate projections (rather than ``nn.MultiheadAttention``'s stacked ``in_proj``) keep every
weight addressable by name; converters split official ``in_proj_weight`` rows (q, k, v).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from detrkit.structures import EncoderMemory

# (q, k, v [B, H, L, d], attn_mask [B|1, H|1, Lq, Lk] bool (True = allowed) or float (added to
# the logits) or None, dropout_p) -> [B, H, Lq, d]: the signature of scaled_dot_product_attention.
AttentionKernel = Callable[[Tensor, Tensor, Tensor, "Tensor | None", float], Tensor]


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over ``num_heads`` heads.

    Args:
        dim: model width D (divisible by ``num_heads``).
        num_heads: number of heads.
        dropout: dropout on the attention probabilities (training only).
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        attn_bias: Tensor | None = None,
        kernel: AttentionKernel | None = None,
    ) -> Tensor:
        """Attend ``query`` to ``key``/``value``.

        Args:
            query: [B, Lq, D].
            key: [B, Lk, D].
            value: [B, Lk, D].
            key_padding_mask: [B, Lk] bool, True = ignore that key.
            attn_mask: [Lq, Lk] or per image [B, Lq, Lk] bool, True = blocked.
            attn_bias: [B, H, Lq, Lk] float added to the scaled logits of the allowed keys
                before the softmax (SMCA's spatial prior), or None.
            kernel: the attention computation; None = ``scaled_dot_product_attention``.

        Returns:
            [B, Lq, D].
        """
        q = self._split_heads(self.q_proj(query))
        k = self._split_heads(self.k_proj(key))
        v = self._split_heads(self.v_proj(value))
        allowed = None
        if key_padding_mask is not None:
            allowed = ~key_padding_mask[:, None, None, :]
        if attn_mask is not None:
            blocked = attn_mask[None, None] if attn_mask.dim() == 2 else attn_mask[:, None]
            allowed = ~blocked if allowed is None else allowed & ~blocked
        mask = allowed
        if attn_bias is not None:
            # -inf on blocked keys first, the bias after: a finite bias cannot unblock a key.
            mask = attn_bias if allowed is None else attn_bias.masked_fill(~allowed, float("-inf"))
        dropout = self.dropout if self.training else 0.0
        kernel = kernel or F.scaled_dot_product_attention
        out = kernel(q, k, v, mask, dropout)
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class SelfAttention(nn.Module):
    """Self-attention whose queries and keys carry a positional embedding (values do not)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, num_heads, dropout)

    def forward(
        self,
        x: Tensor,
        pos: Tensor | None,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """x, pos: [B, L, D]; key_padding_mask: [B, L]; attn_mask: [L, L] or [B, L, L]
        (True = blocked)."""
        q = x if pos is None else x + pos
        return self.attn(q, q, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask)


class CrossAttention(nn.Module):
    """Global cross-attention from queries to encoder memory (DETR's decoder)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, num_heads, dropout)

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor | None,
        reference: Tensor | None,
        memory: EncoderMemory,
        layer_input: Tensor | None = None,
    ) -> Tensor:
        """query, query_pos: [B, Q, D] -> [B, Q, D]; ``reference`` and ``layer_input`` (the
        decoder layer's input) are unused (global attention)."""
        q = query if query_pos is None else query + query_pos
        return self.attn(
            q, memory.tokens + memory.pos, memory.tokens, key_padding_mask=memory.padding_mask
        )
