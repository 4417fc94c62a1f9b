# SPDX-License-Identifier: Apache-2.0
"""``SetCriterion``: one generic loop over prediction groups x decoder layers, each group
supervised as its ``Supervision`` says, plus the dense losses of training-only heads."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from detrkit.matching.batch import AssignRequest, Match, assign_all
from detrkit.structures import (
    DenseLoss,
    DetectorOutput,
    LossOutput,
    PredictionGroup,
    Target,
)


def loss_name(group: str, term: str, layer: int) -> str:
    """The one naming scheme of loss terms, e.g. ``main/giou/d5``."""
    return f"{group}/{term}/d{layer}"


def class_agnostic(targets: Sequence[Target]) -> list[Target]:
    """The same targets with every label set to 0 (two-stage encoder proposals)."""
    return [replace(t, labels=torch.zeros_like(t.labels)) for t in targets]


def repeated(targets: Sequence[Target], times: int) -> list[Target]:
    """Every target's boxes tiled ``times`` times: [g1..gG, g1..gG, ...] (H-DETR)."""
    return [
        replace(t, labels=t.labels.repeat(times), boxes=t.boxes.repeat(times, 1)) for t in targets
    ]


def merge_matches(own: list[Match], extra: list[Match]) -> list[Match]:
    """Per image, ``own`` pairs not in ``extra`` followed by ``extra``'s pairs (written last, so
    they win where a query is given two classes)."""
    merged = []
    for (queries, boxes), (extra_queries, extra_boxes) in zip(own, extra):
        taken = {(q, b) for q, b in zip(extra_queries.tolist(), extra_boxes.tolist())}
        keep = torch.tensor(
            [(q, b) not in taken for q, b in zip(queries.tolist(), boxes.tolist())],
            dtype=torch.bool,
        )
        merged.append(
            (torch.cat((queries[keep], extra_queries)), torch.cat((boxes[keep], extra_boxes)))
        )
    return merged


