# SPDX-License-Identifier: Apache-2.0
"""DINO train step vs its base, Deformable DETR two-stage, at the same image size.

DINO: R50, 4 scales, 900 queries, contrastive denoising (dn_number 100), mixed query selection,
look-forward-twice. Base: Deformable DETR R50 two-stage + iterative refinement, 300 queries,
with DINO's FFN width and dropout, so the ratio is the cost of what DINO adds; a third arm is
the base as published (narrower FFNs, dropout). All random weights, 91 classes, ``--boxes``
ground-truth boxes per image, one optimiser step (AdamW) per measured step. With
``--precision bf16`` the model's forward runs under ``torch.autocast(device, bfloat16)``, the
criterion (matching, losses) and the backward pass outside it, as detrkit's engine does. The arms
run interleaved (A B C A B C) in one process after ``--warmup`` steps each, the device
synchronised around every timed step; the table gives the median of ``--repeats`` timings and
the ratio to the base. It also counts, inside the criterion, what would synchronise with an
accelerator: the host transfers of matching (one per step, whatever the number of groups and
layers) and ``Tensor.item()`` calls.

Usage::

    .venv/bin/python benchmarks/dino_step.py [--device cpu|cuda] [--precision fp32|bf16]
        [--size 512] [--batch 1] [--boxes 10] [--repeats 3] [--warmup 1]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_common_args,
    autocast,
    check_device,
    header,
    interleaved_times,
    markdown_table,
    medians,
)

from detrkit.config.build import build_criterion, build_model  # noqa: E402
from detrkit.config.load import load_config  # noqa: E402
from detrkit.engine.optim import make_adamw  # noqa: E402
from detrkit.structures import ImageBatch, Target  # noqa: E402

NUM_CLASSES = 91
# DINO's published model uses 2048-wide FFNs without dropout, Deformable DETR's 1024 with 0.1:
# the second arm is the base at DINO's widths (what DINO's additions cost, the ratio's
# denominator), the third the base as published.
SAME_WIDTHS = [
    f"model.{part}.{key}={value}"
    for part in ("encoder", "decoder")
    for key, value in (("ffn_dim", 2048), ("dropout", 0.0))
]
BASE = "Deformable DETR two-stage R50, 300 queries, DINO's FFN 2048 / dropout 0"
ARMS = {
    "DINO-4scale R50, 900 queries (+ denoising)": ("dino_4scale_r50_12ep", []),
    BASE: ("deformable_detr_r50_two_stage", SAME_WIDTHS),
    "Deformable DETR two-stage R50, 300 queries, as published (FFN 1024)": (
        "deformable_detr_r50_two_stage",
        [],
    ),
}


def _batch(batch: int, size: int, boxes: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    images = ImageBatch(
        pixels,
        torch.zeros(batch, size, size, dtype=torch.bool),
        torch.tensor([[size, size]] * batch),
    ).to(device)
    targets = []
    for _ in range(batch):
        centres = torch.rand(boxes, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(boxes, 2, generator=generator) * 0.2 + 0.05
        labels = torch.randint(1, NUM_CLASSES, (boxes,), generator=generator)
        targets.append(Target(labels, torch.cat((centres, sizes), 1)).to(device))
    return images, targets


@contextlib.contextmanager
def counting_host_transfers():
    """Counts what would synchronise with an accelerator inside the criterion: each call of
    ``assign_all`` (it moves every cost matrix of the step to the host in one ``.cpu()``) and
    every ``Tensor.item()``."""
    import detrkit.losses.criterion as criterion_module

    counts = {"matching": 0, "item": 0}
    assign_all, item = criterion_module.assign_all, torch.Tensor.item

    def counted_assign(requests):
        counts["matching"] += 1
        return assign_all(requests)

    def counted_item(self):
        counts["item"] += 1
        return item(self)

    criterion_module.assign_all, torch.Tensor.item = counted_assign, counted_item
    try:
        yield counts
    finally:
        criterion_module.assign_all, torch.Tensor.item = assign_all, item


class Arm:
    """One model, its criterion and optimiser, stepping on a fixed batch."""

    def __init__(
        self, preset: str, overrides: list[str], device: torch.device, precision: str
    ) -> None:
        cfg = load_config(preset, overrides).model
        torch.manual_seed(0)
        self.model = build_model(cfg, NUM_CLASSES).to(device).train()
        self.criterion = build_criterion(cfg, NUM_CLASSES)
        self.optimizer = make_adamw(self.model.parameters(), lr=1e-4, weight_decay=1e-4)
        self.device, self.precision = device, precision
        self.transfers = {}

    def step(self, images, targets) -> None:
        """One training step: forward (autocast in bf16), criterion in fp32, backward, AdamW."""
        with autocast(self.device, self.precision):
            output = self.model(images, targets)
        with counting_host_transfers() as counts:
            losses = self.criterion(output, targets)
        self.transfers = dict(counts)
        self.optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        self.optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--boxes", type=int, default=10)
    args = parser.parse_args()
    device = check_device(args.device)
    images, targets = _batch(args.batch, args.size, args.boxes, device)
    arms = {name: Arm(*arm, device, args.precision) for name, arm in ARMS.items()}
    steps = {name: (lambda arm=arm: arm.step(images, targets)) for name, arm in arms.items()}
    seconds = medians(interleaved_times(steps, device, args.repeats, args.warmup))
    base = seconds[BASE]
    print(
        header(
            device,
            args.precision,
            image=f"{args.size}x{args.size}",
            batch=args.batch,
            boxes_per_image=args.boxes,
            repeats=f"{args.repeats} (median, interleaved, after {args.warmup} warm-up)",
        )
        + "\n"
    )
    columns = ["model", "step (s)", "vs base", "matching transfers / step", "`.item()` / step"]
    rows = [
        [
            name,
            f"{seconds[name]:.2f}",
            f"{seconds[name] / base:.2f}x",
            arm.transfers["matching"],
            arm.transfers["item"],
        ]
        for name, arm in arms.items()
    ]
    print(markdown_table(columns, rows))


if __name__ == "__main__":
    main()
