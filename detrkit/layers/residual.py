# SPDX-License-Identifier: Apache-2.0
"""The residual connection + LayerNorm shared by every transformer sub-block."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


class AddNorm(nn.LayerNorm):
    """A LayerNorm that owns the residual connection around one sub-block.

    Post-norm (DETR's default): ``norm(x + dropout(sublayer(x)))``.
    Pre-norm: ``x + dropout(sublayer(norm(x)))`` (the enclosing model adds a final norm).

    It *is* the LayerNorm (a subclass) rather than a wrapper holding one, so its parameters keep
    the ``<name>.weight`` / ``<name>.bias`` keys the converters and recorded checkpoints use; the
    dropout has no state.

    Args:
        dim: width D of the normalised last axis.
        dropout: residual dropout on the sub-block's output (training only).
        pre_norm: normalise before the sub-block instead of after the sum.

    Shapes:
        x: [..., D]; ``sublayer`` maps [..., D] -> [..., D]; the result is [..., D].
    """

    def __init__(self, dim: int, dropout: float = 0.0, *, pre_norm: bool = False) -> None:
        super().__init__(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """x: [..., D] -> x with ``sublayer``'s output added, normalised before or after."""
        if self.pre_norm:
            return x + self.dropout(sublayer(self.normalize(x)))
        return self.add(x, sublayer(x))

    def add(self, x: Tensor, update: Tensor) -> Tensor:
        """Post-norm with an update computed elsewhere: x, update [..., D] -> norm(x + drop(u)).

        For sub-blocks whose input is not ``x`` alone (SMCA's encoder mixes every level).
        """
        if self.pre_norm:
            # A pre-norm update must be computed from normalize(x); only forward() can do that.
            raise ValueError("AddNorm.add is post-norm only; call it with a sublayer instead")
        return self.normalize(x + self.dropout(update))

    def normalize(self, x: Tensor) -> Tensor:
        """The plain LayerNorm: [..., D] -> [..., D]."""
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pre_norm={self.pre_norm}"
