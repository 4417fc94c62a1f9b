# SPDX-License-Identifier: Apache-2.0
"""Preemption: a training process killed with SIGKILL mid-epoch resumes from its last complete
checkpoint and reproduces the uninterrupted run's losses exactly (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from detrkit.engine.logging import read_jsonl

pytestmark = pytest.mark.slow

SETTINGS = [
    "model.hidden_dim=32",
    "model.num_heads=2",
    "model.num_queries=10",
    "model.encoder.num_layers=1",
    "model.decoder.num_layers=2",
    "data.train_scales=[64,80]",
    "data.val_size=64",
    "data.max_size=96",
    "data.batch_size=2",
    "train.log_every=1",
    "train.epochs=2",
    "train.checkpoint_every=3",
    "train.keep_last=2",
    "train.ema_decay=0.9",
]
TIMEOUT_S = 300


def _command(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "detrkit", "train", "--config", "detr_tiny", "--data", str(data),
        "--output-dir", str(out), "--device", "cpu", *extra, "--set", *SETTINGS,
    ]  # fmt: skip


def _run(argv: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def _losses_after_last_resume(run: Path) -> dict[int, float]:
    losses = {}
    for record in read_jsonl(run / "metrics.jsonl"):
        if record["kind"] == "train":
            losses[record["step"]] = record["loss"]
    return losses


def _kill_after_first_checkpoint(argv: list[str], checkpoints: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + TIMEOUT_S
    while not list(checkpoints.glob("checkpoint_*.safetensors")):
        assert process.poll() is None, "training ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)  # land somewhere in the next steps, possibly inside a checkpoint write
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_sigkill_mid_epoch_then_resume_reproduces_the_uninterrupted_run(synthetic_coco, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_command(synthetic_coco, straight))
    _kill_after_first_checkpoint(_command(synthetic_coco, killed), killed / "checkpoints")
    survivors = sorted((killed / "checkpoints").glob("checkpoint_*.safetensors"))
    assert survivors, "no complete checkpoint survived"
    _run(_command(synthetic_coco, killed, "--resume", str(killed)))
    expected, resumed = _losses_after_last_resume(straight), _losses_after_last_resume(killed)
    assert sorted(resumed) == sorted(expected) == list(range(1, 17))
    for step in expected:
        assert resumed[step] == expected[step], f"step {step}"
    assert not list((killed / "checkpoints").glob(".*.tmp"))
    (resume,) = [r for r in read_jsonl(killed / "metrics.jsonl") if r["kind"] == "resume"]
    assert 0 < resume["step"] < 16  # the kill landed before the end of training
    evals = [read_jsonl(run / "metrics.jsonl")[-1] for run in (straight, killed)]
    assert evals[0]["kind"] == evals[1]["kind"] == "eval"
    assert evals[0]["AP"] == evals[1]["AP"]
