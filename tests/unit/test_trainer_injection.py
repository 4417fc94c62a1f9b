# SPDX-License-Identifier: Apache-2.0
"""Trainer(model=, criterion=, train_set=, val_set=, optimizer=) uses the parts it is given."""

from __future__ import annotations

import torch
from torch import nn

from detrkit.config.build import build_criterion, build_model
from detrkit.config.load import load_config
from detrkit.data.synth import CATEGORY_IDS
from detrkit.engine.data import open_split
from detrkit.engine.trainer import Trainer
from tests.conftest import TINY_RUN_OVERRIDES

TINY = [
    *TINY_RUN_OVERRIDES,
    "train.epochs=1",
    "train.max_steps=2",
    "train.eval_every=0",
    "train.tensorboard=false",
]


class CountingCriterion(nn.Module):
    """Delegates to a real criterion and counts its calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, output, targets):
        self.calls += 1
        return self.inner(output, targets)


def test_injected_parts_are_the_ones_trained(synthetic_coco, tmp_path):
    cfg = load_config("detr_tiny", [f"data.root={synthetic_coco}", *TINY])
    train_set = open_split(cfg.data, cfg.data.train_split, train=True)
    val_set = open_split(cfg.data, cfg.data.val_split, train=False, label_map=train_set.label_map)
    classes = train_set.label_map.num_classes
    model = build_model(cfg.model, classes)
    criterion = CountingCriterion(build_criterion(cfg.model, classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    trainer = Trainer(
        cfg,
        tmp_path / "run",
        device="cpu",
        model=model,
        criterion=criterion,
        train_set=train_set,
        val_set=val_set,
        optimizer=optimizer,
    )
    assert trainer.model is model and trainer.criterion is criterion
    assert trainer.optimizer is optimizer and trainer.scheduler.optimizer is optimizer
    assert trainer.train_set is train_set and trainer.val_set is val_set
    trainer.fit()

    assert trainer.loop.step == 2
    assert criterion.calls == 2  # one micro-batch per step (grad_accum_steps=1)
    assert optimizer.state_dict()["param_groups"][0]["lr"] == 1e-3  # SGD, not the config's
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the injected model was not updated"


def test_parts_not_given_are_built_from_the_config(synthetic_coco, tmp_path):
    cfg = load_config("detr_tiny", [f"data.root={synthetic_coco}", *TINY])
    model = build_model(cfg.model, len(CATEGORY_IDS))
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", model=model)
    assert trainer.model is model
    # The config's AdamW, over the given model's parameters.
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised and optimised <= {id(p) for p in model.parameters()}
    assert trainer.train_set.label_map.num_classes == len(CATEGORY_IDS)
