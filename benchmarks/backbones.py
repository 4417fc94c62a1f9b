# SPDX-License-Identifier: Apache-2.0
"""Benchmark backbones: forward + backward time and peak memory, with and without checkpointing.

Each backbone returns c3, c4, c5 (the Deformable DETR setting) for one random 512 x 512 image
(``--size``, ``--batch``) in training mode, random weights, stochastic depth off; the loss is the
sum of the mean of every returned map. ResNets keep their usual frozen stem + layer1 and frozen
BatchNorm; transformer backbones train every stage. ``model.backbone.checkpointing`` recomputes
each ResNet layer / Swin block / family-defined unit in the backward pass.

Peak memory: every (backbone, checkpointing) pair runs in a fresh subprocess, as in
``ms_deform_attn.py``: one step on a tiny input first (so loading code and the weight gradients
do not count), then the memory one step needs beyond what is allocated before it: on CUDA
``torch.cuda.max_memory_allocated`` minus ``memory_allocated``, on the CPU the growth of the
peak resident set size. Times: one more subprocess per backbone builds both variants and
alternates them step by step (plain, checkpointing, plain, ...) after ``--warmup`` steps each;
medians of ``--repeats``, the device synchronised around every step. "saved" is exact where the
peak is coarse: the bytes of the distinct non-parameter tensors autograd keeps from the forward
pass for the backward pass (``saved_tensors_hooks``); with checkpointing, the recomputed ones
are not in it, they exist one unit at a time during the backward pass. With ``--precision
bf16`` the forward pass runs under ``torch.autocast(device, bfloat16)`` (and the saved
activations are mostly bf16). Names not registered (yet) are skipped with a note. The machine
should otherwise be idle: the load average is printed before and after.

Usage::

    .venv/bin/python benchmarks/backbones.py [--device cpu|cuda] [--precision fp32|bf16]
        [--size 512] [--batch 1] [--repeats 3] [--warmup 1]
        [--names resnet50 swin_tiny coat_lite_small mpvit_small]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_common_args,
    autocast,
    check_device,
    common_argv,
    header,
    interleaved_times,
    markdown_table,
    medians,
    print_child_result,
    run_child,
    step_peak_mb,
)

from detrkit.models.backbones import BackboneSpec, backbone_names, build_backbone  # noqa: E402

NAMES = ("resnet50", "swin_tiny", "coat_lite_small", "mpvit_small")
STAGES = ("c3", "c4", "c5")
WARMUP_SIZE = 64


def make_backbone(name: str, checkpointing: bool, device: torch.device) -> torch.nn.Module:
    frozen_stages = 1 if name.startswith("resnet") else 0
    cfg = BackboneSpec(name=name, frozen_stages=frozen_stages, checkpointing=checkpointing)
    return build_backbone(cfg, STAGES).to(device).train()


def step(backbone: torch.nn.Module, pixels: torch.Tensor, precision: str = "fp32") -> None:
    """One forward (autocast in bf16) + backward; gradients accumulate into ``.grad``."""
    with autocast(pixels.device, precision):
        outputs = backbone(pixels)
    sum(value.float().mean() for value in outputs.values()).backward()


def saved_bytes(backbone: torch.nn.Module, pixels: torch.Tensor, precision: str) -> int:
    """Bytes of the activations one forward pass saves for backward (parameters excluded)."""
    weights = {
        t.untyped_storage().data_ptr() for t in [*backbone.parameters(), *backbone.buffers()]
    }
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with autocast(pixels.device, precision):
            backbone(pixels)
    return sum(storages.values())


def memory_worker(name: str, checkpointing: bool, args) -> dict:
    """Peak memory of one step, parameters and saved bytes, in this (fresh) process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = make_backbone(name, checkpointing, device)
    step(backbone, torch.randn(1, 3, WARMUP_SIZE, WARMUP_SIZE, device=device), args.precision)
    pixels = torch.randn(args.batch, 3, args.size, args.size, device=device)
    peak = step_peak_mb(lambda: step(backbone, pixels, args.precision), device, steps=1)
    params = sum(p.numel() for p in backbone.parameters())
    saved = saved_bytes(backbone, pixels, args.precision)
    return dict(peak=peak * 2**20, saved=saved, params=params)


def time_worker(name: str, args) -> dict:
    """Median step time of both variants, interleaved, in this (fresh) process."""
    device = torch.device(args.device)
    pixels = torch.randn(args.batch, 3, args.size, args.size, device=device)
    steps = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone = make_backbone(name, checkpointing, device)
        steps[str(int(checkpointing))] = lambda b=backbone: step(b, pixels, args.precision)
    return medians(interleaved_times(steps, device, args.repeats, args.warmup))


def run_worker(args, *worker: str) -> dict:
    argv = [*common_argv(args), "--size", str(args.size), "--batch", str(args.batch)]
    return run_child(__file__, [*argv, "--worker", *worker])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--names", nargs="+", default=list(NAMES))
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    check_device(args.device)
    if args.worker:
        if args.worker[0] == "time":
            print_child_result(time_worker(args.worker[1], args))
        else:
            print_child_result(memory_worker(args.worker[1], bool(int(args.worker[2])), args))
        return

    print(
        header(
            args.device,
            args.precision,
            input=f"{args.batch}x3x{args.size}x{args.size}",
            stages=", ".join(STAGES),
            repeats=f"{args.repeats} (median, interleaved, after {args.warmup} warm-up)",
        )
        + "\n"
    )
    columns = ["backbone", "params (M)", "fwd+bwd ms", "fwd+bwd ms, checkpointing"]
    columns += ["time ratio", "peak MiB", "peak MiB, checkpointing", "memory ratio"]
    columns += ["saved MiB", "saved MiB, checkpointing"]
    rows = []
    skipped = [name for name in args.names if name not in backbone_names()]
    for name in (n for n in args.names if n not in skipped):
        times = run_worker(args, "time", name)
        plain, ckpt = (run_worker(args, "memory", name, flag) for flag in ("0", "1"))
        cells = [name, f"{plain['params'] / 1e6:.1f}"]
        cells += [f"{times['0'] * 1e3:.0f}", f"{times['1'] * 1e3:.0f}"]
        cells += [f"{times['1'] / times['0']:.2f}x"]
        cells += [f"{plain['peak'] / 2**20:.0f}", f"{ckpt['peak'] / 2**20:.0f}"]
        cells += [f"{ckpt['peak'] / max(plain['peak'], 1):.2f}x"]
        cells += [f"{plain['saved'] / 2**20:.0f}", f"{ckpt['saved'] / 2**20:.0f}"]
        rows.append(cells)
    print(markdown_table(columns, rows))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if skipped:
        print(f"not registered (skipped): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
