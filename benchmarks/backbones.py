# SPDX-License-Identifier: Apache-2.0
"""Benchmark backbones: forward + backward time and peak memory, with and without checkpointing.

Each backbone returns c3, c4, c5 (the Deformable DETR setting) for one random 512 x 512 image
(``--size``, ``--batch``) in training mode, random weights, stochastic depth off; the loss is the
sum of the mean of every returned map. ResNets keep their usual frozen stem + layer1 and frozen
BatchNorm; transformer backbones train every stage. ``model.backbone.checkpointing`` recomputes
each ResNet layer / Swin block / family-defined unit in the backward pass.

Every (backbone, checkpointing) pair runs in a fresh subprocess, as in ``ms_deform_attn.py``:
one step on a tiny input first (so loading code and the weight gradients do not count), then
peak memory of one step: on the CPU the growth of the peak resident set size, on CUDA
``torch.cuda.max_memory_allocated`` above what is allocated before the step. Times are medians of
``--repeats`` steps after ``--warmup`` steps. "saved" is exact where the peak is coarse: the
bytes of the distinct non-parameter tensors autograd keeps from the forward pass for the backward
pass (``saved_tensors_hooks``); with checkpointing, the recomputed ones are not in it, they exist
one unit at a time during the backward pass. Names not registered (yet) are skipped with a note.
The machine should otherwise be idle: the load average is printed before and after.

Usage::

    .venv/bin/python benchmarks/backbones.py [--device cuda] [--size 512] [--repeats 3]
        [--names resnet50 swin_tiny coat_lite_small mpvit_small]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detrkit.models.backbones import BackboneSpec, backbone_names, build_backbone  # noqa: E402

NAMES = ("resnet50", "swin_tiny", "coat_lite_small", "mpvit_small")
STAGES = ("c3", "c4", "c5")
WARMUP_SIZE = 64


def make_backbone(name: str, checkpointing: bool, device: torch.device) -> torch.nn.Module:
    frozen_stages = 1 if name.startswith("resnet") else 0
    cfg = BackboneSpec(name=name, frozen_stages=frozen_stages, checkpointing=checkpointing)
    return build_backbone(cfg, STAGES).to(device).train()


def step(backbone: torch.nn.Module, pixels: torch.Tensor) -> None:
    """One forward + backward; gradients accumulate into the existing ``.grad`` tensors."""
    outputs = backbone(pixels)
    sum(value.float().mean() for value in outputs.values()).backward()


def saved_bytes(backbone: torch.nn.Module, pixels: torch.Tensor) -> int:
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
        backbone(pixels)
    return sum(storages.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_now(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(name: str, checkpointing: bool, args) -> dict:
    """Peak memory of one step, then median step time, in this (fresh) process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = make_backbone(name, checkpointing, device)
    step(backbone, torch.randn(1, 3, WARMUP_SIZE, WARMUP_SIZE, device=device))
    pixels = torch.randn(args.batch, 3, args.size, args.size, device=device)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = _memory_now(device)
    step(backbone, pixels)
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _memory_now(device)
    for _ in range(args.warmup):
        step(backbone, pixels)
    times = []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        step(backbone, pixels)
        _sync(device)
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in backbone.parameters())
    saved = saved_bytes(backbone, pixels)
    return dict(peak=peak - base, saved=saved, time=statistics.median(times), params=params)


def run_worker(args, name: str, checkpointing: bool) -> dict:
    command = [sys.executable, __file__, "--device", args.device, "--size", str(args.size)]
    command += ["--batch", str(args.batch), "--repeats", str(args.repeats)]
    command += ["--warmup", str(args.warmup), "--worker", name, str(int(checkpointing))]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--names", nargs="+", default=list(NAMES))
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], bool(int(args.worker[1])), args)))
        return

    print(f"device: {args.device}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"input {args.batch}x3x{args.size}x{args.size}, stages {', '.join(STAGES)}; ", end="")
    print(f"warm-up {args.warmup}, repeats {args.repeats}")
    print(f"load average before: {os.getloadavg()[0]:.2f}\n")
    print(
        "| backbone | params (M) | fwd+bwd ms | fwd+bwd ms, checkpointing | time ratio "
        "| peak MiB | peak MiB, checkpointing | memory ratio "
        "| saved MiB | saved MiB, checkpointing |"
    )
    print("|" + "---|" * 10)
    skipped = [name for name in args.names if name not in backbone_names()]
    for name in (n for n in args.names if n not in skipped):
        plain, ckpt = (run_worker(args, name, flag) for flag in (False, True))
        cells = [name, f"{plain['params'] / 1e6:.1f}"]
        cells += [f"{plain['time'] * 1e3:.0f}", f"{ckpt['time'] * 1e3:.0f}"]
        cells += [f"{ckpt['time'] / plain['time']:.2f}x"]
        cells += [f"{plain['peak'] / 2**20:.0f}", f"{ckpt['peak'] / 2**20:.0f}"]
        cells += [f"{ckpt['peak'] / max(plain['peak'], 1):.2f}x"]
        cells += [f"{plain['saved'] / 2**20:.0f}", f"{ckpt['saved'] / 2**20:.0f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if skipped:
        print(f"not registered (skipped): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
