# SPDX-License-Identifier: Apache-2.0
"""DINO train step vs its base, Deformable DETR two-stage, at the same image size.

DINO: R50, 4 scales, 900 queries, contrastive denoising (dn_number 100), mixed query selection,
look-forward-twice. Base: Deformable DETR R50 two-stage + iterative refinement, 300 queries,
with DINO's FFN width and dropout, so the ratio is the cost of what DINO adds; a third arm is
the base as published (narrower FFNs, dropout). All random weights, 91 classes, ``--boxes``
ground-truth boxes per image, one optimiser step (AdamW) per measured step. The arms run
interleaved (A B C A B C) in one process; the table gives the median of ``--repeats`` timings
and the ratio to the base. It also counts, inside the criterion, what
would synchronise with an accelerator: the host transfers of matching (one per step, whatever
the number of groups and layers) and ``Tensor.item()`` calls.

    python benchmarks/dino_step.py [--device cpu|cuda] [--size 512] [--batch 1] [--repeats 3]
        [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from detrkit.config.build import build_criterion, build_model
from detrkit.config.load import load_config
from detrkit.engine.optim import make_adamw
from detrkit.structures import ImageBatch, Target

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

    def step(self, images, targets) -> float:
        dtype = torch.bfloat16 if self.precision == "bf16" else None
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            output = self.model(images, targets)
        with counting_host_transfers() as counts:
            losses = self.criterion(output, targets)
        self.transfers = dict(counts)
        self.optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--boxes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    device = torch.device(args.device)
    images, targets = _batch(args.batch, args.size, args.boxes, device)
    arms = {name: Arm(*arm, device, args.precision) for name, arm in ARMS.items()}
    times = {name: [] for name in arms}
    for repeat in range(args.warmup + args.repeats):
        for name, arm in arms.items():  # interleaved: A B A B
            seconds = arm.step(images, targets)
            if repeat >= args.warmup:
                times[name].append(seconds)
    base = statistics.median(times[BASE])
    print(
        f"{args.size}x{args.size}, batch {args.batch}, {args.boxes} boxes/image, "
        f"{args.device}, {args.precision}, median of {args.repeats}\n"
    )
    print("| model | step (s) | vs base | matching transfers / step | `.item()` / step |")
    print("|---|---|---|---|---|")
    for name, arm in arms.items():
        median = statistics.median(times[name])
        counts = arm.transfers
        print(
            f"| {name} | {median:.2f} | {median / base:.2f}x | {counts['matching']} "
            f"| {counts['item']} |"
        )


if __name__ == "__main__":
    main()
