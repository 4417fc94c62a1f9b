# SPDX-License-Identifier: Apache-2.0
"""Training throughput of the engine's options: precision, weight EMA, gradient accumulation.

Times ``engine.step.train_step`` (forward, matching, losses, backward, clip, AdamW) on a fixed
synthetic batch, with each option against the plain fp32 step measured in the same run:

* fp32 vs bf16 autocast (and fp16 with loss scaling on CUDA; CPU fp16 autocast is slow);
* + EMA of the weights (one ``AveragedModel`` update per step);
* gradient accumulation: 2 micro-batches of B/2 images vs 1 batch of B (same images per step).

    python benchmarks/train_throughput.py [--preset deformable_detr_tiny] [--device cpu|cuda]
        [--batch 4] [--size 320] [--repeats 5] [--set KEY=VALUE ...]

Prints a Markdown table of images/s and the ratio to fp32. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from detrkit.config.build import build_criterion, build_model
from detrkit.config.load import load_config
from detrkit.engine.ema import WeightEMA
from detrkit.engine.precision import Precision
from detrkit.engine.step import train_step
from detrkit.structures import ImageBatch, Target

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


def _images_per_second(setup, micro, precision_name, ema, repeats, device) -> float:
    model, criterion, optimizer = setup()
    precision = Precision(precision_name, device.type)
    averaged = WeightEMA(model, 0.9998) if ema else None

    def step():
        result = train_step(model, criterion, micro, optimizer, precision, 0.1)
        if averaged is not None and result.updated:
            averaged.update(model)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    step()  # warm-up (fp16: the first steps lower the loss scale)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sum(len(t) for _, t in micro) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deformable_detr_tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", nargs="*", default=[], dest="overrides")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = load_config(args.preset, args.overrides).model

    def setup():
        torch.manual_seed(0)
        model = build_model(cfg, NUM_CLASSES).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return model, build_criterion(cfg, NUM_CLASSES), optimizer

    images, targets = _batch(args.batch, args.size, device)
    whole, halves = [(images, targets)], _split(images, targets, 2)
    arms = [
        ("fp32", whole, "fp32", False),
        ("bf16 autocast", whole, "bf16", False),
        ("fp32 + EMA", whole, "fp32", True),
        (f"fp32, 2 x {args.batch // 2} accumulated", halves, "fp32", False),
    ]
    if device.type == "cuda":
        arms.insert(2, ("fp16 autocast + loss scaling", whole, "fp16", False))
    rates = {
        name: _images_per_second(setup, micro, precision, ema, args.repeats, device)
        for name, micro, precision, ema in arms
    }
    print(
        f"{args.preset}, batch {args.batch} x {args.size}^2, device {args.device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} steps\n"
    )
    print("| arm | images/s | vs fp32 |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.2f} | {rate / rates['fp32']:.2f}x |")


if __name__ == "__main__":
    main()
