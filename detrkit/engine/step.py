# SPDX-License-Identifier: Apache-2.0
"""One optimiser step: the only code that scales, unscales, clips and steps."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from detrkit.engine.precision import Precision
from detrkit.engine.state import LoopState
from detrkit.errors import UserError
from detrkit.losses.criterion import SetCriterion
from detrkit.structures import ImageBatch, Target

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one step produced (loss values averaged over micro-batches, unweighted terms).

    Attributes:
        loss: the weighted total on the host (it is read for the finite check anyway).
        terms: every unweighted loss term (``{group}/{term}/d{layer}``), detached and still on
            the device: the logger reads them once per log interval, so the step itself costs no
            host transfer per term.
        grad_norm: the global gradient norm before clipping, on the host.
        finite: False when the loss or the gradients were non-finite in a way loss scaling
            cannot explain; such steps count towards ``train.max_nonfinite_steps``.
        updated: whether the optimiser stepped (fp16 also skips steps whose scaled gradients
            overflowed, and lowers the scale; that is routine, not divergence).
    """

    loss: float
    terms: dict[str, Tensor]
    grad_norm: float
    finite: bool
    updated: bool = True


def _no_sync(model: nn.Module, last: bool):
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    criterion: SetCriterion,
    micro_batches: Sequence[tuple[ImageBatch, list[Target]]],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    max_grad_norm: float | None,
    all_finite: Callable[[bool], bool] = lambda finite: finite,
) -> StepResult:
    """Forward/backward every micro-batch, then clip and step unless anything is non-finite.

    ``all_finite`` combines this process's verdict with the other ranks' (every rank must skip
    the same steps, or their weights drift apart).
    """
    optimizer.zero_grad(set_to_none=True)
    total: Tensor | None = None
    terms: dict[str, Tensor] = {}
    for index, (images, targets) in enumerate(micro_batches):
        with _no_sync(model, index == len(micro_batches) - 1):
            with precision.autocast():
                output = model(images, targets)
            losses = criterion(output, targets)  # fp32, outside autocast
            loss = losses.total / len(micro_batches)
            (precision.scaler.scale(loss) if precision.scaler else loss).backward()
        # Detached device sums, no .item(): a host sync per term per micro-batch stalls the GPU.
        total = _add(total, loss.detach())
        for name, value in losses.terms.items():
            terms[name] = _add(terms.get(name), value.detach() / len(micro_batches))
    if precision.scaler:
        precision.scaler.unscale_(optimizer)
    norm = _grad_norm(model, max_grad_norm, total.device)
    # The step's one device->host transfer: deciding whether to step needs both on the host.
    loss_value, grad_norm = torch.stack([total.float(), norm.float()]).tolist()
    grads_finite = math.isfinite(grad_norm)
    if precision.scaler:
        # An overflow at a scale >= 1 is the scaler's business; below 1 the gradients are
        # non-finite at any scale.
        grads_finite = grads_finite or precision.scaler.get_scale() >= 1.0
    finite = all_finite(math.isfinite(loss_value) and grads_finite)
    updated = finite and math.isfinite(grad_norm)
    if precision.scaler:
        if finite:
            precision.scaler.step(optimizer)  # skips the update itself on inf/nan gradients
        precision.scaler.update()
    elif updated:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, terms, grad_norm, finite, updated)


def _add(accumulated: Tensor | None, value: Tensor) -> Tensor:
    return value if accumulated is None else accumulated + value


def _grad_norm(model: nn.Module, max_norm: float | None, device: torch.device) -> Tensor:
    """The global gradient norm (clipping to ``max_norm`` if set), left on the device."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=device)
    if max_norm:
        norm: Tensor = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    return norm.to(device)


class TrainingDiverged(UserError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def check_finite(
    result: StepResult, loop: LoopState, image_ids: Sequence[int], max_streak: int
) -> None:
    """Count consecutive non-finite steps in ``loop`` (each is logged with its images; the
    update was already skipped on every process) and stop the run after ``max_streak``."""
    if result.finite:
        loop.nonfinite_streak = 0
        return
    loop.nonfinite_streak += 1
    logger.warning(
        "step %d: non-finite loss %.4g or grad norm %.4g; step skipped (images %s)",
        loop.step,
        result.loss,
        result.grad_norm,
        list(image_ids),
    )
    if loop.nonfinite_streak >= max_streak:
        raise TrainingDiverged(
            f"{loop.nonfinite_streak} consecutive non-finite steps (last images "
            f"{list(image_ids)}); lower train.lr, check the data with the images named above, or "
            "use --precision fp32"
        )
