# SPDX-License-Identifier: Apache-2.0
"""Exponential moving average of the weights (torch's ``AveragedModel``), saved and restored."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightEMA:
    """EMA of a model's parameters and buffers, updated after every optimiser step.

    Args:
        model: the trained model (not its DDP wrapper).
        decay: weight of the old average per update, e.g. 0.9998.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.averaged = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True
        )
        self.averaged.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The averaged model, to evaluate or export."""
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def state_dict(self) -> dict[str, Any]:
        return {
            "weights": self.module.state_dict(),
            "updates": int(self.averaged.n_averaged.item()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"], strict=True)
        self.averaged.n_averaged.fill_(int(state["updates"]))


def inference_weights(model_state: dict, training_state: Any) -> tuple[dict, str]:
    """The weights a checkpoint is used with: its EMA when it has one, else the raw weights.

    ``training_state`` is a ``TrainingState`` (its ``ema`` attribute), a mapping with an "ema"
    entry, or None (a weights file).
    """
    if isinstance(training_state, Mapping):
        ema = training_state.get("ema")
    else:
        ema = getattr(training_state, "ema", None)
    if ema:
        return ema["weights"], "EMA"
    return model_state, "raw"
