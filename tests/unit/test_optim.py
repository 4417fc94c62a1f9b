# SPDX-License-Identifier: Apache-2.0
"""Tests of regex parameter groups, the coverage check, AdamW and the StepLR schedule."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

from detrkit.config.schema import TrainConfig
from detrkit.engine.optim import (
    DEFAULT_GROUP,
    ParamGroupRule,
    build_lr_scheduler,
    build_optimizer,
    build_param_groups,
    check_param_groups,
    describe_param_groups,
)


class _Toy(nn.Module):
    """Backbone + transformer-ish body + head, with norms and biases everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.encoder = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.sampling_offsets = nn.Linear(4, 2)
        self.class_embed = nn.Linear(4, 3)


def _names(model, group):
    """Parameter names of ``group``."""
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def _by_name(groups):
    return {group["name"]: group for group in groups}


def test_first_matching_rule_wins_and_default_takes_the_rest():
    model = _Toy()
    rules = [
        ParamGroupRule("backbone", lr=1e-5),
        ParamGroupRule(r"norm|bias|\.1\.", weight_decay=0.0, name="no_decay"),
    ]
    groups = _by_name(build_param_groups(model, 1e-4, 1e-4, rules))
    assert list(groups) == [DEFAULT_GROUP, "backbone", "no_decay"]
    # backbone.0.bias also matches the second rule, but the first rule wins.
    assert _names(model, groups["backbone"]) == [
        "backbone.0.bias",
        "backbone.0.weight",
        "backbone.1.bias",
        "backbone.1.weight",
    ]
    assert _names(model, groups["no_decay"]) == [
        "class_embed.bias",
        "encoder.0.bias",
        "encoder.1.bias",
        "encoder.1.weight",
        "sampling_offsets.bias",
    ]
    assert _names(model, groups[DEFAULT_GROUP]) == [
        "class_embed.weight",
        "encoder.0.weight",
        "sampling_offsets.weight",
    ]
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["no_decay"]["lr"] == 1e-4
    assert groups[DEFAULT_GROUP]["weight_decay"] == 1e-4


def test_lr_mult_and_empty_groups_dropped():
    model = _Toy()
    rules = [ParamGroupRule("sampling_offsets", lr_mult=0.1), ParamGroupRule("nothing_matches")]
    groups = _by_name(build_param_groups(model, 2e-4, 1e-4, rules))
    assert set(groups) == {DEFAULT_GROUP, "sampling_offsets"}
    assert groups["sampling_offsets"]["lr"] == pytest.approx(2e-5)


def test_frozen_parameters_are_excluded():
    model = _Toy()
    for param in model.backbone.parameters():
        param.requires_grad_(False)
    groups = build_param_groups(model, 1e-4, 1e-4, [ParamGroupRule("backbone", lr=1e-5)])
    assert [g["name"] for g in groups] == [DEFAULT_GROUP]
    grouped = {id(p) for g in groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


def test_tied_parameter_is_grouped_once():
    model = _Toy()
    model.head = nn.Linear(4, 3)
    model.head.weight = model.class_embed.weight
    groups = build_param_groups(model, 1e-4, 1e-4, [])
    assert len(groups[0]["params"]) == len(list(model.parameters()))


def test_coverage_check_fires_for_missing_parameter():
    model = _Toy()
    groups = build_param_groups(model, 1e-4, 1e-4, [ParamGroupRule("backbone", lr=1e-5)])
    backbone = _by_name(groups)["backbone"]
    backbone["params"] = backbone["params"][1:]  # drop backbone.0.weight
    with pytest.raises(RuntimeError, match=r"in no group: backbone\.0\.weight"):
        check_param_groups(model, groups)


def test_coverage_check_fires_for_duplicate_frozen_and_foreign():
    model = _Toy()
    groups = build_param_groups(model, 1e-4, 1e-4, [])
    duplicated = [*groups, {"name": "dup", "params": [model.class_embed.bias]}]
    with pytest.raises(RuntimeError, match=r"in several groups: class_embed\.bias"):
        check_param_groups(model, duplicated)
    model.class_embed.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"frozen but grouped: class_embed\.weight"):
        check_param_groups(model, groups)
    model.class_embed.weight.requires_grad_(True)
    foreign = [*groups, {"name": "x", "params": [nn.Parameter(torch.ones(1))]}]
    with pytest.raises(RuntimeError, match="not in the model"):
        check_param_groups(model, foreign)


def test_rule_validation():
    with pytest.raises(ValueError, match="either lr or lr_mult"):
        ParamGroupRule("backbone", lr=1e-5, lr_mult=0.1)
    with pytest.raises(re.error):
        ParamGroupRule("backbone(")


def test_describe_param_groups():
    model = _Toy()
    groups = build_param_groups(model, 1e-4, 1e-4, [ParamGroupRule("backbone", lr=1e-5)])
    lines = describe_param_groups(groups).splitlines()
    assert len(lines) == 3
    backbone_line = next(line for line in lines if line.startswith("backbone"))
    num_backbone = sum(p.numel() for p in model.backbone.parameters())
    assert backbone_line.split()[1:3] == ["4", f"{num_backbone:,}"]
    assert "1e-05" in backbone_line


def test_build_optimizer_backbone_lr_is_exact():
    # 7e-5 / 3e-4 is not representable: a multiplier would not give 7e-5 back exactly.
    train_cfg = TrainConfig(lr=3e-4, lr_backbone=7e-5, weight_decay=1e-4)
    model = _Toy()
    optimizer = build_optimizer(
        model, train_cfg, extra_rules=[ParamGroupRule("sampling_offsets", lr_mult=0.1)]
    )
    assert isinstance(optimizer, torch.optim.AdamW)
    groups = _by_name(optimizer.param_groups)
    assert groups["backbone"]["lr"] == train_cfg.lr_backbone
    assert groups[DEFAULT_GROUP]["lr"] == train_cfg.lr
    assert all(g["weight_decay"] == train_cfg.weight_decay for g in optimizer.param_groups)
    assert _names(model, groups["backbone"]) == sorted(
        n for n, _ in model.named_parameters() if n.startswith("backbone")
    )


def test_build_lr_scheduler_steps_per_epoch():
    train_cfg = dataclasses.replace(TrainConfig(), lr=1e-4, lr_backbone=1e-5, lr_drop=3)
    optimizer = build_optimizer(_Toy(), train_cfg)
    scheduler = build_lr_scheduler(optimizer, train_cfg)
    lrs = []
    for _ in range(5):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert lrs[2] == [1e-4, 1e-5]
    assert lrs[3] == pytest.approx([1e-5, 1e-6])
    assert scheduler.step_size == 3 and scheduler.gamma == train_cfg.lr_gamma
