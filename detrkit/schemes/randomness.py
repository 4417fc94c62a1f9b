# SPDX-License-Identifier: Apache-2.0
"""One injectable source for every random decision of the training schemes.

By default the draws come from torch's global generator (seeded by ``train.seed``); a test can
hand a scheme the draws recorded from a reference implementation instead, in call order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class RandomSource:
    """Random draws shaped like a given tensor, from torch's global generator."""

    def rand_like(self, like: Tensor) -> Tensor:
        """Uniform [0, 1) floats of ``like``'s shape, dtype and device."""
        return torch.rand_like(like)

    def randint_like(self, like: Tensor, low: int, high: int) -> Tensor:
        """Integers in [low, high) of ``like``'s shape, dtype and device."""
        return torch.randint_like(like, low, high)

    def randperm(self, n: int, device: torch.device) -> Tensor:
        """A random permutation of range(n), int64."""
        return torch.randperm(n, device=device)


class ReplayedDraws(RandomSource):
    """Hands out recorded draws in order (each checked against the requested shape), so a
    step can be replayed exactly.

    Args:
        draws: the tensors the reference implementation drew, in call order.
    """

    def __init__(self, draws: Iterable[Tensor]) -> None:
        self._draws = list(draws)
        self._next = 0

    def _take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self._next >= len(self._draws):
            raise RuntimeError(f"only {len(self._draws)} recorded draws; another was requested")
        draw = self._draws[self._next]
        self._next += 1
        if tuple(draw.shape) != tuple(shape):
            raise RuntimeError(
                f"recorded draw {self._next - 1} has shape {tuple(draw.shape)}, the step asked "
                f"for {tuple(shape)}: the replay is out of step"
            )
        return draw.to(dtype=dtype, device=device)

    def rand_like(self, like: Tensor) -> Tensor:
        return self._take(like.shape, like.dtype, like.device)

    def randint_like(self, like: Tensor, low: int, high: int) -> Tensor:
        return self._take(like.shape, like.dtype, like.device)

    def randperm(self, n: int, device: torch.device) -> Tensor:
        return self._take(torch.Size([n]), torch.int64, device)

    @property
    def remaining(self) -> int:
        """Recorded draws not handed out yet."""
        return len(self._draws) - self._next
