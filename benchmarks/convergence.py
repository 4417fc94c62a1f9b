# SPDX-License-Identifier: Apache-2.0
"""Convergence study: one-to-one vs one-to-many supervision of a tiny Deformable DETR.

Trains the preset ``deformable_detr_tiny`` (ResNet-18 from scratch, D=64, 20 queries, two-stage +
iterative refinement) on the synthetic shapes of ``detrkit/data/synth.py``, four ways, with the
same data, seed, schedule and number of epochs:

* ``one_to_one``: the preset as it is (Hungarian matching only);
* ``hybrid``: + H-DETR hybrid matching, 100 extra one-to-many queries (5x the 20 primary ones,
  as 1500 / 300 in H-DETR) against the targets repeated k = 6 times;
* ``mixed``: + MS-DETR mixed supervision with the schema's default options, and the decoder order
  it needs (cross-attention first); nothing else of the MS-DETR recipe changes;
* ``both``: hybrid + mixed.

``--arms detr smca`` trains the SMCA row next to DETR's: ``detr_tiny`` as is, and the same with
SMCA's Gaussian-modulated cross-attention and focal classification/matching
(docs/methods.md#smca-detr), on the
same data and budget. ``--arms one_to_one_cross_first`` adds a control outside the default
four: one-to-one with the MS-DETR decoder order, which separates the effect of the order from
that of the supervision. ``--arms co_deformable_base co_deformable`` trains Co-Deformable-DETR
(``co_deformable_detr_tiny``: the collaborative RPN/RoI and ATSS heads and their positive
queries) next to the same detector with the scheme off.

Each arm runs in this process through ``detrkit.engine.trainer.Trainer`` (on ``--device``, CPU
by default, with ``train.precision`` set to ``--precision``, fp32 by default: bf16 autocasts the
model's forward, the trainer keeps the losses in fp32) and is
evaluated on the validation split every ``--eval-every`` epochs and at the end. AP and AP50 come
from the ``metrics.jsonl`` the trainer writes in ``OUT/<arm>/``. Training seconds are wall-clock
seconds of the training loop, without evaluations and checkpoint writes (timed separately); the
arms may differ in cost (one-to-many queries are decoded and matched too), so the table reports
seconds per epoch and the figure plots AP against both epochs and training seconds. The learning
rate drops at the same fraction of the run as in the preset (epoch 32 of 40). Timings mean
something only on an otherwise idle machine: with torch's threads on every core, a competing
process can stall single steps by seconds, so the table also gives the median step time and the
load average before and after.

The arms share the seed, the data and its order, but not every initial weight: the extra query
embeddings of ``hybrid`` and the auxiliary FFNs of ``mixed`` draw from the same random stream.

The papers report that one-to-many supervision makes DETRs converge faster; this script only
measures, on a toy dataset and a toy model, and its numbers are reported as measured, whichever
way they go. It runs one seed per arm; rerun with other ``--seed`` values to see how much of a
difference is seed noise.

Writes ``OUT/convergence.json`` (settings, every evaluation and step time),
``OUT/convergence.png`` and ``OUT/<arm>/`` (the trainer's run folder, with its last checkpoint),
and prints a Markdown table. The defaults take about 20 minutes on an idle 2-core machine (about
9 s per epoch per arm)::

    .venv/bin/python benchmarks/convergence.py --epochs 30 --eval-every 3 --images 256 --seed 0 \
        --out runs/convergence

(``--arms hybrid both`` runs a subset; ``--threads`` sets torch's CPU threads; ``--device cuda``
and ``--precision bf16`` train on the GPU / in bf16 autocast.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_device, header  # noqa: E402

from detrkit.config.load import load_config  # noqa: E402
from detrkit.config.schema import ExperimentConfig  # noqa: E402
from detrkit.data.synth import write_synthetic_coco  # noqa: E402
from detrkit.engine.logging import read_jsonl  # noqa: E402
from detrkit.engine.summary import display_epoch  # noqa: E402
from detrkit.engine.trainer import Trainer  # noqa: E402

PRESET = "deformable_detr_tiny"
HYBRID = ("model.schemes.hybrid.num_queries=100", "model.schemes.hybrid.repeat_k=6")
CROSS_FIRST = ("model.decoder.order=[cross_attn,self_attn,ffn]",)
MIXED = ("model.schemes.mixed={}", *CROSS_FIRST)
SMCA = (
    "model.decoder.attention=smca",
    "model.loss.class_loss=sigmoid_focal",
    "model.loss.class_weight=2.0",
    "model.matcher.cost_class=2.0",
    "model.top_k=20",
)
# Arms trained from another preset than ``PRESET``.
ARM_PRESETS = {
    "detr": "detr_tiny",
    "smca": "detr_tiny",
    "co_deformable_base": "co_deformable_detr_tiny",
    "co_deformable": "co_deformable_detr_tiny",
}
ARMS: dict[str, tuple[str, ...]] = {
    "one_to_one": (),
    "hybrid": HYBRID,
    "mixed": MIXED,
    "both": HYBRID + MIXED,
    "one_to_one_cross_first": CROSS_FIRST,
    # SMCA's row next to DETR's: the same tiny DETR with the Gaussian-modulated cross-attention
    # and SMCA's focal classification and matching (docs/methods.md#smca-detr), same data and
    # budget.
    "detr": (),
    "smca": SMCA,
    # Co-Deformable-DETR next to its base: the same tiny two-stage Deformable DETR (look-forward-
    # twice, mixed selection) without and with the collaborative auxiliary heads and their
    # positive queries (the preset's lambda_1 = 1, lambda_2 = 2).
    "co_deformable_base": ("model.schemes.collaborative=null",),
    "co_deformable": (),
}
DEFAULT_ARMS = ("one_to_one", "hybrid", "mixed", "both")
VAL_IMAGES = 64


@dataclass
class ArmResult:
    """One arm's evaluations and timings.

    Attributes:
        evals: one dict per evaluation: epoch, AP, AP50 and the training seconds before it.
        train_seconds: the training loop's wall-clock seconds (no evaluation, no checkpoints).
        step_seconds: the trainer's time of each optimiser step (forward, loss, backward, step).
        eval_seconds, checkpoint_seconds: time spent evaluating and writing checkpoints.
    """

    name: str
    overrides: tuple[str, ...]
    epochs: int
    evals: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    eval_seconds: float = 0.0
    checkpoint_seconds: float = 0.0

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / self.epochs

    @property
    def median_step_seconds(self) -> float:
        return statistics.median(self.step_seconds)

    def to_dict(self) -> dict:
        return dict(
            name=self.name,
            overrides=list(self.overrides),
            evals=self.evals,
            train_seconds=self.train_seconds,
            seconds_per_epoch=self.seconds_per_epoch,
            median_step_seconds=self.median_step_seconds,
            step_seconds=self.step_seconds,
            eval_seconds=self.eval_seconds,
            checkpoint_seconds=self.checkpoint_seconds,
        )


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


def write_data(root: Path, num_train: int, seed: int) -> Path:
    """A fresh synthetic COCO folder (the same arguments always give the same files)."""
    shutil.rmtree(root, ignore_errors=True)
    return write_synthetic_coco(root, num_train, VAL_IMAGES, seed=seed).resolve()


def shared_overrides(arm: str, data_root: Path, args: argparse.Namespace) -> tuple[str, ...]:
    """What every arm changes in the preset: data, seed, schedule, logging of every step."""
    preset = load_config(ARM_PRESETS.get(arm, PRESET)).train
    lr_drop = max(1, round(args.epochs * preset.lr_drop / preset.epochs))
    return (
        f"data.root={data_root}",
        f"train.epochs={args.epochs}",
        f"train.eval_every={args.eval_every}",
        f"train.lr_drop={lr_drop}",
        f"train.seed={args.seed}",
        f"train.precision={args.precision}",
        "train.keep_last=1",
        "train.log_every=1",
    )


def arm_config(arm: str, data_root: Path, args: argparse.Namespace) -> ExperimentConfig:
    """The preset with the study's shared overrides and then the arm's own."""
    preset = ARM_PRESETS.get(arm, PRESET)
    return load_config(preset, [*shared_overrides(arm, data_root, args), *ARMS[arm]])


def run_arm(arm: str, data_root: Path, args: argparse.Namespace) -> ArmResult:
    """Train one arm from scratch in ``OUT/<arm>`` and collect its evaluations."""
    cfg = arm_config(arm, data_root, args)
    run_dir = args.out / arm
    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = TimedTrainer(cfg, run_dir, device=args.device)
    trainer.fit()
    result = ArmResult(
        arm,
        ARMS[arm],
        args.epochs,
        train_seconds=trainer.total_seconds - trainer.eval_seconds - trainer.checkpoint_seconds,
        eval_seconds=trainer.eval_seconds,
        checkpoint_seconds=trainer.checkpoint_seconds,
    )
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        if record.get("kind") == "train":
            result.step_seconds.append(record["seconds"])
        if record.get("kind") == "eval":
            epoch, seconds = record["epoch"], trainer.eval_train_seconds[record["epoch"]]
            result.evals.append(
                dict(epoch=epoch, AP=record["AP"], AP50=record["AP50"], train_seconds=seconds)
            )
    return result


def markdown_table(results: list[ArmResult]) -> str:
    """arm | final AP | final AP50 | best AP | AP at each evaluated epoch | training cost."""
    epochs = sorted({e["epoch"] for r in results for e in r.evals})
    header = ["arm", "final AP", "final AP50", "best AP", *[f"AP @{e}" for e in epochs]]
    header += ["train s/epoch", "median s/step", "train min"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        at = {e["epoch"]: e["AP"] for e in r.evals}
        final = r.evals[-1]
        cells = [r.name, f"{final['AP']:.3f}", f"{final['AP50']:.3f}"]
        cells.append(f"{max(at.values()):.3f}")
        cells += [f"{at[e]:.3f}" if e in at else "-" for e in epochs]
        cells += [f"{r.seconds_per_epoch:.1f}", f"{r.median_step_seconds:.3f}"]
        cells.append(f"{r.train_seconds / 60:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[ArmResult], out_png: Path) -> None:
    """AP against epoch (left) and against training seconds (right), one line per arm."""
    # The object-oriented API with the Agg canvas, as in detrkit/visualize.py.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    by_epoch, by_time = figure.subplots(1, 2, sharey=True)
    for r in results:
        aps = [e["AP"] for e in r.evals]
        by_epoch.plot([e["epoch"] for e in r.evals], aps, marker="o", label=r.name)
        by_time.plot([e["train_seconds"] for e in r.evals], aps, marker="o", label=r.name)
    by_epoch.set(title="AP vs epoch", xlabel="epoch", ylabel="COCO box AP (val)")
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_time.set(title="AP vs training time", xlabel="training seconds (CPU)")
    for axes in (by_epoch, by_time):
        axes.grid(alpha=0.3)
        axes.legend()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, format="png", dpi=100)


def settings(data_root: Path, args: argparse.Namespace) -> dict:
    """The study's shared settings, as saved in the JSON."""
    return dict(
        preset=PRESET,
        overrides=list(shared_overrides("one_to_one", data_root, args)),
        arm_presets=ARM_PRESETS,
        epochs=args.epochs,
        eval_every=args.eval_every,
        train_images=args.images,
        val_images=VAL_IMAGES,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="epochs per arm")
    parser.add_argument("--eval-every", type=int, default=3, help="evaluate every N epochs")
    parser.add_argument("--images", type=int, default=256, help="synthetic training images")
    parser.add_argument("--seed", type=int, default=0, help="data and training seed")
    parser.add_argument("--out", type=Path, default=Path("runs/convergence"))
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(DEFAULT_ARMS))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.epochs < 1 or args.eval_every < 1:
        parser.error("--epochs and --eval-every must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    data_root = write_data(args.out / "data", args.images, args.seed)
    results = []
    for arm in args.arms:
        print(f"training {arm} ...", flush=True)
        results.append(run_arm(arm, data_root, args))
        print(f"  {results[-1].train_seconds:.0f} s training", flush=True)
    load = dict(before=load_before, after=os.getloadavg()[0])
    report = dict(
        settings=settings(data_root, args), load_average=load, arms=[r.to_dict() for r in results]
    )
    (args.out / "convergence.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(results, args.out / "convergence.png")
    print(
        f"\n{', '.join(sorted({ARM_PRESETS.get(a, PRESET) for a in args.arms}))} on "
        f"{args.images} synthetic images ({VAL_IMAGES} val), {args.epochs} epochs, "
        f"seed {args.seed}; 1-minute load average {load['before']:.2f} before, "
        f"{load['after']:.2f} after\n{header(args.device, args.precision)}\n"
    )
    print(markdown_table(results))
    print(
        "\ntrain s/epoch: wall-clock of the training loop (data loading included; evaluations\n"
        "and checkpoint writes excluded); median s/step: median over the trainer's timed steps\n"
        "(forward, matching, loss, backward, optimiser), robust to brief interference.\n"
        f"figure: {args.out / 'convergence.png'}; numbers: {args.out / 'convergence.json'}"
    )


if __name__ == "__main__":
    main()
