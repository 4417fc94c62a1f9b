# SPDX-License-Identifier: Apache-2.0
"""Co-Deformable-DETR train step vs its base, Deformable DETR two-stage, at the same image size.

Co-Deformable-DETR: R50, 300 queries, two-stage + refinement + mixed selection +
look-forward-twice, with the collaborative scheme (RPN + RoI and ATSS auxiliary heads, one
positive-query pass per head). Base: the same detector without the scheme. Random weights, 91
classes, 10 boxes per image, batch 1, one AdamW step per measured step; with ``--precision
bf16`` the forward pass runs under ``torch.autocast(device, bfloat16)``, the criterion and the
backward pass outside it (as in ``dino_step.py``, whose ``Arm`` this script uses). Times
interleaved (A B A B) in one process after ``--warmup`` steps, median of ``--repeats``, the
device synchronised around every timed step. Peak memory: each arm runs two steps in a fresh
subprocess; the peak is what they need beyond the model and its inputs (CUDA:
``max_memory_allocated`` minus ``memory_allocated`` before; CPU: peak RSS minus RSS before), so
the imports and the weights are not counted.

Usage::

    .venv/bin/python benchmarks/codetr_step.py [--device cpu|cuda] [--precision fp32|bf16]
        [--size 640] [--repeats 3] [--warmup 1]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    add_common_args,
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
BOXES = 10


def _peak_memory_mib(name: str, args) -> float:
    """Two steps of arm ``name`` in a fresh process; the memory they need, in MiB."""
    argv = ["--measure", name, "--size", str(args.size), *common_argv(args)]
    return run_child(__file__, argv)["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = check_device(args.device)
    images, targets = _batch(1, args.size, BOXES, device)
    if args.measure:
        arm = Arm(*ARMS[args.measure], device, args.precision)
        peak = step_peak_mb(lambda: arm.step(images, targets), device)
        print_child_result({"peak_mib": peak})
        return
    arms = {name: Arm(*arm, device, args.precision) for name, arm in ARMS.items()}
    steps = {name: (lambda arm=arm: arm.step(images, targets)) for name, arm in arms.items()}
    seconds = medians(interleaved_times(steps, device, args.repeats, args.warmup))
    del arms, steps
    memory = {name: _peak_memory_mib(name, args) for name in ARMS}
    base = list(ARMS)[1]
    print(
        header(
            device,
            args.precision,
            image=f"{args.size}x{args.size}",
            batch=1,
            boxes_per_image=BOXES,
            repeats=f"{args.repeats} (median, interleaved, after {args.warmup} warm-up)",
        )
        + "\n"
    )
    columns = ["model", "step (s)", "vs base", "peak memory of a step (MiB)", "vs base"]
    rows = [
        [
            name,
            f"{seconds[name]:.2f}",
            f"{seconds[name] / seconds[base]:.2f}x",
            f"{memory[name]:.0f}",
            f"{memory[name] / memory[base]:.2f}x",
        ]
        for name in ARMS
    ]
    print(markdown_table(columns, rows))


if __name__ == "__main__":
    main()
