# SPDX-License-Identifier: Apache-2.0
"""Benchmark the multi-scale deformable attention implementations (reference vs fused).

Shapes follow the paper's Deformable DETR setting: d = 256, 8 heads, 4 points, 4 levels of an
800 x 1066 input at strides 8, 16, 32, 64, i.e. levels (100, 134), (50, 67), (25, 34), (13, 17)
and S = 17821 tokens. "encoder" uses every token as a query (Lq = S), "decoder" 300 queries.
Inputs are realistic: sampling locations are reference points (token centres for the encoder,
random points for the decoder) plus offsets of a few pixels, attention weights a softmax over the
L * P samples of each head.

Peak memory: every (shape, implementation) runs in a fresh subprocess, after one pass over tiny
inputs (so that loading code does not count): on CPU the growth of the peak resident set size
during one forward + backward step, on CUDA ``torch.cuda.max_memory_allocated`` above the
inputs. Times: one subprocess per shape runs each implementation in turn and reports medians
over ``--repeats`` runs after ``--warmup`` runs; forward is timed with inputs that require grad
(the training path). The machine should otherwise be idle: the load average is printed before
and after. The same subprocess compares outputs and gradients, in float32 and in float64.

Usage::

    .venv/bin/python benchmarks/ms_deform_attn.py [--device cuda] [--repeats 5] [--warmup 3]
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
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detrkit.ops.ms_deform_attn import fused_path, ms_deform_attn  # noqa: E402

NUM_HEADS, HEAD_DIM, NUM_POINTS = 8, 32, 4
DECODER_QUERIES = 300


def level_shapes(height: int, width: int, num_levels: int) -> list[tuple[int, int]]:
    """Feature-map sizes of a ``height`` x ``width`` input: strides 8, 16, 32, 64 (4 levels) or
    4, 8, 16, 32, 64 (5 levels, DINO / Co-DINO), each a ceil-halving as ResNet's."""
    shapes, h, w = [], height, width
    for stride in (2, 2):  # the stem and its max-pool: C2 at stride 4
        h, w = -(-h // stride), -(-w // stride)
    for _ in range(5):
        shapes.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return shapes[5 - num_levels :]


LEVEL_SHAPES = level_shapes(800, 1066, 4)


@dataclass(frozen=True)
class Case:
    """One benchmarked shape: encoder (every token a query) or decoder (``queries`` queries)."""

    kind: str
    batch: int
    image: tuple[int, int] = (800, 1066)
    levels: int = 4
    queries: int = DECODER_QUERIES

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return level_shapes(*self.image, self.levels)

    @property
    def num_queries(self) -> int:
        return sum(h * w for h, w in self.shapes) if self.kind == "encoder" else self.queries

    def label(self) -> str:
        return f"{self.kind} {self.image[0]}x{self.image[1]} L{self.levels}"

    def argv(self) -> list[str]:
        return [self.kind, str(self.batch), f"{self.image[0]}x{self.image[1]}"] + [
            str(self.levels),
            str(self.queries),
        ]

    @staticmethod
    def parse(argv: list[str]) -> Case:
        height, width = (int(v) for v in argv[2].split("x"))
        return Case(argv[0], int(argv[1]), (height, width), int(argv[3]), int(argv[4]))


CASES = [
    Case("encoder", 1),
    Case("encoder", 2),
    Case("encoder", 2, image=(640, 640)),
    Case("encoder", 1, image=(640, 640), levels=5),
    Case("decoder", 2),
    Case("decoder", 8),
    Case("decoder", 2, queries=900),
    Case("decoder", 8, queries=900),
    Case("decoder", 2, levels=5, queries=900),
    Case("decoder", 8, levels=5, queries=900),
]
IMPLEMENTATIONS = ("reference", "fused")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(
    kind: str,
    batch: int,
    device: torch.device,
    level_shapes: list[tuple[int, int]] = LEVEL_SHAPES,
    num_queries: int = DECODER_QUERIES,
    seed: int = 0,
) -> dict:
    """Realistic inputs for one case (see module docstring); ``num_queries`` is the decoder's."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(level_shapes)
    sizes = shapes.prod(-1)
    level_start = torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))
    num_tokens, num_levels = int(sizes.sum()), len(level_shapes)
    if kind == "encoder":
        centres = []
        for height, width in level_shapes:
            ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            centres.append(torch.stack(((xs + 0.5) / width, (ys + 0.5) / height), -1).view(-1, 2))
        reference = torch.cat(centres).expand(batch, -1, -1)
    else:
        reference = torch.rand(batch, num_queries, 2, generator=gen) * 0.9 + 0.05
    num_queries = reference.shape[1]
    shape = (batch, num_queries, NUM_HEADS, num_levels, NUM_POINTS)
    # Offsets in pixels of each level: a few pixels around the reference (grid-init scale).
    offsets = torch.randn(*shape, 2, generator=gen) * 2.0
    locations = reference[:, :, None, None, None, :] + offsets / shapes.flip(-1).view(
        1, 1, 1, num_levels, 1, 2
    )
    logits = torch.randn(batch, num_queries, NUM_HEADS, num_levels * NUM_POINTS, generator=gen)
    weights = logits.softmax(-1).view(shape)
    value = torch.randn(batch, num_tokens, NUM_HEADS, HEAD_DIM, generator=gen)
    grad_out = torch.randn(batch, num_queries, NUM_HEADS * HEAD_DIM, generator=gen)
    tensors = dict(value=value, locations=locations, weights=weights, grad_out=grad_out)
    out = {k: v.to(device).contiguous() for k, v in tensors.items()}
    out.update(shapes=shapes.to(device), level_start=level_start.to(device))
    return out


def step(inputs: dict, implementation: str, backward: bool) -> tuple[torch.Tensor, list]:
    leaves = [inputs[k].detach().requires_grad_() for k in ("value", "locations", "weights")]
    out = ms_deform_attn(
        leaves[0], inputs["shapes"], inputs["level_start"], leaves[1], leaves[2], implementation
    )
    if not backward:
        return out, []
    out.backward(inputs["grad_out"])
    return out, [leaf.grad for leaf in leaves]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _elapsed(inputs: dict, implementation: str, backward: bool, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    step(inputs, implementation, backward)
    _sync(device)
    return time.perf_counter() - start


def case_inputs(case: Case, device: torch.device, precision: str) -> dict:
    """:func:`make_inputs` for ``case``, floating tensors in ``precision``."""
    inputs = make_inputs(case.kind, case.batch, device, case.shapes, case.queries)
    dtype = PRECISIONS[precision]
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def worker_memory(case: Case, precision: str, implementation: str, args) -> dict:
    """Peak memory of one forward + backward step, in a fresh process."""
    device = torch.device(args.device)
    # Run every code path once on tiny inputs first, so that loading code and one-time
    # allocations do not count towards the peak (the fused op has a dense and a sparse path).
    for tiny_kind, tiny_queries in (("encoder", 0), ("decoder", 1), ("decoder", 64)):
        tiny = make_inputs(tiny_kind, 1, device, [(6, 8), (3, 4)], tiny_queries)
        step(tiny, implementation, backward=True)
    inputs = case_inputs(case, device, precision)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(inputs, implementation, backward=True)
    _sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return dict(peak=peak)


def worker_time(case: Case, precision: str, args) -> dict:
    """Median times of both implementations, interleaved run by run (A B A B) in one process,
    the path the fused op chose, and the max |difference| of the output and each gradient."""
    device = torch.device(args.device)
    inputs = case_inputs(case, device, precision)
    results = {impl: dict(forward=[], both=[]) for impl in IMPLEMENTATIONS}
    for impl in IMPLEMENTATIONS:
        out, grads = step(inputs, impl, backward=True)  # the numbers to compare
        results[impl].update(out=out.detach().float(), grads=[g.float() for g in grads])
    for backward in (False, True):
        # The allocator takes a few steps to settle on these sizes (glibc raises its mmap
        # threshold as big blocks are freed), so warm up on the measured step itself.
        for _ in range(args.warmup):
            for impl in IMPLEMENTATIONS:
                step(inputs, impl, backward)
        for _ in range(args.repeats):
            for impl in IMPLEMENTATIONS:
                results[impl]["both" if backward else "forward"].append(
                    _elapsed(inputs, impl, backward, device)
                )
    ref, fused = results["reference"], results["fused"]
    summary = {
        f"{impl}_{key}": statistics.median(results[impl][key])
        for impl in IMPLEMENTATIONS
        for key in ("forward", "both")
    }
    summary["path"] = fused_path(
        inputs["value"], inputs["shapes"], inputs["locations"], needs_value_grad=True
    )
    summary["out"] = (fused["out"] - ref["out"]).abs().max().item()
    summary["out_scale"] = ref["out"].abs().max().item()
    for name, a, b in zip(("value", "locations", "weights"), fused["grads"], ref["grads"]):
        summary[name] = (a - b).abs().max().item()
        summary[name + "_scale"] = b.abs().max().item()
    # The same comparison in float64 (relative to each tensor's largest magnitude).
    double = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    exact = [step(double, impl, backward=True) for impl in IMPLEMENTATIONS]
    exact = [[out.detach(), *grads] for out, grads in exact]
    summary["f64"] = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item() for a, b in zip(*exact)
    )
    return summary


def run_worker(args, case: Case, precision: str, task: str) -> dict:
    command = [sys.executable, __file__, "--device", args.device]
    command += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    command += ["--worker", *case.argv(), precision, task]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{case.label()} {precision} {task} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _diff(result: dict, name: str) -> str:
    return f"{result[name]:.1e} ({result[name + '_scale']:.3g})"


HEADER = (
    "| shape | dtype | N | Lq | fused path | ref fwd ms | fused fwd ms | speed-up fwd "
    "| ref fwd+bwd ms | fused fwd+bwd ms | speed-up fwd+bwd | ref peak MiB | fused peak MiB "
    "| memory ratio | max abs diff out (max abs out) | d value | d loc | d attn "
    "| max rel diff f64 |"
)


def table_row(case: Case, precision: str, args) -> str:
    """One Markdown row: peaks from fresh processes, then the interleaved timings."""
    peaks = {impl: run_worker(args, case, precision, impl)["peak"] for impl in IMPLEMENTATIONS}
    t = run_worker(args, case, precision, "time")
    cells = [case.label(), precision, str(case.batch), str(case.num_queries), t["path"]]
    for key in ("forward", "both"):
        ref, fused = t[f"reference_{key}"], t[f"fused_{key}"]
        cells += [f"{ref * 1e3:.1f}", f"{fused * 1e3:.1f}", f"**{ref / fused:.2f}x**"]
    cells += [f"{peaks[impl] / 2**20:.0f}" for impl in IMPLEMENTATIONS]
    cells.append(f"{peaks['fused'] / max(peaks['reference'], 1):.2f}")
    cells += [_diff(t, name) for name in ("out", "value", "locations", "weights")]
    cells.append(f"{t['f64']:.1e}")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=[*PRECISIONS, "both"], default="both")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", choices=["encoder", "decoder"])
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        case, precision, task = Case.parse(args.worker[:5]), args.worker[5], args.worker[6]
        if task == "time":
            print(json.dumps(worker_time(case, precision, args)))
        else:
            print(json.dumps(worker_memory(case, precision, task, args)))
        return

    precisions = list(PRECISIONS) if args.precision == "both" else [args.precision]
    cases = [c for c in CASES if args.kinds is None or c.kind in args.kinds]
    print(f"device: {args.device}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}; warm-up {args.warmup}, ", end="")
    print(f"repeats {args.repeats}, interleaved\n")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for precision in precisions:
        for case in cases:
            print(table_row(case, precision, args), flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print(
        "Diff columns: max |fused - reference| (in parentheses: max |reference|) for the output\n"
        "and the gradients w.r.t. value, locations and attention weights, in the row's dtype;\n"
        "'max rel diff f64': the largest max |fused - reference| / max |reference| over output\n"
        "and gradients in float64. Memory ratio: fused peak / reference peak."
    )


if __name__ == "__main__":
    main()
