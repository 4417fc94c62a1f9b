# SPDX-License-Identifier: Apache-2.0
"""Matching + loss of one H-DETR step: detrkit's batched assignment vs a per-layer, per-image loop.

The originals compute a cost matrix per decoder layer, move it to the host, and solve each image
(and H-DETR calls the whole criterion again for the one-to-many group). detrkit computes the costs
of every (group, layer) on the device and moves them to the host once. The shape is an H-DETR
step: 300 + 1500 queries, 6 decoder layers, batch 2, 20 boxes per image (x6 repeated for o2m).

The two run interleaved (loop, detrkit, loop, detrkit ...) in one process after ``--warmup``
runs each; the table gives medians of ``--repeats``, the device synchronised around every run.

``--precision``: matching runs in fp32 by design (``detrkit.matching`` casts logits and boxes to
float32 before computing costs, and the criterion computes losses outside autocast), so there is
nothing to autocast here. ``bf16`` only stores the predictions in bfloat16, as a bf16-autocast
forward pass hands them to the criterion; what changes is the cost of those casts.

Usage::

    .venv/bin/python benchmarks/matching.py [--device cpu|cuda] [--precision fp32|bf16]
        [--repeats 5] [--warmup 1]

Prints a Markdown table and checks that both give the same assignments and losses.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PRECISIONS,
    add_common_args,
    check_device,
    header,
    interleaved_times,
    markdown_table,
    medians,
)

from detrkit.config.build import build_criterion  # noqa: E402
from detrkit.config.load import load_config  # noqa: E402
from detrkit.losses.criterion import SetCriterion  # noqa: E402
from detrkit.structures import (  # noqa: E402
    DetectorOutput,
    PredictionGroup,
    Supervision,
    Target,
)

NUM_CLASSES, LAYERS, BATCH, BOXES = 91, 6, 2, 20


class PerImageLoopCriterion(SetCriterion):
    """The originals' approach: one host transfer per (group, layer, image), costs against the
    repeated targets."""

    def match(self, output, targets):
        matches = {}
        for group in output.groups:
            group_targets = self.group_targets(group, targets)  # repeated, as the originals do
            assigner = self.assigner_of(group)
            match_boxes = self.match_boxes(group)
            for layer in self.supervised_layers(group):
                per_image = []
                for i, target in enumerate(group_targets):
                    logits = group.logits[layer, i : i + 1].detach()
                    boxes = match_boxes[layer, i : i + 1].detach()
                    costs = assigner.costs(logits, boxes, [target]).cpu()
                    per_image.append(assigner.solve(costs, [target])[0])
                matches[(group.name, layer)] = per_image
        return matches


def _inputs(device, dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)

    def boxes(*shape):
        centre = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(*shape, 2, generator=generator) * 0.2 + 0.05
        return torch.cat((centre, size), -1).to(device)

    groups = [
        PredictionGroup(
            name,
            torch.randn(LAYERS, BATCH, queries, NUM_CLASSES, generator=generator).to(device, dtype),
            boxes(LAYERS, BATCH, queries).to(dtype),
            supervision=Supervision(target_repeat=repeat),
            at_inference=name == "main",
        )
        for name, queries, repeat in (("main", 300, 1), ("o2m", 1500, 6))
    ]
    for group in groups:
        group.logits.requires_grad_(True)
        group.boxes.requires_grad_(True)
    targets = [
        Target(
            torch.randint(0, NUM_CLASSES, (BOXES,), generator=generator).to(device), boxes(BOXES)
        )
        for _ in range(BATCH)
    ]
    return DetectorOutput(groups), targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, repeats=5)
    args = parser.parse_args()
    device = check_device(args.device)
    cfg = load_config("hdetr_r50_tricks_12ep").model
    batched = build_criterion(cfg, NUM_CLASSES)
    loop = PerImageLoopCriterion(
        assigners=batched.assigners, terms=batched.terms, term_weights=batched.term_weights
    )
    output, targets = _inputs(device, PRECISIONS[args.precision])
    criteria = {"loop": loop, "detrkit": batched}

    def step(criterion):
        losses = criterion(output, targets)
        losses.total.backward()
        return losses

    matching = medians(
        interleaved_times(
            {name: (lambda c=c: c.match(output, targets)) for name, c in criteria.items()},
            device,
            args.repeats,
            args.warmup,
        )
    )
    total = medians(
        interleaved_times(
            {name: (lambda c=c: step(c)) for name, c in criteria.items()},
            device,
            args.repeats,
            args.warmup,
        )
    )
    ours_matches, their_matches = batched.match(output, targets), loop.match(output, targets)
    same = ours_matches.keys() == their_matches.keys() and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for key in ours_matches
        for a, b in zip(ours_matches[key], their_matches[key])
    )
    torch.testing.assert_close(step(batched).total, step(loop).total)
    print(
        header(
            device,
            f"{args.precision} predictions (matching and losses in fp32)",
            shape=f"H-DETR step, 300 + 1500 queries, {LAYERS} layers, batch {BATCH}, "
            f"{BOXES} boxes/image",
            repeats=f"{args.repeats} (median, interleaved, after {args.warmup} warm-up)",
        )
        + "\n"
    )
    columns = ["", "matching s", "speed-up", "matching + loss + backward s", "speed-up"]
    rows = [
        ["per-layer, per-image loop", f"{matching['loop']:.4f}", "1.00x"]
        + [f"{total['loop']:.4f}", "1.00x"],
        [
            "detrkit (one host transfer)",
            f"{matching['detrkit']:.4f}",
            f"{matching['loop'] / matching['detrkit']:.2f}x",
            f"{total['detrkit']:.4f}",
            f"{total['loop'] / total['detrkit']:.2f}x",
        ],
    ]
    print(markdown_table(columns, rows))
    print(f"\nsame assignments: {same}; same total loss: True")


if __name__ == "__main__":
    main()
