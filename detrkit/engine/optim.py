# SPDX-License-Identifier: Apache-2.0
"""Optimiser parameter groups from ordered regex rules, AdamW and the StepLR schedule.

Each trainable parameter takes the *first* :class:`ParamGroupRule` whose pattern ``re.search``-es
its name, or the default group when none does. A check then verifies that every trainable
parameter is in exactly one group, so a rule can never silently drop or duplicate parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from detrkit.config.schema import TrainConfig

__all__ = [
    "DEFAULT_GROUP",
    "ParamGroupRule",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "check_param_groups",
    "describe_param_groups",
]

DEFAULT_GROUP = "default"
# DETR (docs/methods.md#detr-training): parameters whose name contains "backbone" train with
# lr_backbone.
BACKBONE_PATTERN = "backbone"
# Deformable DETR trains these at 0.1x the lr (``--lr_linear_proj_names``).
LINEAR_PROJ_PATTERN = r"sampling_offsets|reference_points"


@dataclass(frozen=True)
class ParamGroupRule:
    """One parameter-group rule.

    Attributes:
        pattern: regex, ``re.search``-ed against the parameter name.
        lr_mult: the group's lr is ``base_lr * lr_mult`` (ignored when ``lr`` is given).
        weight_decay: the group's weight decay; None keeps the default.
        lr: absolute learning rate, used as is (no float multiplier that could round).
        name: group name for logs and checkpoints; defaults to ``pattern``.
    """

    pattern: str
    lr_mult: float = 1.0
    weight_decay: float | None = None
    lr: float | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        """Reject an invalid regex and an ambiguous ``lr`` + ``lr_mult`` pair."""
        re.compile(self.pattern)
        if self.lr is not None and self.lr_mult != 1.0:
            raise ValueError(f"rule {self.pattern!r}: give either lr or lr_mult, not both")

    @property
    def group_name(self) -> str:
        """Name of the group this rule creates."""
        return self.name if self.name is not None else self.pattern

    def group_lr(self, base_lr: float) -> float:
        """Learning rate of the group this rule creates."""
        return self.lr if self.lr is not None else base_lr * self.lr_mult


def build_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    rules: Sequence[ParamGroupRule],
) -> list[dict]:
    """Split the trainable parameters of ``model`` into optimiser groups.

    Args:
        model: the module; parameters with ``requires_grad=False`` are left out.
        base_lr: lr of the default group and base of ``lr_mult``.
        weight_decay: weight decay of the default group and of rules without their own.
        rules: ordered rules; the first match wins.

    Returns:
        Non-empty groups, default group first then in rule order; each a dict with ``name``,
        ``params``, ``lr`` and ``weight_decay``, as ``torch.optim`` expects.

    Raises:
        RuntimeError: a trainable parameter is in no group or in several.
    """
    compiled = [re.compile(rule.pattern) for rule in rules]
    buckets: list[list[nn.Parameter]] = [[] for _ in range(len(rules) + 1)]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        index = next((i for i, rx in enumerate(compiled) if rx.search(name)), len(rules))
        buckets[index].append(param)
    groups = [
        {"name": DEFAULT_GROUP, "params": buckets[-1], "lr": base_lr, "weight_decay": weight_decay}
    ]
    for rule, params in zip(rules, buckets[:-1], strict=True):
        wd = weight_decay if rule.weight_decay is None else rule.weight_decay
        groups.append(
            {
                "name": rule.group_name,
                "params": params,
                "lr": rule.group_lr(base_lr),
                "weight_decay": wd,
            }
        )
    groups = [group for group in groups if group["params"]]
    check_param_groups(model, groups)
    return groups


def check_param_groups(model: nn.Module, groups: Iterable[dict]) -> None:
    """Raise RuntimeError unless every trainable parameter of ``model`` is in exactly one group.

    Also rejects frozen parameters and parameters that do not belong to ``model``.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    seen: dict[int, int] = {}
    for group in groups:
        for param in group["params"]:
            seen[id(param)] = seen.get(id(param), 0) + 1
    problems = {
        "in no group": [names[i] for i in trainable if i not in seen],
        "in several groups": [names.get(i, "?") for i, count in seen.items() if count > 1],
        "frozen but grouped": [names[i] for i in seen if i in names and i not in trainable],
        "not in the model": [f"tensor {i:#x}" for i in seen if i not in names],
    }
    found = {what: sorted(who) for what, who in problems.items() if who}
    if found:
        detail = "; ".join(f"{what}: {', '.join(who[:10])}" for what, who in found.items())
        raise RuntimeError(f"parameter groups do not cover the model exactly once ({detail})")


def describe_param_groups(groups: Iterable[dict]) -> str:
    """Table of the groups for the log: name, #tensors, #parameters, lr and weight decay."""
    lines = [f"{'group':<20} {'tensors':>8} {'params':>12} {'lr':>10} {'wd':>10}"]
    for group in groups:
        num_params = sum(p.numel() for p in group["params"])
        lines.append(
            f"{group.get('name', '?'):<20} {len(group['params']):>8} {num_params:>12,} "
            f"{group['lr']:>10.3g} {group['weight_decay']:>10.3g}"
        )
    return "\n".join(lines)


def build_optimizer(
    model: nn.Module,
    train_cfg: TrainConfig,
    extra_rules: Sequence[ParamGroupRule] = (),
) -> torch.optim.AdamW:
    """AdamW over ``model`` with DETR's groups (docs/methods.md#detr-training).

    The backbone rule comes first, so every backbone parameter trains at exactly
    ``train_cfg.lr_backbone``; ``extra_rules`` (e.g. ``sampling_offsets`` at 0.1x) then apply
    to the remaining parameters. Freezing the backbone is the model builder's job
    (``BackboneConfig.trainable``); with ``lr_backbone == 0`` the backbone simply does not move.
    """
    backbone = ParamGroupRule(BACKBONE_PATTERN, lr=train_cfg.lr_backbone, name="backbone")
    if train_cfg.lr_linear_proj_mult != 1.0:
        linear_proj = ParamGroupRule(
            LINEAR_PROJ_PATTERN, lr_mult=train_cfg.lr_linear_proj_mult, name="linear_proj"
        )
        extra_rules = (linear_proj, *extra_rules)
    groups = build_param_groups(
        model, train_cfg.lr, train_cfg.weight_decay, [backbone, *extra_rules]
    )
    return make_adamw(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def make_adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused (single-kernel) update where the device supports it.

    The fused step is ~3x faster than the per-tensor loop on the CPU and computes the same update;
    devices without a fused kernel fall back to the default implementation.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, train_cfg: TrainConfig
) -> torch.optim.lr_scheduler.StepLR:
    """StepLR multiplying every group's lr by ``lr_gamma`` at epoch ``lr_drop``; step per epoch."""
    return torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=train_cfg.lr_drop, gamma=train_cfg.lr_gamma
    )
