# SPDX-License-Identifier: Apache-2.0
"""Convergence study: do the training schemes make a DETR learn faster, here, beyond seed noise?

Trains every arm of a suite (``benchmarks/convergence_suites.py``) from scratch with several
seeds, on synthetic data the script writes, and compares each arm with its base:

* ``crowded`` setting: ``detrkit.data.synth_crowded`` (about 9 objects per image, 12
  long-tailed classes, mostly small objects, occlusion, crowds), Deformable DETR two-stage +
  refine with D = 128, 3 + 3 layers, 100 queries; arms one-to-one, + hybrid (H-DETR, 500
  one-to-many queries, k = 6), + mixed (MS-DETR), both, DINO (denoising + mixed query
  selection) against the same two-stage Deformable DETR, Co-Deformable-DETR against its base,
  and the controls: the hybrid queries decoded but not supervised (lambda 0), MS-DETR's decoder
  order alone, DINO without denoising;
* ``tiny`` setting (round 1's): ``detrkit.data.synth`` (one to four large shapes of 3 classes),
  D = 64, 20 queries; one-to-one, hybrid, mixed, both, and SMCA against DETR.

Every arm trains on the same data (dataset seed 0) with ``train.seed`` = each seed of the suite,
for the setting's epochs (learning rate dropped at the preset's fraction of its schedule), and is
evaluated at 1/4, 1/2, 3/4 and the end of its budget. The table gives mean ± standard deviation
over the seeds of AP at 1/4, 1/2 and the full budget, AP50, and the difference to the base arm at
the full budget: called "better" or "worse" only when the means differ by more than the two
standard deviations together. Training seconds exclude evaluations and checkpoint writes; they
mean something only on an otherwise idle machine.

Each run is saved as soon as it ends (``OUT/<setting>/<arm>/seed<k>/result.json`` with its
evaluations, timings and per-epoch loss terms, beside the trainer's ``metrics.jsonl``); a rerun
skips the runs already there (``--fresh`` retrains them), so a suite can be finished in parts.
Writes ``OUT/convergence.json``, ``OUT/convergence.png`` (AP vs epoch and vs seconds, bands of
± one std) and ``OUT/convergence.md`` (the tables), and prints the tables::

    .venv/bin/python benchmarks/convergence.py --suite smoke --jobs 2  # every arm, one seed
    .venv/bin/python benchmarks/convergence.py --suite full --jobs 2   # three seeds per arm

``--jobs 2`` trains two runs at once, each in its own process on one of the two threads: on a
2-core CPU the small ops of these models leave a second thread half idle, so two single-thread
runs finish more work per hour than one run on two threads; every arm runs under the same
condition, so their seconds stay comparable. (``--settings``, ``--arms`` and ``--seeds`` take
subsets; ``--report`` only rebuilds the outputs from the saved runs; ``--device cuda`` and
``--precision bf16`` train on a GPU / in autocast.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_device, header  # noqa: E402
from convergence_report import diagnosis_table, markdown_table, plot  # noqa: E402
from convergence_suites import SUITES, Arm, Setting  # noqa: E402

from detrkit.config.load import load_config  # noqa: E402
from detrkit.config.schema import ExperimentConfig  # noqa: E402
from detrkit.data.synth import write_synthetic_coco  # noqa: E402
from detrkit.data.synth_crowded import write_crowded_coco  # noqa: E402
from detrkit.engine.logging import read_jsonl  # noqa: E402
from detrkit.engine.summary import display_epoch  # noqa: E402
from detrkit.engine.trainer import Trainer  # noqa: E402

DATASETS = {"crowded": write_crowded_coco, "shapes": write_synthetic_coco}
DATA_SEED = 0


class TimedTrainer(Trainer):
    """A Trainer that books the seconds spent in evaluations and checkpoint writes, so that the
    rest of ``fit`` is training time; ``eval_train_seconds`` holds that time at each evaluation."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_seconds, self.checkpoint_seconds, self.total_seconds = 0.0, 0.0, 0.0
        self.eval_train_seconds: dict[int, float] = {}
        self.started = time.perf_counter()

    def fit(self) -> dict | None:
        self.started = time.perf_counter()
        metrics = super().fit()
        self.total_seconds = time.perf_counter() - self.started
        return metrics

    def training_seconds(self) -> float:
        elapsed = time.perf_counter() - self.started
        return elapsed - self.eval_seconds - self.checkpoint_seconds

    def save(self) -> Path | None:
        start = time.perf_counter()
        path = super().save()
        self.checkpoint_seconds += time.perf_counter() - start
        return path

    def evaluate(self) -> dict:
        epoch = display_epoch(self.loop.epoch, self.loop.steps_in_epoch)  # as the eval record
        self.eval_train_seconds[epoch] = self.training_seconds()
        start = time.perf_counter()
        metrics = super().evaluate()
        self.eval_seconds += time.perf_counter() - start
        return metrics


