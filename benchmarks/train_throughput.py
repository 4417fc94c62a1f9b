# SPDX-License-Identifier: Apache-2.0
"""Training throughput of the engine's options: precision, weight EMA, gradient accumulation.

Times ``engine.step.train_step`` (forward, matching, losses, backward, clip, AdamW) on a fixed
synthetic batch, with each option against the plain step in ``--precision`` (fp32 by default)
measured in the same run:

* the other of fp32 / bf16 autocast (and fp16 with loss scaling on CUDA; CPU fp16 autocast is
  slow);
* + EMA of the weights (one ``AveragedModel`` update per step);
* gradient accumulation: 2 micro-batches of B/2 images vs 1 batch of B (same images per step).

Every arm has its own model (same seed) in this process; the arms alternate step by step
(A B C D A B C D ...) after ``--warmup`` steps each (fp16: the first steps lower the loss
scale), the device synchronised around every step; images/s from the median of ``--repeats``.

Usage::

    .venv/bin/python benchmarks/train_throughput.py [--preset deformable_detr_tiny]
        [--device cpu|cuda] [--precision fp32|bf16] [--batch 4] [--size 320] [--repeats 5]
        [--warmup 2] [--set KEY=VALUE ...]

Prints a Markdown table of images/s and the ratio to the plain step. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_common_args,
    check_device,
    header,
    interleaved_times,
    markdown_table,
    medians,
)

from detrkit.config.build import build_criterion, build_model  # noqa: E402
from detrkit.config.load import load_config  # noqa: E402
from detrkit.engine.ema import WeightEMA  # noqa: E402
from detrkit.engine.precision import Precision  # noqa: E402
from detrkit.engine.step import train_step  # noqa: E402
from detrkit.structures import ImageBatch, Target  # noqa: E402

NUM_CLASSES = 3


def _batch(count: int, size: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(count, 3, size, size, generator=generator)
    mask = torch.zeros(count, size, size, dtype=torch.bool)
    targets = []
    for _ in range(count):
        centres = torch.rand(4, 2, generator=generator) * 0.6 + 0.2
        sides = torch.rand(4, 2, generator=generator) * 0.2 + 0.05
        labels = torch.randint(0, NUM_CLASSES, (4,), generator=generator)
        targets.append(Target(labels, torch.cat((centres, sides), 1)).to(device))
    sizes = torch.full((count, 2), size)
    return ImageBatch(pixels, mask, sizes).to(device), targets


def _split(images: ImageBatch, targets: list[Target], parts: int):
    step = len(targets) // parts
    return [
        (
            ImageBatch(
                images.pixels[i : i + step],
                images.padding_mask[i : i + step],
                images.sizes[i : i + step],
            ),
            targets[i : i + step],
        )
        for i in range(0, len(targets), step)
    ]


def _arm_step(setup, micro, precision_name, ema, device):
    """One arm's training step on its own model (built by ``setup``)."""
    model, criterion, optimizer = setup()
    precision = Precision(precision_name, device.type)
    averaged = WeightEMA(model, 0.9998) if ema else None

    def step():
        result = train_step(model, criterion, micro, optimizer, precision, 0.1)
        if averaged is not None and result.updated:
            averaged.update(model)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser, repeats=5, warmup=2)
    parser.add_argument("--preset", default="deformable_detr_tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    args = parser.parse_args()
    device = check_device(args.device)
    cfg = load_config(args.preset, args.overrides).model

    def setup():
        torch.manual_seed(0)
        model = build_model(cfg, NUM_CLASSES).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return model, build_criterion(cfg, NUM_CLASSES), optimizer

    images, targets = _batch(args.batch, args.size, device)
    whole, halves = [(images, targets)], _split(images, targets, 2)
    base = args.precision
    other = "bf16" if base == "fp32" else "fp32"
    names = {"fp32": "fp32", "bf16": "bf16 autocast"}
    arms = [
        (names[base], whole, base, False),
        (names[other], whole, other, False),
        (f"{base} + EMA", whole, base, True),
        (f"{base}, 2 x {args.batch // 2} accumulated", halves, base, False),
    ]
    if device.type == "cuda":
        arms.insert(2, ("fp16 autocast + loss scaling", whole, "fp16", False))
    steps = {
        name: _arm_step(setup, micro, precision, ema, device)
        for name, micro, precision, ema in arms
    }
    seconds = medians(interleaved_times(steps, device, args.repeats, args.warmup))
    rates = {name: args.batch / seconds[name] for name in steps}
    print(
        header(
            device,
            f"plain step {base}",
            preset=args.preset,
            batch=f"{args.batch} x {args.size}^2",
            repeats=f"{args.repeats} steps (median, interleaved, after {args.warmup} warm-up)",
        )
        + "\n"
    )
    reference = names[base]
    rows = [
        [name, f"{rate:.2f}", f"{rate / rates[reference]:.2f}x"] for name, rate in rates.items()
    ]
    print(markdown_table(["arm", "images/s", f"vs {reference}"], rows))


if __name__ == "__main__":
    main()
