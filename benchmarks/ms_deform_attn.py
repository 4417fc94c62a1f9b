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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detrkit.ops.ms_deform_attn import ms_deform_attn  # noqa: E402

LEVEL_SHAPES = [(100, 134), (50, 67), (25, 34), (13, 17)]
NUM_HEADS, HEAD_DIM, NUM_POINTS = 8, 32, 4
DECODER_QUERIES = 300
CASES = [("encoder", 1), ("encoder", 2), ("decoder", 1), ("decoder", 2)]
IMPLEMENTATIONS = ("reference", "fused")


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


def worker_memory(kind: str, batch: int, implementation: str, args) -> dict:
    """Peak memory of one forward + backward step, in a fresh process."""
    device = torch.device(args.device)
    # Run every code path once on tiny inputs first, so that loading code and one-time
    # allocations do not count towards the peak (the fused op has a dense and a sparse path).
    for tiny_kind, tiny_queries in (("encoder", 0), ("decoder", 1), ("decoder", 64)):
        tiny = make_inputs(tiny_kind, 1, device, [(6, 8), (3, 4)], tiny_queries)
        step(tiny, implementation, backward=True)
    inputs = make_inputs(kind, batch, device)
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


def worker_time(kind: str, batch: int, args) -> dict:
    """Median times of both implementations, one after the other in the same process, and the
    max |difference| of the output and of each gradient."""
    device = torch.device(args.device)
    inputs = make_inputs(kind, batch, device)
    results = {}
    for impl in IMPLEMENTATIONS:
        out, grads = step(inputs, impl, backward=True)  # the numbers to compare
        results[impl] = dict(out=out.detach(), grads=grads)
        # The allocator takes a few steps to settle on these sizes (glibc raises its mmap
        # threshold as big blocks are freed), so warm up on the measured step itself.
        for backward in (False, True):
            for _ in range(args.warmup):
                step(inputs, impl, backward)
            times = [_elapsed(inputs, impl, backward, device) for _ in range(args.repeats)]
            results[impl]["both" if backward else "forward"] = times
    ref, fused = results["reference"], results["fused"]
    summary = {
        f"{impl}_{key}": statistics.median(results[impl][key])
        for impl in IMPLEMENTATIONS
        for key in ("forward", "both")
    }
    summary["out"] = (fused["out"] - ref["out"]).abs().max().item()
    summary["out_scale"] = ref["out"].abs().max().item()
    for name, a, b in zip(("value", "locations", "weights"), fused["grads"], ref["grads"]):
        summary[name] = (a - b).abs().max().item()
        summary[name + "_scale"] = b.abs().max().item()
    # The same comparison in float64, and the reference's own float32 rounding error.
    double = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    exact = [step(double, impl, backward=True) for impl in IMPLEMENTATIONS]
    exact = [[out.detach(), *grads] for out, grads in exact]
    summary["f64"] = max((a - b).abs().max().item() for a, b in zip(*exact))
    summary["f32_error"] = (ref["out"].double() - exact[0][0]).abs().max().item()
    return summary


def run_worker(args, *task: str) -> dict:
    command = [sys.executable, __file__, "--device", args.device]
    command += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    result = subprocess.run(
        [*command, "--worker", *task], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _diff(result: dict, name: str) -> str:
    return f"{result[name]:.1e} ({result[name + '_scale']:.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, batch, task = args.worker[0], int(args.worker[1]), args.worker[2]
        if task == "time":
            print(json.dumps(worker_time(kind, batch, args)))
        else:
            print(json.dumps(worker_memory(kind, batch, task, args)))
        return

    print(f"device: {args.device}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"load average before: {os.getloadavg()[0]:.2f}; warm-up {args.warmup}, ", end="")
    print(f"repeats {args.repeats}\n")
    print(
        "| shape | N | Lq | ref fwd ms | fused fwd ms | speed-up fwd | ref fwd+bwd ms "
        "| fused fwd+bwd ms | speed-up fwd+bwd | ref peak MiB | fused peak MiB "
        "| max abs diff out (max abs out) | d value | d loc | d attn "
        "| f32 error of ref out | max abs diff f64 |"
    )
    print("|" + "---|" * 17)
    for kind, batch in CASES:
        num_queries = sum(h * w for h, w in LEVEL_SHAPES) if kind == "encoder" else DECODER_QUERIES
        peaks = {impl: run_worker(args, kind, str(batch), impl)["peak"] for impl in IMPLEMENTATIONS}
        t = run_worker(args, kind, str(batch), "time")
        cells = [kind, str(batch), str(num_queries)]
        for key in ("forward", "both"):
            ref, fused = t[f"reference_{key}"], t[f"fused_{key}"]
            cells += [f"{ref * 1e3:.1f}", f"{fused * 1e3:.1f}", f"{ref / fused:.2f}x"]
        cells += [f"{peaks[impl] / 2**20:.0f}" for impl in IMPLEMENTATIONS]
        cells += [_diff(t, name) for name in ("out", "value", "locations", "weights")]
        cells += [f"{t['f32_error']:.1e}", f"{t['f64']:.1e}"]
        print("| " + " | ".join(cells) + " |", flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    print(
        "Diff columns: max |fused - reference| in float32 (in parentheses: max |reference|) for\n"
        "the output and the gradients w.r.t. value, locations and attention weights; 'f32 error\n"
        "of ref out': max |reference float32 - reference float64| of the output (the rounding\n"
        "floor); 'max abs diff f64': max |fused - reference| over output and gradients in float64."
    )


if __name__ == "__main__":
    main()
