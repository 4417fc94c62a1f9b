# SPDX-License-Identifier: Apache-2.0
"""Matching + loss of one H-DETR step: detrkit's batched assignment vs a per-layer, per-image loop.

The originals compute a cost matrix per decoder layer, move it to the host, and solve each image
(and H-DETR calls the whole criterion again for the one-to-many group). detrkit computes the costs
of every (group, layer) on the device and moves them to the host once. The shape is an H-DETR
step: 300 + 1500 queries, 6 decoder layers, batch 2, 20 boxes per image (x6 repeated for o2m).

    python benchmarks/matching.py [--device cpu|cuda] [--repeats 5]

Prints a Markdown table and checks that both give the same assignments and losses.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from detrkit.config.build import build_criterion
from detrkit.config.load import load_config
from detrkit.losses.criterion import SetCriterion
from detrkit.structures import DetectorOutput, PredictionGroup, Target

NUM_CLASSES, LAYERS, BATCH, BOXES = 91, 6, 2, 20


class PerImageLoopCriterion(SetCriterion):
    """The originals' approach: one host transfer per (group, layer, image), costs against the
    repeated targets."""

    def match(self, output, targets):
        matches = {}
        for group in output.groups:
            group_targets = self.group_targets(group, targets)
            assigner = self.assigners[group.assigner]
            for layer in self.supervised_layers(group):
                per_image = []
                for i, target in enumerate(group_targets):
                    logits = group.logits[layer, i : i + 1].detach()
                    boxes = group.boxes[layer, i : i + 1].detach()
                    costs = assigner.costs(logits, boxes, [target]).cpu()
                    per_image.append(assigner.solve(costs, [target])[0])
                matches[(group.name, layer)] = per_image
        return matches


def _inputs(device):
    generator = torch.Generator().manual_seed(0)

    def boxes(*shape):
        centre = torch.rand(*shape, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(*shape, 2, generator=generator) * 0.2 + 0.05
        return torch.cat((centre, size), -1).to(device)

    groups = [
        PredictionGroup(
            name,
            torch.randn(LAYERS, BATCH, queries, NUM_CLASSES, generator=generator).to(device),
            boxes(LAYERS, BATCH, queries),
            at_inference=name == "main",
            target_repeat=repeat,
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


def _median_seconds(function, device, repeats):
    def timed():
        start = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, result

    timed()
    runs = [timed() for _ in range(repeats)]
    return statistics.median(seconds for seconds, _ in runs), runs[-1][1]


def _time(criterion, output, targets, device, repeats):
    """(matching seconds, matching + loss + backward seconds, losses)."""

    def step():
        losses = criterion(output, targets)
        losses.total.backward()
        return losses

    matching, _ = _median_seconds(lambda: criterion.match(output, targets), device, repeats)
    total, losses = _median_seconds(step, device, repeats)
    return matching, total, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = load_config("hdetr_r50_tricks_12ep").model
    batched = build_criterion(cfg, NUM_CLASSES)
    loop = PerImageLoopCriterion(
        assigners=batched.assigners, terms=batched.terms, term_weights=batched.term_weights
    )
    output, targets = _inputs(device)
    ours_match, ours, ours_losses = _time(batched, output, targets, device, args.repeats)
    their_match, theirs, their_losses = _time(loop, output, targets, device, args.repeats)
    same = batched.match(output, targets).keys() == loop.match(output, targets).keys() and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for key in batched.match(output, targets)
        for a, b in zip(batched.match(output, targets)[key], loop.match(output, targets)[key])
    )
    torch.testing.assert_close(ours_losses.total, their_losses.total)
    print(
        f"H-DETR step: 300 + 1500 queries, {LAYERS} layers, batch {BATCH}, {BOXES} boxes/image, "
        f"device {args.device}, {torch.get_num_threads()} threads, median of {args.repeats}\n"
    )
    print("| | matching s | speed-up | matching + loss + backward s | speed-up |")
    print("|---|---|---|---|---|")
    print(f"| per-layer, per-image loop | {their_match:.4f} | 1.00x | {theirs:.4f} | 1.00x |")
    print(
        f"| detrkit (one host transfer) | {ours_match:.4f} | {their_match / ours_match:.2f}x "
        f"| {ours:.4f} | {theirs / ours:.2f}x |"
    )
    print(f"\nsame assignments: {same}; same total loss: True")


if __name__ == "__main__":
    main()
