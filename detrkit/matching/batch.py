# SPDX-License-Identifier: Apache-2.0
"""Run many assignments with a single device-to-host transfer.

Each assigner computes its cost tensor on the device; the tensors are flattened into one buffer,
moved to the host once, split back and solved there. The originals transferred once per layer
and group, which dominates a step with many decoder layers and query groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from detrkit.structures import Target

Match = tuple[Tensor, Tensor]


class Assigner(Protocol):
    """Two-phase assigner: ``costs`` on the device (no grad, fp32), ``solve`` on the host."""

    def costs(self, logits: Tensor, boxes: Tensor, targets: Sequence[Target]) -> Tensor: ...

    def solve(self, costs: Tensor, targets: Sequence[Target], repeat: int = 1) -> list[Match]: ...


@dataclass
class AssignRequest:
    """One assignment problem: predictions [B, Q, C] / [B, Q, 4] (cxcywh) of one layer and group.

    Attributes:
        target_repeat: the targets count this many times, tiled [g1..gG, g1..gG, ...] (H-DETR);
            their costs are computed once and tiled on the host.
    """

    assigner: Assigner
    logits: Tensor
    boxes: Tensor
    targets: Sequence[Target]
    target_repeat: int = 1


def assign_all(requests: Sequence[AssignRequest]) -> list[list[Match]]:
    """Solve every request; returns, per request, per image (query indices, target indices)."""
    costs = [r.assigner.costs(r.logits.detach(), r.boxes.detach(), r.targets) for r in requests]
    if not costs:
        return []
    flat = torch.cat([c.reshape(-1) for c in costs]).cpu()
    host_costs = flat.split([c.numel() for c in costs])
    return [
        request.assigner.solve(host.view(cost.shape), request.targets, request.target_repeat)
        for request, host, cost in zip(requests, host_costs, costs)
    ]
