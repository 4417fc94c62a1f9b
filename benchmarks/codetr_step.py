# SPDX-License-Identifier: Apache-2.0
"""Co-Deformable-DETR train step vs its base, Deformable DETR two-stage, at the same image size.

Co-Deformable-DETR: R50, 300 queries, two-stage + refinement + mixed selection +
look-forward-twice, with the collaborative scheme (RPN + RoI and ATSS auxiliary heads, one
positive-query pass per head). Base: the same detector without the scheme. Random weights, 91
classes, ``--boxes`` boxes per image, one AdamW step per measured step; times interleaved
(A B A B) in one process, median of ``--repeats``. Peak memory: each arm runs one more step in a
fresh subprocess; on the CPU it is the process's maximum RSS minus its RSS just before the first
step (the imports and the model itself are not counted), on CUDA ``max_memory_allocated``.

    python benchmarks/codetr_step.py [--device cpu|cuda] [--size 640] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import torch
from dino_step import Arm, _batch  # noqa: E402  (same folder)

ARMS = {
    "Co-Deformable-DETR R50 (collaborative: RPN + RoI, ATSS, 2 positive-query passes)": (
        "co_deformable_detr_r50_12ep",
        [],
    ),
    "Deformable DETR two-stage R50 (the same detector, no scheme)": (
        "co_deformable_detr_r50_12ep",
        ["model.schemes.collaborative=null"],
    ),
}


def _peak_memory_mib(name: str, size: int, device: str) -> float:
    """One step of arm ``name`` in a fresh process; its peak memory in MiB."""
    done = subprocess.run(
        [sys.executable, __file__, "--measure", name, "--size", str(size), "--device", device],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def _current_rss_kib() -> int:
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith("VmRSS:"))
    return int(line.split()[1])


def _measure(name: str, size: int, device: torch.device) -> None:
    images, targets = _batch(1, size, 10, device)
    arm = Arm(*ARMS[name], device, "fp32")
    if device.type == "cuda":
        arm.step(images, targets)  # warm-up: allocator caches, lazy init
        torch.cuda.reset_peak_memory_stats()
        arm.step(images, targets)
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        before = _current_rss_kib()
        arm.step(images, targets)
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"peak_mib": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.measure:
        _measure(args.measure, args.size, device)
        return
    images, targets = _batch(1, args.size, 10, device)
    arms = {name: Arm(*arm, device, "fp32") for name, arm in ARMS.items()}
    times = {name: [] for name in arms}
    for repeat in range(1 + args.repeats):
        for name, arm in arms.items():
            seconds = arm.step(images, targets)
            if repeat:
                times[name].append(seconds)
    memory = {name: _peak_memory_mib(name, args.size, args.device) for name in arms}
    base = list(ARMS)[1]
    print(f"{args.size}x{args.size}, batch 1, 10 boxes/image, {args.device}, fp32\n")
    print("| model | step (s) | vs base | peak memory of a step (MiB) | vs base |")
    print("|---|---|---|---|---|")
    for name in arms:
        median = statistics.median(times[name])
        ratio = median / statistics.median(times[base])
        print(
            f"| {name} | {median:.2f} | {ratio:.2f}x | {memory[name]:.0f} "
            f"| {memory[name] / memory[base]:.2f}x |"
        )


if __name__ == "__main__":
    main()
