# SPDX-License-Identifier: Apache-2.0
"""Feed-forward blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class FFN(nn.Module):
    """linear2(dropout(act(linear1(x)))); the residual and norm belong to the enclosing layer."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.activation = _ACTIVATIONS[activation]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., D] -> [..., D]."""
        hidden = self.linear1(x)
        if self.training and self.activation is F.relu and 0 < self.dropout.p < 1:
            return self.linear2(_ReluDropout.apply(hidden, self.dropout.p))
        return self.linear2(self.dropout(self.activation(hidden)))


class _ReluDropout(torch.autograd.Function):
    """dropout(relu(x)) in training that keeps only its output for backward.

    The unfused pair keeps relu's output, dropout's mask and dropout's output (which linear2
    keeps anyway): two of the three widest activations of a transformer layer. An output element
    is positive exactly where the element was kept and x > 0, the only places with a gradient,
    so the output alone gives the backward pass: grad * (out > 0) / (1 - p). The forward calls
    ``F.dropout`` itself, so it draws the same random mask as ``nn.Dropout`` would.

    Shapes: x [...] -> [...].
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: float) -> Tensor:
        out = F.dropout(F.relu(x), p, training=True)
        ctx.save_for_backward(out)
        ctx.scale = 1.0 / (1.0 - p)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (out,) = ctx.saved_tensors
        return grad.mul(ctx.scale).masked_fill_(out <= 0, 0), None


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in_dim] -> [..., out_dim]."""
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x