def data_root(setting: Setting, out: Path) -> Path:
    """The setting's synthetic COCO folder, written once (same arguments, same files)."""
    root = out / "data" / f"{setting.dataset}_{setting.train_images}_{setting.val_images}"
    marker = root / "complete"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        DATASETS[setting.dataset](root, setting.train_images, setting.val_images, seed=DATA_SEED)
        marker.write_text("written\n")
    return root.resolve()


def shared_overrides(setting: Setting, arm: Arm, root: Path, seed: int, args) -> tuple[str, ...]:
    """What every arm of a setting changes in its preset: data, size, seed, schedule, logging."""
    preset = load_config(arm.preset).train
    lr_drop = max(1, round(setting.epochs * preset.lr_drop / preset.epochs))
    return (
        f"data.root={root}",
        *setting.model,
        f"train.epochs={setting.epochs}",
        f"train.eval_every={setting.eval_every}",
        f"train.lr_drop={lr_drop}",
        f"train.seed={seed}",
        f"train.precision={args.precision}",
        "train.keep_last=1",
        "train.log_every=1",
    )


def arm_config(setting: Setting, arm: Arm, root: Path, seed: int, args) -> ExperimentConfig:
    """The preset with the setting's overrides and then the arm's own."""
    overrides = [*shared_overrides(setting, arm, root, seed, args), *arm.overrides]
    return load_config(arm.preset, overrides)


def epoch_means(records: list[dict]) -> dict[str, list[float]]:
    """Per-epoch means of every logged scalar of the train records (loss terms per group,
    grad_norm, lr), for diagnosing an arm after the fact."""
    by_epoch: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record.get("kind") != "train":
            continue
        epoch = int(record["epoch"] - 1e-9) if record["epoch"] > 0 else 0
        for key, value in record.items():
            if key not in ("kind", "epoch", "step", "steps", "skipped") and value is not None:
                by_epoch[epoch][key].append(float(value))
    keys = sorted({k for values in by_epoch.values() for k in values})
    epochs = sorted(by_epoch)
    return {
        k: [statistics.fmean(by_epoch[e][k]) if by_epoch[e][k] else None for e in epochs]
        for k in keys
    }


def run_dir_of(out: Path, setting: Setting, arm: Arm, seed: int) -> Path:
    """The folder of one run; its ``result.json`` marks the run as done."""
    return out / setting.name / arm.name / f"seed{seed}"


