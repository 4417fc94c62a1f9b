# SPDX-License-Identifier: Apache-2.0
"""What a training run tells its user: metrics.jsonl records, the console, TensorBoard."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from detrkit.config.load import load_config
from detrkit.engine import trainer as trainer_module
from detrkit.engine.logging import read_jsonl
from detrkit.engine.meter import IntervalStats, LossMeter
from detrkit.engine.step import StepResult
from detrkit.engine.summary import display_epoch
from detrkit.engine.tensorboard import TensorBoardLog, tensorboard_wanted
from detrkit.errors import UserError
from tests.conftest import TINY_MODEL_OVERRIDES

TINY = [
    *TINY_MODEL_OVERRIDES,
    "data.train_scales=[64]",
    "data.val_size=64",
    "data.max_size=96",
    "data.batch_size=4",  # 16 images: 4 steps per epoch
    "data.eval_batch_size=4",
    "train.log_every=2",
]
ENGINE = Path(trainer_module.__file__).parent
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@dataclass
class Run:
    """A finished tiny run and what was observed during it."""

    out: Path
    records: list[dict]
    messages: list[str]
    steps: list[dict[str, float]] = field(default_factory=list)  # per step: loss and terms
    transfers: dict[str, int] = field(default_factory=dict)  # engine file -> host transfers


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _in_training_loop(frame) -> bool:
    """Whether ``frame`` runs inside ``Trainer._train_epoch`` (not evaluation or epoch-end
    checkpoints, which are not per step)."""
    while frame is not None:
        if frame.f_code.co_name == "_train_epoch":
            return True
        frame = frame.f_back
    return False


def _count_transfers(monkeypatch, counts: dict[str, int]) -> None:
    """Count device->host reads made from ``detrkit/engine`` files in the training loop."""
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            frame = sys._getframe(1)
            caller = Path(frame.f_code.co_filename)
            if caller.parent == ENGINE and _in_training_loop(frame):
                counts[caller.name] = counts.get(caller.name, 0) + 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)


def _record_steps(monkeypatch, steps: list[dict[str, float]]) -> None:
    real = trainer_module.train_step

    def recording(*args, **kwargs) -> StepResult:
        result = real(*args, **kwargs)
        steps.append({"loss": result.loss, **{k: v.tolist() for k, v in result.terms.items()}})
        return result

    monkeypatch.setattr(trainer_module, "train_step", recording)


def _train(data, out, preset, monkeypatch, *extra, evaluate=True) -> Run:
    cfg = load_config(preset, [f"data.root={data}", *TINY, *extra])
    collect, package = _Collect(), logging.getLogger("detrkit")
    level, package.level = package.level, logging.INFO
    package.addHandler(collect)
    run = Run(out, [], collect.messages)
    try:
        trainer = trainer_module.Trainer(cfg, out, device="cpu")
        if not evaluate:
            monkeypatch.setattr(trainer, "evaluate", dict)
        _record_steps(monkeypatch, run.steps)
        with monkeypatch.context() as patch:
            _count_transfers(patch, run.transfers)
            trainer.fit()
    finally:
        package.removeHandler(collect)
        package.setLevel(level)
    run.records = read_jsonl(out / "metrics.jsonl")
    return run


@pytest.fixture(scope="module")
def detr_run(synthetic_coco, tmp_path_factory) -> Run:
    """detr_tiny for 6 steps (4 per epoch), logging every 2, evaluated at the end."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _train(
            synthetic_coco, tmp_path_factory.mktemp("run"), "detr_tiny", monkeypatch,
            "train.max_steps=6",
        )  # fmt: skip


def _train_records(run: Run) -> list[dict]:
    return [r for r in run.records if r["kind"] == "train"]


def _assert_interval_means(run: Run) -> None:
    """Each record holds the mean of the per-step values since the previous record."""
    previous = 0
    for record in _train_records(run):
        interval = run.steps[previous : record["step"]]
        assert record["steps"] == len(interval) and record["skipped"] == 0
        for name in interval[0]:
            mean = sum(step[name] for step in interval) / len(interval)
            assert record[name] == pytest.approx(mean, rel=1e-6), (record["step"], name)
        previous = record["step"]
    assert previous == len(run.steps)


def test_records_hold_every_term_as_the_interval_mean(detr_run):
    records = _train_records(detr_run)
    assert [r["step"] for r in records] == [1, 2, 4, 6]
    assert {f"main/{t}/d{d}" for t in ("cls", "l1", "giou") for d in (0, 1)} <= set(records[0])
    _assert_interval_means(detr_run)


def test_two_stage_records_the_encoder_group(synthetic_coco, tmp_path, monkeypatch):
    run = _train(
        synthetic_coco, tmp_path, "deformable_detr_tiny", monkeypatch,
        "train.max_steps=3", evaluate=False,
    )  # fmt: skip
    names = set(_train_records(run)[-1])
    assert {"enc/cls/d0", "enc/giou/d0", "main/cls/d0", "main/cls/d1"} <= names
    _assert_interval_means(run)


def test_one_host_transfer_per_step_and_one_per_log_interval(detr_run):
    """The step reads its loss and grad norm once (the finite check needs them); the terms are
    read once per log interval; nothing else on the hot path reads from the device."""
    assert detr_run.transfers == {
        "step.py": len(detr_run.steps),
        "meter.py": len(_train_records(detr_run)),
    }


