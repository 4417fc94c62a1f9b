# SPDX-License-Identifier: Apache-2.0
"""Weight EMA: the average it keeps, its round trip, and which weights inference uses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from detrkit.engine.ema import WeightEMA, inference_weights


def test_ema_follows_the_recurrence_and_round_trips():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.9)
    expected = model[0].weight.detach().clone()
    ema.update(model)  # the first update copies
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update(model)
        expected = 0.9 * expected + 0.1 * model[0].weight.detach()
    torch.testing.assert_close(ema.module[0].weight, expected)
    assert not ema.module[0].weight.requires_grad
    restored = WeightEMA(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.module[0].weight, ema.module[0].weight)
    assert restored.state_dict()["updates"] == 4


def test_inference_prefers_the_ema_weights():
    raw, averaged = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    assert inference_weights(raw, {"ema": {"weights": averaged, "updates": 3}}) == (averaged, "EMA")
    assert inference_weights(raw, {"ema": None}) == (raw, "raw")


def test_decay_outside_the_unit_interval_is_refused():
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(nn.Linear(1, 1), 1.0)