def train_one(setting: Setting, arm: Arm, seed: int, root: Path, args) -> dict:
    """Train one arm with one seed in its own folder and return (and save) its result."""
    run_dir = run_dir_of(args.out, setting, arm, seed)
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = arm_config(setting, arm, root, seed, args)
    trainer = TimedTrainer(cfg, run_dir, device=args.device)
    trainer.fit()
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r["seconds"] for r in records if r.get("kind") == "train"]
    evals = [
        dict(
            epoch=r["epoch"],
            AP=r["AP"],
            AP50=r["AP50"],
            train_seconds=trainer.eval_train_seconds[r["epoch"]],
        )
        for r in records
        if r.get("kind") == "eval"
    ]
    result = dict(
        setting=setting.name,
        arm=arm.name,
        seed=seed,
        evals=evals,
        train_seconds=trainer.total_seconds - trainer.eval_seconds - trainer.checkpoint_seconds,
        median_step_seconds=statistics.median(steps),
        eval_seconds=trainer.eval_seconds,
        checkpoint_seconds=trainer.checkpoint_seconds,
        per_epoch=epoch_means(records),
    )
    for checkpoint in run_dir.glob("*.safetensors"):
        checkpoint.unlink()  # the study keeps numbers, not weights
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def selected(args) -> tuple[list[Setting], tuple[int, ...]]:
    suite = SUITES[args.suite]
    settings = [s for s in suite["settings"] if not args.settings or s.name in args.settings]
    if args.arms:
        settings = [
            dataclasses.replace(s, arms=tuple(a for a in s.arms if a.name in args.arms))
            for s in settings
        ]
    return settings, tuple(args.seeds or suite["seeds"])


def pending(
    settings: list[Setting], seeds: tuple[int, ...], args
) -> list[tuple[Setting, Arm, int]]:
    """The runs not saved yet, seeds outermost, so that a suite cut short still has every arm
    at the first seeds."""
    runs = []
    for seed in seeds:
        for setting in settings:
            for arm in setting.arms:
                done = (run_dir_of(args.out, setting, arm, seed) / "result.json").exists()
                if args.fresh or not done:
                    runs.append((setting, arm, seed))
    return runs


def run_in_worker(setting: Setting, arm: Arm, seed: int, args) -> dict:
    """One run in a worker process of ``--jobs``, on the worker's share of the CPU threads."""
    torch.set_num_threads(args.threads_per_job)
    return train_one(setting, arm, seed, data_root(setting, args.out), args)


def run_all(settings: list[Setting], seeds: tuple[int, ...], args) -> None:
    """Train every pending run, ``--jobs`` at a time (each in its own process when > 1)."""
    runs = pending(settings, seeds, args)
    for setting in settings:
        data_root(setting, args.out)  # once, before any worker reads it
    if args.jobs == 1:
        for setting, arm, seed in runs:
            print(f"training {setting.name}/{arm.name} seed {seed} ...", flush=True)
            _report_run(train_one(setting, arm, seed, data_root(setting, args.out), args))
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = [
            pool.submit(run_in_worker, setting, arm, seed, args) for setting, arm, seed in runs
        ]
        print(f"training {len(runs)} runs, {args.jobs} at a time ...", flush=True)
        for future in as_completed(futures):
            _report_run(future.result())


def _report_run(result: dict) -> None:
    final = result["evals"][-1]
    print(
        f"  {result['setting']}/{result['arm']} seed {result['seed']}: AP {final['AP']:.3f}, "
        f"{result['train_seconds']:.0f} s training",
        flush=True,
    )


def collect(
    settings: list[Setting], seeds: tuple[int, ...], out: Path
) -> dict[str, dict[str, list[dict]]]:
    """The saved results of the selected runs, by setting and arm."""
    runs: dict[str, dict[str, list[dict]]] = {s.name: {} for s in settings}
    for setting in settings:
        for arm in setting.arms:
            paths = [run_dir_of(out, setting, arm, k) / "result.json" for k in seeds]
            found = [json.loads(p.read_text()) for p in paths if p.exists()]
            if found:
                runs[setting.name][arm.name] = found
    return runs


def describe(setting: Setting) -> dict:
    return dict(
        name=setting.name,
        dataset=setting.dataset,
        train_images=setting.train_images,
        val_images=setting.val_images,
        epochs=setting.epochs,
        eval_every=setting.eval_every,
        model=list(setting.model),
        arms=[dataclasses.asdict(a) for a in setting.arms],
    )


