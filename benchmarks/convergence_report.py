# SPDX-License-Identifier: Apache-2.0
"""Statistics, the Markdown table and the figure of ``benchmarks/convergence.py``.

Each run (one arm, one seed) is a dict as ``convergence.py`` writes it: ``evals`` (one dict per
evaluation with epoch, AP, AP50 and the training seconds before it) and timings. Over the seeds
of an arm this module reports mean and sample standard deviation; an arm *differs* from its base
only when the two means are further apart than the sum of the two standard deviations (with one
seed, no spread is known and no difference is called).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (0 for one value) of ``n`` values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        values = list(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, len(values))

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}" if self.n > 1 else f"{self.mean:.3f}"


def metric_at(runs: list[dict], epoch: int, key: str) -> Stat | None:
    """``key`` (AP, AP50) at ``epoch`` over the runs that evaluated there."""
    values = [e[key] for r in runs for e in r["evals"] if e["epoch"] == epoch]
    return Stat.of(values) if values else None


def verdict(arm: Stat, base: Stat) -> str:
    """ "better" / "worse" when the means differ by more than the two spreads together."""
    if arm.n < 2 or base.n < 2:
        return "one seed: not called"
    gap = arm.mean - base.mean
    if abs(gap) <= arm.std + base.std:
        return "within spread"
    return "better" if gap > 0 else "worse"


def budget_epochs(epochs: int) -> list[int]:
    """The epochs at 1/4, 1/2 and all of the budget (distinct, in order)."""
    return sorted({max(1, round(epochs * f)) for f in (0.25, 0.5)} | {epochs})


def markdown_table(setting: dict, runs: dict[str, list[dict]]) -> str:
    """One row per arm: AP at 1/4, 1/2 and the full budget, final AP50, the difference to its
    base at the full budget with the verdict, and the training cost."""
    marks = budget_epochs(setting["epochs"])
    fractions = ["¼", "½", "full"][-len(marks) :]
    head = ["arm", "seeds", *[f"AP @{f} ({e} ep)" for f, e in zip(fractions, marks, strict=True)]]
    head += ["AP50 (full)", "base", "Δ AP (full)", "verdict", "train s/epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in setting["arms"]:
        arm_runs = runs.get(arm["name"], [])
        if not arm_runs:
            continue
        cells = [arm["name"], str(len(arm_runs))]
        cells += [str(metric_at(arm_runs, e, "AP") or "-") for e in marks]
        cells.append(str(metric_at(arm_runs, marks[-1], "AP50") or "-"))
        cells += comparison(arm, runs, marks[-1])
        seconds = Stat.of([r["train_seconds"] / setting["epochs"] for r in arm_runs])
        cells.append(f"{seconds.mean:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison(arm: dict, runs: dict[str, list[dict]], epoch: int) -> list[str]:
    """[base, Δ AP, verdict] cells of ``arm`` at ``epoch``."""
    base = arm.get("base")
    if not base or not runs.get(base):
        return ["-", "-", "-"]
    ours, theirs = metric_at(runs[arm["name"]], epoch, "AP"), metric_at(runs[base], epoch, "AP")
    if ours is None or theirs is None:
        return [base, "-", "-"]
    return [base, f"{ours.mean - theirs.mean:+.3f}", verdict(ours, theirs)]


def _band(axes, xs: list[float], stats: list[Stat], label: str, dashed: bool) -> None:
    means = [s.mean for s in stats]
    style = "--" if dashed else "-"
    (line,) = axes.plot(xs, means, style, marker="o", markersize=3, label=label)
    if any(s.n > 1 for s in stats):
        low = [s.mean - s.std for s in stats]
        high = [s.mean + s.std for s in stats]
        axes.fill_between(xs, low, high, color=line.get_color(), alpha=0.15)


def curves(arm_runs: list[dict]) -> tuple[list[int], list[Stat], list[float]]:
    """Epochs evaluated by every run, AP over the runs at each, mean training seconds."""
    epochs = sorted(set.intersection(*[{e["epoch"] for e in r["evals"]} for r in arm_runs]))
    aps = [metric_at(arm_runs, e, "AP") for e in epochs]
    seconds = [
        statistics.fmean(
            e["train_seconds"] for r in arm_runs for e in r["evals"] if e["epoch"] == ep
        )
        for ep in epochs
    ]
    return epochs, aps, seconds


def plot(settings: list[dict], runs: dict[str, dict[str, list[dict]]], out_png: Path) -> None:
    """One row per setting: AP vs epoch (left) and vs training seconds (right), mean over the
    seeds with a band of ± one standard deviation."""
    # The object-oriented API with the Agg canvas, as in detrkit/visualize.py.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.2 * len(settings)), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(settings), 2, squeeze=False)
    for (by_epoch, by_time), setting in zip(grid, settings, strict=True):
        for arm in setting["arms"]:
            arm_runs = runs[setting["name"]].get(arm["name"])
            if not arm_runs:
                continue
            epochs, aps, seconds = curves(arm_runs)
            control = arm.get("claim", "").startswith("control")  # controls dashed
            _band(by_epoch, epochs, aps, arm["name"], control)
            _band(by_time, seconds, aps, arm["name"], control)
        name = setting["name"]
        by_epoch.set(title=f"{name}: AP vs epoch", xlabel="epoch", ylabel="COCO box AP (val)")
        by_time.set(title=f"{name}: AP vs training time", xlabel="training seconds (CPU)")
        for axes in (by_epoch, by_time):
            axes.grid(alpha=0.3)
        by_time.legend(fontsize=7, ncol=2)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, format="png", dpi=100)


def last_layer_terms(per_epoch: dict[str, list], group: str = "main") -> dict[str, str]:
    """The names of ``group``'s final-layer terms (``main/cls/d2`` ...) among the logged keys, by
    term."""
    found: dict[str, tuple[int, str]] = {}
    for key in per_epoch:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == group and parts[2].startswith("d"):
            layer = int(parts[2][1:])
            if parts[1] not in found or layer > found[parts[1]][0]:
                found[parts[1]] = (layer, key)
    return {term: key for term, (_, key) in sorted(found.items())}


def diagnosis_table(setting: dict, runs: dict[str, list[dict]]) -> str:
    """One row per arm: the one-to-one group's final-layer training losses and the gradient
    norm in the last epoch, mean over the seeds (before the term weights). An arm whose extra
    supervision slows the one-to-one branch shows it here as higher main-group losses."""
    rows, terms = [], None
    for arm in setting["arms"]:
        arm_runs = runs.get(arm["name"], [])
        if not arm_runs:
            continue
        names = last_layer_terms(arm_runs[0]["per_epoch"])
        terms = terms or list(names)
        cells = [arm["name"]]
        for term in terms:
            values = [r["per_epoch"][names[term]][-1] for r in arm_runs if term in names]
            cells.append(f"{statistics.fmean(values):.3f}" if values else "-")
        norms = [r["per_epoch"]["grad_norm"][-1] for r in arm_runs if "grad_norm" in r["per_epoch"]]
        cells.append(f"{statistics.fmean(norms):.2f}" if norms else "-")
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = ["arm", *[f"main {t} (last layer)" for t in terms or ()], "grad norm"]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows])
