# SPDX-License-Identifier: Apache-2.0
"""``SetCriterion``: one generic loop over prediction groups x decoder layers."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from detrkit.matching.batch import AssignRequest, assign_all
from detrkit.structures import DetectorOutput, LossOutput, PredictionGroup, Target


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


def merge_matches(own: list, extra: list) -> list:
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
    """Match every (group, layer) and apply every loss term.

    Args:
        assigners: assigner name -> two-phase assigner (see ``matching.batch.Assigner``).
        terms: term name ("cls", "l1", "giou") -> loss term module.
        term_weights: term name -> weight.
        aux_loss: supervise every decoder layer; otherwise only the last.
        reduce_num_boxes: maps the local box count (a tensor) to the value used for normalising,
            e.g. the mean over distributed ranks; injected so the criterion never sees
            ``torch.distributed``.
        group_term_weights: group name -> term weights replacing ``term_weights`` for that group
            (MS-DETR weighs its one-to-many and encoder classification differently).
        group_assigners: group name -> assigner name replacing the group's own choice.
        anchor_matched: groups matched by their ``anchors`` instead of their predicted boxes.
        merged_matches: group name -> another group over the same queries whose pairs, layer by
            layer, are added to its own (MS-DETR's ``--use_indices_merge``).
    """

    def __init__(
        self,
        *,
        assigners: Mapping[str, object],
        terms: Mapping[str, nn.Module],
        term_weights: Mapping[str, float],
        aux_loss: bool = True,
        reduce_num_boxes: Callable[[Tensor], Tensor] = lambda n: n,
        group_term_weights: Mapping[str, Mapping[str, float]] | None = None,
        group_assigners: Mapping[str, str] | None = None,
        anchor_matched: Sequence[str] = (),
        merged_matches: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.assigners = dict(assigners)
        self.terms = nn.ModuleDict(terms)
        self.term_weights = dict(term_weights)
        self.aux_loss = aux_loss
        self.reduce_num_boxes = reduce_num_boxes
        self.group_term_weights = {k: dict(v) for k, v in (group_term_weights or {}).items()}
        self.group_assigners = dict(group_assigners or {})
        self.anchor_matched = tuple(anchor_matched)
        self.merged_matches = dict(merged_matches or {})

    def assigner_of(self, group: PredictionGroup):
        return self.assigners[self.group_assigners.get(group.name, group.assigner)]

    def match_boxes(self, group: PredictionGroup) -> Tensor:
        """What the assigner compares with the targets: predicted boxes, or anchors."""
        if group.name in self.anchor_matched and group.anchors is not None:
            return group.anchors
        return group.boxes

    def supervised_layers(self, group: PredictionGroup) -> range:
        last = group.num_layers - 1
        return range(group.num_layers) if self.aux_loss else range(last, last + 1)

    def unrepeated_targets(self, group: PredictionGroup, targets: list[Target]) -> list[Target]:
        """The group's targets before H-DETR's repetition."""
        return class_agnostic(targets) if group.class_agnostic else list(targets)

    def group_targets(self, group: PredictionGroup, targets: list[Target]) -> list[Target]:
        """The targets the group's losses compare with (repeated ``target_repeat`` times)."""
        chosen = self.unrepeated_targets(group, targets)
        return repeated(chosen, group.target_repeat) if group.target_repeat > 1 else chosen

    def num_boxes(self, targets: Sequence[Target], device: torch.device) -> float:
        count = torch.tensor(float(sum(len(t) for t in targets)), device=device)
        return self.reduce_num_boxes(count).clamp(min=1).item()

    def match(self, output: DetectorOutput, targets: list[Target]) -> dict[tuple[str, int], list]:
        """(group name, layer) -> per-image matches.

        The supervised layers of a group are costed as one batch of L x B images, repeated
        targets are costed once, and every group's costs reach the host in a single transfer.
        """
        spans, requests = [], []
        for group in output.groups:
            group_targets = self.unrepeated_targets(group, targets)
            layers = self.supervised_layers(group)
            chosen = slice(layers.start, layers.stop)
            spans.append((group.name, layers, len(group_targets)))
            requests.append(
                AssignRequest(
                    self.assigner_of(group),
                    group.logits[chosen].flatten(0, 1),
                    self.match_boxes(group)[chosen].flatten(0, 1),
                    list(group_targets) * len(layers),
                    target_repeat=group.target_repeat,
                )
            )
        matches = {}
        for (name, layers, batch), result in zip(spans, assign_all(requests)):
            for index, layer in enumerate(layers):
                matches[(name, layer)] = result[index * batch : (index + 1) * batch]
        for name, other in self.merged_matches.items():
            for (group, layer), own in list(matches.items()):
                if group == name and (other, layer) in matches:
                    matches[(name, layer)] = merge_matches(own, matches[(other, layer)])
        return matches

    def forward(self, output: DetectorOutput, targets: list[Target]) -> LossOutput:
        """Losses of every group and layer, computed in fp32."""
        device = output.groups[0].logits.device
        matches = self.match(output, targets)
        terms, weights = {}, {}
        for group in output.groups:
            group_targets = self.group_targets(group, targets)
            # H-DETR normalises the one-to-many group by its repeated target count
            # (docs/methods.md#implementation-notes).
            num_boxes = self.num_boxes(group_targets, device)
            for layer in self.supervised_layers(group):
                logits, boxes = group.logits[layer].float(), group.boxes[layer].float()
                for term_name, term in self.terms.items():
                    name = loss_name(group.name, term_name, layer)
                    terms[name] = term(
                        logits, boxes, group_targets, matches[(group.name, layer)], num_boxes
                    )
                    term_weights = self.group_term_weights.get(group.name, self.term_weights)
                    weights[name] = group.loss_weight * term_weights[term_name]
        for name, value in output.extra_losses.items():
            terms[name], weights[name] = value.float(), 1.0
        total = sum(weights[name] * value for name, value in terms.items())
        return LossOutput(total=total, terms=terms, weights=weights)