def report(settings: list[Setting], seeds: tuple[int, ...], args, info: dict) -> str:
    """Write the JSON, the figure and the Markdown tables of the saved runs; return the tables."""
    runs = collect(settings, seeds, args.out)
    described = [describe(s) for s in settings]
    tables = []
    for setting in described:
        title = (
            f"**{setting['name']}** ({setting['dataset']} data, {setting['train_images']} train / "
            f"{setting['val_images']} val images, {setting['epochs']} epochs, seeds "
            f"{', '.join(map(str, seeds))})"
        )
        table = markdown_table(setting, runs[setting["name"]])
        losses = diagnosis_table(setting, runs[setting["name"]])
        tables.append(
            f"{title}\n\n{table}\n\nOne-to-one group, last epoch, mean over the seeds:\n\n{losses}"
        )
    text = "\n\n".join(tables)
    summary = dict(
        suite=args.suite,
        seeds=list(seeds),
        settings=described,
        device=args.device,
        precision=args.precision,
        torch=torch.__version__,
        **info,
        runs=runs,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convergence.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "convergence.md").write_text(text + "\n")
    plot(described, runs, args.out / "convergence.png")
    return text


def previous_run_info(out: Path) -> dict | None:
    """Load average, jobs, threads and wall minutes of the last training invocation's report."""
    path = out / "convergence.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    keys = ("load_average", "jobs", "threads_per_run", "wall_minutes")
    return {k: saved[k] for k in keys if k in saved} or None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=tuple(SUITES), default="smoke")
    parser.add_argument("--settings", nargs="+", help="a subset of the suite's settings")
    parser.add_argument("--arms", nargs="+", help="a subset of the arms (by name)")
    parser.add_argument("--seeds", type=int, nargs="+", help="instead of the suite's seeds")
    parser.add_argument("--out", type=Path, help="default runs/convergence/<suite>")
    parser.add_argument("--fresh", action="store_true", help="retrain runs already saved")
    parser.add_argument("--report", action="store_true", help="only rebuild the outputs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, each in its own process"
    )
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    total_threads = args.threads or torch.get_num_threads()
    args.threads_per_job = max(1, total_threads // args.jobs)
    args.out = args.out or Path("runs/convergence") / args.suite
    known = {a.name for s in SUITES[args.suite]["settings"] for a in s.arms}
    unknown = sorted(set(args.arms or ()) - known)
    if unknown:
        parser.error(
            f"--arms: unknown {', '.join(unknown)}; the suite has {', '.join(sorted(known))}"
        )
    return args


def main() -> None:
    args = parse_args()
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings, seeds = selected(args)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    if not args.report:
        run_all(settings, seeds, args)
    threads = args.threads_per_job if args.jobs > 1 else torch.get_num_threads()
    minutes = (time.perf_counter() - started) / 60
    info = dict(
        load_average=dict(before=load_before, after=os.getloadavg()[0]),
        jobs=args.jobs,
        threads_per_run=threads,
        wall_minutes=minutes,
    )
    if args.report:  # keep what the training invocation recorded of itself
        info = previous_run_info(args.out) or info
    text = report(settings, seeds, args, info)
    load = info["load_average"]
    print(
        f"\nsuite {args.suite}: {minutes:.1f} min; 1-minute load average {load['before']:.2f} "
        f"before, {load['after']:.2f} after; {args.jobs} run(s) at a time, {threads} "
        f"thread(s) each\n{header(args.device, args.precision)}\n\n{text}\n\n"
        "Δ AP: arm mean minus base mean at the full budget; verdict: better / worse only when\n"
        "|Δ| exceeds the two arms' standard deviations together (sample std over the seeds).\n"
        f"figure: {args.out / 'convergence.png'}; numbers: {args.out / 'convergence.json'}"
    )


if __name__ == "__main__":
    main()