class SetCriterion(nn.Module):
    """Match every (group, layer) and apply every loss term; evaluate the dense losses.

    Args:
        assigners: names a group's ``supervision.assigner`` may use -> two-phase assigner
            (see ``matching.batch.Assigner``); groups may also bring their own assigner object.
        terms: term name ("cls", "l1", "giou") -> loss term module.
        term_weights: term name -> weight, for groups that do not bring their own.
        aux_loss: supervise every decoder layer; otherwise only the last.
        reduce_num_boxes: maps a local count (a tensor) to the value used for normalising,
            e.g. the mean over distributed ranks; injected so the criterion never sees
            ``torch.distributed``. Box counts and dense-loss counts go through it alike.
    """

    def __init__(
        self,
        *,
        assigners: Mapping[str, object],
        terms: Mapping[str, nn.Module],
        term_weights: Mapping[str, float],
        aux_loss: bool = True,
        reduce_num_boxes: Callable[[Tensor], Tensor] = lambda n: n,
    ) -> None:
        super().__init__()
        self.assigners = dict(assigners)
        self.terms = nn.ModuleDict(terms)
        self.term_weights = dict(term_weights)
        self.aux_loss = aux_loss
        self.reduce_num_boxes = reduce_num_boxes

    def assigner_of(self, group: PredictionGroup) -> object:
        """The group's assigner object; an unknown name is an error."""
        assigner = group.supervision.assigner
        if not isinstance(assigner, str):
            return assigner
        if assigner not in self.assigners:
            raise KeyError(
                f"group '{group.name}' asks for assigner '{assigner}'; the criterion has "
                f"{sorted(self.assigners)} (or pass an assigner object in its Supervision)"
            )
        return self.assigners[assigner]

    def weights_of(self, group: PredictionGroup) -> Mapping[str, float]:
        weights = group.supervision.term_weights
        if weights is None:
            return self.term_weights
        missing = set(self.terms) - set(weights)
        if missing:
            raise KeyError(f"group '{group.name}' gives no weight for terms {sorted(missing)}")
        return weights

    def match_boxes(self, group: PredictionGroup) -> Tensor:
        """What the assigner compares with the targets: predicted boxes, or anchors."""
        if group.supervision.match_on == "anchors":
            if group.anchors is None:
                raise ValueError(f"group '{group.name}' is matched on anchors but has none")
            return group.anchors
        return group.boxes

    def supervised_layers(self, group: PredictionGroup) -> range:
        last = group.num_layers - 1
        return range(group.num_layers) if self.aux_loss else range(last, last + 1)

    def unrepeated_targets(self, group: PredictionGroup, targets: list[Target]) -> list[Target]:
        """The group's targets before H-DETR's repetition: the handed-over ones of a fixed
        assignment, else the ground truth (class-agnostic for proposals)."""
        fixed = group.supervision.fixed
        if fixed is not None and fixed.targets is not None:
            return list(fixed.targets)
        return class_agnostic(targets) if group.supervision.class_agnostic else list(targets)

    def group_targets(self, group: PredictionGroup, targets: list[Target]) -> list[Target]:
        """The targets the group's losses compare with (repeated ``target_repeat`` times)."""
        chosen = self.unrepeated_targets(group, targets)
        repeat = group.supervision.target_repeat
        return repeated(chosen, repeat) if repeat > 1 else chosen

    def reduced_count(self, count: float | Tensor, device: torch.device) -> Tensor:
        """A local count averaged by the injected reducer (a 0-d float tensor)."""
        count = torch.as_tensor(count, dtype=torch.float32, device=device)
        return self.reduce_num_boxes(count.float())

    def num_boxes(self, group: PredictionGroup, targets: list[Target], device) -> Tensor:
        """The normaliser of the group's box and focal terms.

        Repeated targets are counted before clamping; a fixed assignment clamps the
        ground-truth count and then applies its multiplier (docs/methods.md#implementation-notes).
        """
        fixed = group.supervision.fixed
        chosen = self.unrepeated_targets(group, targets)
        count = self.reduced_count(sum(len(t) for t in chosen), device)
        if fixed is not None:
            return count.clamp(min=1) * fixed.normaliser_multiplier
        return (count * group.supervision.target_repeat).clamp(min=1)

    def match(self, output: DetectorOutput, targets: list[Target]) -> dict[tuple[str, int], list]:
        """(group name, layer) -> per-image matches.

        The supervised layers of a group are costed as one batch of L x B images, repeated
        targets are costed once, and every group's costs reach the host in a single transfer.
        Fixed assignments are used as handed over, for every layer.
        """
        spans, requests, matches = [], [], {}
        for group in output.groups:
            layers = self.supervised_layers(group)
            fixed = group.supervision.fixed
            if fixed is not None:
                matches |= {(group.name, layer): list(fixed.pairs) for layer in layers}
                continue
            group_targets = self.unrepeated_targets(group, targets)
            chosen = slice(layers.start, layers.stop)
            spans.append((group.name, layers, len(group_targets)))
            requests.append(
                AssignRequest(
                    self.assigner_of(group),
                    group.logits[chosen].flatten(0, 1),
                    self.match_boxes(group)[chosen].flatten(0, 1),
                    list(group_targets) * len(layers),
                    target_repeat=group.supervision.target_repeat,
                )
            )
        for (name, layers, batch), result in zip(spans, assign_all(requests)):
            for index, layer in enumerate(layers):
                matches[(name, layer)] = result[index * batch : (index + 1) * batch]
        self._merge(output, matches)
        return matches

    def _merge(self, output: DetectorOutput, matches: dict[tuple[str, int], list]) -> None:
        names = {group.name for group in output.groups}
        for group in output.groups:
            other = group.supervision.merge_with
            if other is None:
                continue
            if other not in names:
                raise KeyError(f"group '{group.name}' merges with unknown group '{other}'")
            for layer in self.supervised_layers(group):
                if (other, layer) in matches:
                    own = matches[(group.name, layer)]
                    matches[(group.name, layer)] = merge_matches(own, matches[(other, layer)])

    def forward(self, output: DetectorOutput, targets: list[Target]) -> LossOutput:
        """Losses of every group and layer, then the dense losses, computed in fp32."""
        device = output.groups[0].logits.device
        matches = self.match(output, targets)
        terms, weights = {}, {}
        for group in output.groups:
            group_targets = self.group_targets(group, targets)
            num_boxes = self.num_boxes(group, targets, device)
            term_weights, scale = self.weights_of(group), group.supervision.scale
            for layer in self.supervised_layers(group):
                logits, boxes = group.logits[layer].float(), group.boxes[layer].float()
                for term_name, term in self.terms.items():
                    name = loss_name(group.name, term_name, layer)
                    value = term(
                        logits,
                        boxes,
                        group_targets,
                        matches[(group.name, layer)],
                        num_boxes,
                        valid=group.valid,
                    )
                    terms[name] = value * scale if scale != 1.0 else value
                    weights[name] = term_weights[term_name]
        for dense in output.dense_losses:
            terms[dense.name], weights[dense.name] = self.dense_value(dense, targets), dense.weight
        total = sum(weights[name] * value for name, value in terms.items())
        return LossOutput(total=total, terms=terms, weights=weights)

    def dense_value(self, dense: DenseLoss, targets: list[Target]) -> Tensor:
        """``dense.compute`` in fp32 with autocast off, divided by its rank-averaged count."""
        device = dense.inputs[0].device if dense.inputs else torch.device("cpu")
        count = dense.count if dense.count is not None else sum(len(t) for t in targets)
        with torch.autocast(device.type, enabled=False):
            value = dense.compute(*(t.float() for t in dense.inputs))
        return value / self.reduced_count(count, device).clamp(min=1)
