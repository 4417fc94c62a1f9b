# SPDX-License-Identifier: Apache-2.0
"""Shared helpers of the benchmark scripts: flags, device sync, autocast, interleaved timing,
peak memory in a fresh subprocess, the header line and Markdown tables.

Every script takes ``--device cpu|cuda`` and ``--precision fp32|bf16`` (:func:`add_common_args`).
bf16 means ``torch.autocast(device_type, dtype=torch.bfloat16)`` around forward + loss; the
backward pass runs outside autocast, as in training. Timings alternate the compared
implementations (A B A B ...) in one process after warm-up and report the median
(:func:`interleaved_times`); around every timed call the device is synchronised. Peak memory is
measured per implementation in a fresh subprocess (:func:`run_child`, :func:`step_peak_mb`), so
that the implementations do not share one process's peak.

Importing this module puts the repository root on ``sys.path`` (scripts run as
``.venv/bin/python benchmarks/X.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_common_args(
    parser: argparse.ArgumentParser, repeats: int = 3, warmup: int = 1, precision: bool = True
) -> argparse.ArgumentParser:
    """``--device``, ``--precision`` (unless ``precision=False``), ``--repeats``, ``--warmup``."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    if precision:
        parser.add_argument(
            "--precision",
            choices=tuple(PRECISIONS),
            default="fp32",
            help="bf16: torch.autocast(device, bfloat16) around forward + loss",
        )
    parser.add_argument("--repeats", type=int, default=repeats, help="timed runs (median)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed runs first")
    return parser


def common_argv(args: argparse.Namespace) -> list[str]:
    """The common flags of ``args`` as a command line (for a child process)."""
    argv = ["--device", args.device, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if hasattr(args, "precision"):
        argv += ["--precision", args.precision]
    return argv


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device; exits with a message when CUDA is asked for but absent."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    return device


def sync(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: str | torch.device, precision: str):
    """bf16 autocast on ``device`` for ``precision == "bf16"``; a null context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision])


def timed(function: Callable[[], object], device: str | torch.device) -> float:
    """Seconds of one call of ``function``, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    function()
    sync(device)
    return time.perf_counter() - start


def interleaved_times(
    functions: dict[str, Callable[[], object]],
    device: str | torch.device,
    repeats: int,
    warmup: int = 1,
) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of each function, called in turn (A B A B ...) after
    ``warmup`` untimed rounds, so that a change of load on the machine hits all alike."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(timed(function, device))
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(row for row in status if row.startswith(field + ":"))
    return int(line.split()[1])


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0; ignored elsewhere)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")


def step_peak_mb(step: Callable[[], object], device: str | torch.device, steps: int = 2) -> float:
    """MiB that ``steps`` calls of ``step`` need beyond what is in memory before the first.

    On CUDA: ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``) minus
    ``memory_allocated`` before; on the CPU: the process's peak resident set size minus its
    resident size before (so imported libraries, the model and its inputs are not counted, but
    what the first step allocates to keep - gradients, optimiser state - is). The CPU peak is
    ``VmHWM`` of ``/proc/self/status``, reset just before (``/proc/self/clear_refs``); not
    ``ru_maxrss``, which a child process inherits from a large parent across fork + exec.
    Meant to run in a fresh process (:func:`run_child`).
    """
    device = torch.device(device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        _reset_peak_rss()
        before = _status_kib("VmRSS") * 1024
    for _ in range(steps):
        step()
    sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status_kib("VmHWM") * 1024
    return (peak - before) / 2**20


def run_child(script: str | Path, argv: Sequence[str], env: dict | None = None) -> dict:
    """Run ``script`` with ``argv`` in a fresh Python process; the JSON of its last stdout line."""
    command = [sys.executable, str(script), *argv]
    done = subprocess.run(
        command, capture_output=True, text=True, env=dict(os.environ, **(env or {})), check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_child_result(result: dict) -> None:
    """What a child process hands back to :func:`run_child`."""
    print(json.dumps(result), flush=True)


def header(device: str | torch.device, precision: str | None = None, **extra: object) -> str:
    """One line: device (and GPU name), torch version, threads, precision, date, load average."""
    device = torch.device(device)
    name = device.type
    if device.type == "cuda" and torch.cuda.is_available():
        name += f" ({torch.cuda.get_device_name(device)})"
    parts = [f"device {name}", f"torch {torch.__version__}", f"{torch.get_num_threads()} threads"]
    if precision is not None:
        parts.append(precision)
    parts += [f"{key.replace('_', ' ')} {value}" for key, value in extra.items()]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts += [now, f"load average {load_average()}"]
    return "; ".join(parts)


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table; cells are written with ``str``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def matmul_peak_flops(
    device: str | torch.device, precision: str = "fp32", size: int | None = None, runs: int = 5
) -> float:
    """This device's matmul rate in FLOP/s: the best of ``runs`` ``torch.mm`` of two
    ``size`` x ``size`` matrices (2048 on the CPU, 4096 on CUDA) in the precision's dtype, after
    one warm-up; ``2 * size**3`` FLOPs each."""
    device = torch.device(device)
    size = size or (4096 if device.type == "cuda" else 2048)
    dtype = PRECISIONS[precision]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), device) for _ in range(runs))
    return 2 * size**3 / best
