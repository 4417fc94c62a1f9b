# SPDX-License-Identifier: Apache-2.0
"""Transformer decoder: layers as an ordered list of residual operations, plus named taps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from detrkit.layers.ffn import FFN
from detrkit.layers.residual import AddNorm
from detrkit.models.encoder import run_layer
from detrkit.models.refine import BoxRefiner
from detrkit.structures import DecoderOutput, EncoderMemory, QuerySet

if TYPE_CHECKING:
    from detrkit.models.heads import DetectionHead

DEFAULT_ORDER = ("self_attn", "cross_attn", "ffn")


class DecoderLayer(nn.Module):
    """One decoder layer: residual ops run in ``order``, each followed (or preceded) by its norm.

    Args:
        self_attn: ``SelfAttention``-like module ``(x, pos, attn_mask=...)``.
        cross_attn: module ``(query, query_pos, reference, memory, layer_input=) -> [B, Q, D]``;
            ``layer_input`` is the layer's input, before any op (SMCA predicts its spatial prior
            from it). A cross-attention with a ``predict_reference(content, pos)`` method
            predicts the initial reference points when the queries bring none (SMCA).
        ffn: feed-forward block.
        dim: width D (for the norms).
        dropout: residual dropout.
        order: execution order of "self_attn", "cross_attn", "ffn".
        taps: op names after which the hidden state is recorded.
        pre_norm: normalise before each op instead of after the residual.
    """

    def __init__(
        self,
        *,
        self_attn: nn.Module,
        cross_attn: nn.Module,
        ffn: FFN,
        dim: int,
        dropout: float = 0.1,
        order: Sequence[str] = DEFAULT_ORDER,
        taps: Sequence[str] = (),
        pre_norm: bool = False,
    ) -> None:
        super().__init__()
        if sorted(order) != sorted(DEFAULT_ORDER):
            raise ValueError(f"decoder order must be a permutation of {DEFAULT_ORDER}, got {order}")
        self.self_attn, self.cross_attn, self.ffn = self_attn, cross_attn, ffn
        self.self_attn_norm = AddNorm(dim, dropout, pre_norm=pre_norm)
        self.cross_attn_norm = AddNorm(dim, dropout, pre_norm=pre_norm)
        self.ffn_norm = AddNorm(dim, dropout, pre_norm=pre_norm)
        self.order, self.taps, self.pre_norm = tuple(order), tuple(taps), pre_norm

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor | None,
        reference: Tensor | None,
        memory: EncoderMemory,
        self_attn_mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """query, query_pos: [B, Q, D]; reference: [B, Q, 2|4] or None -> ([B, Q, D], taps)."""
        layer_input = query
        ops = {
            "self_attn": lambda x: self.self_attn(x, query_pos, attn_mask=self_attn_mask),
            "cross_attn": lambda x: self.cross_attn(
                x, query_pos, reference, memory, layer_input=layer_input
            ),
            "ffn": self.ffn,
        }
        taps = {}
        for name in self.order:
            query = getattr(self, f"{name}_norm")(query, ops[name])
            if name in self.taps:
                taps[name] = query
        return query, taps

    def predict_reference(self, content: Tensor, pos: Tensor | None) -> Tensor | None:
        """[B, Q, 2] reference points predicted by the cross-attention from the layer's input
        queries (SMCA's first layer), or None when it predicts none."""
        predict = getattr(self.cross_attn, "predict_reference", None)
        return None if predict is None else predict(content, pos)


class Decoder(nn.Module):
    """Runs the layers, updates references between them, and collects every layer's output.

    Args:
        layers: decoder layers.
        output_norm: LayerNorm applied to each layer's output *for prediction* (DETR), or None.
        refiner: reference update between layers (needs the head's box predictors at forward).
        checkpointing: recompute each layer's activations in the backward pass (training only;
            the refiner and output norm run outside the checkpointed region).
        query_pos_head: recomputes every query's position from its current reference box
            before each layer (``(reference, valid_ratios) -> [B, Q, D]``, DINO's
            ``ref_point_head``); None = the queries' constant ``pos``.
    """

    def __init__(
        self,
        layers: Sequence[DecoderLayer],
        output_norm: nn.Module | None = None,
        refiner: BoxRefiner | None = None,
        checkpointing: bool = False,
        query_pos_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.output_norm = output_norm
        self.refiner = refiner or BoxRefiner()
        self.checkpointing = checkpointing
        self.query_pos_head = query_pos_head

    def forward(
        self, queries: QuerySet, memory: EncoderMemory, head: DetectionHead | None = None
    ) -> DecoderOutput:
        """Decode ``queries`` against ``memory``.

        Args:
            queries: content/pos [B, Q, D], reference [B, Q, 2|4] or None.
            memory: encoder output.
            head: provides the per-layer box predictors used by the refiner.

        Returns:
            hidden [L, B, Q, D], references (L + 1 tensors [B, Q, 2|4]; index k is what layer k's
            prediction is relative to), taps.
        """
        hidden, tap_lists = [], {}
        query, reference = queries.content, queries.reference
        if reference is None:
            # SMCA: the first layer predicts the references every layer then shares.
            reference = self.layers[0].predict_reference(query, queries.pos)
        references = [] if reference is None else [reference]
        checkpointing = self.checkpointing and self.training
        for index, layer in enumerate(self.layers):
            pos = queries.pos
            if self.query_pos_head is not None:
                pos = self.query_pos_head(reference, memory.valid_ratios)
            query, taps = run_layer(
                layer, checkpointing, query, pos, reference, memory, queries.self_attn_mask
            )
            hidden.append(query if self.output_norm is None else self.output_norm(query))
            for name, value in taps.items():
                tap_lists.setdefault(name, []).append(value)
            if reference is not None:
                box_head = head.box_predictor(index) if head is not None else None
                reference, returned = self.refiner.step(box_head, query, reference)
                references.append(returned)
        return DecoderOutput(
            hidden=torch.stack(hidden),
            references=tuple(references) if references else None,
            taps={name: torch.stack(values) for name, values in tap_lists.items()},
        )
