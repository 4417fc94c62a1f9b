# SPDX-License-Identifier: Apache-2.0
"""Loss terms averaged over a log interval, read from the device once per interval."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from detrkit.engine.progress import format_duration
from detrkit.engine.step import StepResult


@dataclass(frozen=True)
class IntervalStats:
    """Means over the finite steps of one log interval (and over ranks, when distributed).

    Attributes:
        steps: optimiser steps in the interval.
        skipped: non-finite steps among them, left out of the means.
        loss: mean weighted total loss; None when every step was skipped.
        grad_norm: mean gradient norm before clipping; None when every step was skipped.
        seconds: mean wall-clock seconds per step.
        terms: every unweighted loss term (``{group}/{term}/d{layer}``) -> its mean.
    """

    steps: int
    skipped: int
    loss: float | None
    grad_norm: float | None
    seconds: float
    terms: dict[str, float] = field(default_factory=dict)

    def main_terms(self) -> dict[str, float]:
        """The ``main`` group's terms at its last decoder layer, by term name (the console's
        short view; metrics.jsonl has them all)."""
        main = {}  # (layer, term) -> value
        for name, value in self.terms.items():
            group, term, layer = (name.split("/") + ["", "", ""])[:3]
            if group == "main" and layer[:1] == "d" and layer[1:].isdigit():
                main[(int(layer[1:]), term)] = value
        last = max((layer for layer, _ in main), default=None)
        return {term: value for (layer, term), value in main.items() if layer == last}

    def console_line(
        self, *, epoch: int, epochs: int, step: int, total_steps: int, lr: float, wall: float
    ) -> str:
        """``epoch 1/2  step 4/16  loss 9.81 (cls 1.61 l1 0.49 giou 0.91)  lr ...  ETA``.

        Args:
            wall: wall-clock seconds per step over the interval (data loading included).
        """
        main = " ".join(f"{k} {v:.3f}" for k, v in self.main_terms().items())
        loss = "n/a" if self.loss is None else f"{self.loss:.4f}"
        parts = [
            f"epoch {epoch}/{epochs}",
            f"step {step}/{total_steps}",
            f"loss {loss}" + (f" ({main})" if main else ""),
            f"lr {lr:.2e}",
            f"{wall:.2f} s/step",
            f"ETA {format_duration(wall * max(0, total_steps - step))}",
        ]
        if self.skipped:
            parts.append(f"{self.skipped} non-finite steps skipped")
        return "  ".join(parts)


class LossMeter:
    """Sums step results on the device; ``flush`` averages them with one host transfer.

    ``add`` only queues device additions (no sync), so the hot loop never waits on the GPU for
    logging; ``flush`` stacks the sums, averages them over ranks with one collective and reads
    them back with one ``tolist()``.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.steps = self.skipped = 0
        self._loss = self._grad_norm = self._seconds = 0.0
        self._sums: dict[str, Tensor] = {}

    def add(self, result: StepResult, seconds: float) -> None:
        """Account one step; a non-finite one only counts (it would poison every mean)."""
        self.steps += 1
        self._seconds += seconds
        if not result.finite:
            self.skipped += 1
            return
        self._loss += result.loss
        self._grad_norm += result.grad_norm
        for name, value in result.terms.items():
            known = self._sums.get(name)
            self._sums[name] = value if known is None else known + value

    def flush(
        self,
        reduce_mean: Callable[[Tensor], Tensor] = lambda t: t,
        device: torch.device | None = None,
    ) -> IntervalStats:
        """The interval's means, then start a new interval.

        Args:
            reduce_mean: the mean over ranks of a tensor (identity on one process); every rank
                must call ``flush`` at the same step, as it is one collective.
            device: where the stacked values live when there are no terms (the collective's
                device); defaults to the terms' device, else the CPU.
        """
        counted = self.steps - self.skipped
        seconds = self._seconds / max(self.steps, 1)
        stats = IntervalStats(self.steps, self.skipped, None, None, seconds)
        if counted:
            names = list(self._sums)
            host = torch.tensor([self._loss, self._grad_norm], dtype=torch.float32)
            stacked = _stack(list(self._sums.values()), host, device) / counted
            *terms, loss, grad_norm = reduce_mean(stacked).tolist()  # the one host transfer
            stats = IntervalStats(
                self.steps, self.skipped, loss, grad_norm, seconds, dict(zip(names, terms))
            )
        self._reset()
        return stats


def _stack(sums: list[Tensor], host: Tensor, device: torch.device | None) -> Tensor:
    """Term sums, then the host-side loss and grad-norm sums, as one vector on the terms'
    device (``device`` when there are none)."""
    if not sums:
        return host if device is None else host.to(device)
    # A host-to-device copy, not a sync: the device stays busy.
    return torch.cat([torch.stack(sums).float().reshape(-1), host.to(sums[0].device)])