def test_epochs_are_numbered_from_one(detr_run):
    by_step = {r["step"]: r["epoch"] for r in _train_records(detr_run)}
    assert by_step == {1: 1, 2: 1, 4: 1, 6: 2}
    (epoch,) = [r for r in detr_run.records if r["kind"] == "epoch"]
    assert epoch["epoch"] == 1 and epoch["steps"] == 4 and epoch["loss"] > 0
    (evaluation,) = [r for r in detr_run.records if r["kind"] == "eval"]
    assert evaluation["epoch"] == 2 and evaluation["step"] == 6  # mid-epoch 2, at max_steps
    assert any(m.startswith("epoch 1/40  step 1/6  loss ") for m in detr_run.messages)
    assert any(m.startswith("epoch 1/40 done: mean loss ") for m in detr_run.messages)
    assert any(m.startswith("COCO evaluation after epoch 2 (step 6)") for m in detr_run.messages)
    assert not any("epoch 0" in m for m in detr_run.messages)


def test_display_epoch_converts_the_zero_based_loop_counters():
    assert display_epoch(epoch=0, steps_in_epoch=0) == 0  # before training
    assert display_epoch(epoch=0, steps_in_epoch=3) == 1  # inside the first epoch
    assert display_epoch(epoch=1, steps_in_epoch=0) == 1  # right after the first epoch


def test_start_up_summary_and_random_backbone_warning(detr_run):
    (summary,) = [m for m in detr_run.messages if m.startswith("training run\n")]
    for expected in (
        "DETR, resnet18 backbone (random init), D=32",
        "trainable)",
        "16 train / 8 val images, 3 classes: circle, square, triangle",
        "40 epochs x 4 steps = 160 steps, stopping at step 6 (train.max_steps)",
        "4 per process x 1 process x 1 accumulated = 4 images per step",
        "cpu, 1 process",
        "fp32",
        str(detr_run.out.resolve()),
    ):
        assert expected in summary
    warnings = [m for m in detr_run.messages if "random weights" in m]
    assert len(warnings) == 1 and "--set model.backbone.weights=PATH" in warnings[0]


def test_no_backbone_warning_on_resume(detr_run, synthetic_coco, tmp_path):
    collect, package = _Collect(), logging.getLogger("detrkit")
    level, package.level = package.level, logging.INFO
    package.addHandler(collect)
    try:
        cfg = load_config("detr_tiny", [f"data.root={synthetic_coco}", *TINY])
        checkpoint = sorted((detr_run.out / "checkpoints").glob("checkpoint_*"))[-1]
        trainer_module.Trainer(cfg, tmp_path, resume=checkpoint, device="cpu")
    finally:
        package.removeHandler(collect)
        package.setLevel(level)
    assert not any("random weights" in m for m in collect.messages)
    assert any("resuming after step 6" in m for m in collect.messages)


def test_evaluation_progress_is_plain_lines_without_a_terminal(detr_run):
    lines = [m for m in detr_run.messages if m.startswith("eval ")]
    # 8 val images of 8 sizes: 8 one-size batches; a line every train.log_every = 2
    assert [line.split()[1] for line in lines] == ["2/8", "4/8", "6/8", "8/8"]
    assert not any("\r" in m for m in detr_run.messages)


def test_tensorboard_events_hold_terms_lr_and_ap(detr_run):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(detr_run.out / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/main/cls/d1", "eval/AP", "eval/AP50"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 4, 6]


def test_tensorboard_switch(monkeypatch, tmp_path):
    assert tensorboard_wanted(False) is False
    TensorBoardLog(tmp_path, enabled=False).scalars("train", {"loss": 1.0}, 1)
    assert not (tmp_path / "tensorboard").exists()
    monkeypatch.setattr("detrkit.engine.tensorboard.tensorboard_available", lambda: False)
    assert tensorboard_wanted(None) is False
    with pytest.raises(UserError, match="pip install tensorboard"):
        tensorboard_wanted(True)


def _result(loss: float, finite: bool = True, **terms: float) -> StepResult:
    return StepResult(loss, {k: torch.tensor(v) for k, v in terms.items()}, 1.0, finite)


def test_meter_leaves_non_finite_steps_out_of_the_means():
    meter = LossMeter()
    meter.add(_result(2.0, **{"main/cls/d1": 1.0}), seconds=1.0)
    meter.add(_result(float("nan"), finite=False, **{"main/cls/d1": float("nan")}), seconds=3.0)
    meter.add(_result(4.0, **{"main/cls/d1": 3.0}), seconds=2.0)
    stats = meter.flush()
    assert (stats.steps, stats.skipped, stats.loss, stats.seconds) == (3, 1, 3.0, 2.0)
    assert stats.terms == {"main/cls/d1": 2.0}
    assert meter.steps == 0  # a new interval


def test_console_shows_the_last_main_layer():
    terms = {"main/cls/d9": 1.0, "main/cls/d10": 2.0, "main/l1/d10": 3.0, "enc/cls/d0": 4.0}
    stats = IntervalStats(1, 0, 1.0, 1.0, 1.0, terms)
    assert stats.main_terms() == {"cls": 2.0, "l1": 3.0}
