# SPDX-License-Identifier: Apache-2.0
"""User mistakes through the real command line (a subprocess): exit code 2, one line naming
the fix, no traceback; and the two that are no mistakes (resume without --config, --init-from
a run folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from detrkit.cli.__main__ import main
from detrkit.config.load import load_config
from detrkit.engine.logging import read_jsonl
from tests.unit.test_coco2017_labels import official_pth

TINY = [
    "model.hidden_dim=32",
    "model.num_heads=2",
    "model.num_queries=10",
    "model.encoder.num_layers=1",
    "model.decoder.num_layers=1",
    "data.train_scales=[64]",
    "data.val_size=64",
    "data.max_size=96",
    "data.batch_size=4",
    "data.eval_batch_size=4",
]
# A machine with CUDA has "cuda", but not a 100th GPU.
MISSING_CUDA = "cuda:99" if torch.cuda.is_available() else "cuda"


@pytest.fixture(scope="module")
def run(synthetic_coco, tmp_path_factory):
    """A two-step run of a tiny DETR (trained in-process: cheaper than a subprocess)."""
    out = tmp_path_factory.mktemp("errors_run")
    argv = ["train", "--config", "detr_tiny", "--data", str(synthetic_coco)]
    argv += ["--output-dir", str(out), "--device", "cpu", "--set", *TINY, "train.max_steps=2"]
    assert main(argv) == 0
    return out


def _cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "detrkit", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def _broken_checkpoint(run, tmp_path):
    """The run's checkpoint cut to its first kilobyte, as a full disk or a killed copy leaves it."""
    (checkpoint,) = (run / "checkpoints").glob("checkpoint_*.safetensors")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(checkpoint.read_bytes()[:1024])
    return broken


# name -> (argv builder, command, text the one line must contain)
MISTAKES = {
    "resume_missing": (
        lambda run, data, tmp: ["train", "--resume", tmp / "no_such_run"],
        "train",
        "no_such_run: no such checkpoint file or run folder",
    ),
    "resume_corrupt": (
        lambda run, data, tmp: ["train", "--resume", _broken_checkpoint(run, tmp)],
        "train",
        "broken.safetensors: corrupt or not safetensors",
    ),
    "convert_wrong_family": (
        lambda run, data, tmp: [
            "convert",
            "--from",
            "deformable_detr",
            official_pth(tmp, "detr_r18"),
            "--out",
            tmp / "x.safetensors",
        ],
        "convert",
        "looks like a 'detr'",
    ),
    "device_without_cuda": (
        lambda run, data, tmp: [
            *("train", "--config", "detr_tiny", "--data", data, "--output-dir", tmp / "o"),
            *("--device", MISSING_CUDA),
        ],
        "train",
        f"--device {MISSING_CUDA}: ",
    ),
    "unknown_device": (
        lambda run, data, tmp: ["eval", "--checkpoint", run, "--data", data, "--device", "gpu"],
        "eval",
        "--device gpu: unknown device; valid: cpu, cuda, cuda:N, mps",
    ),
    "predict_missing_image": (
        lambda run, data, tmp: [
            *("predict", tmp / "no_such.jpg", "--checkpoint", run),
            *("--output-dir", tmp / "predicted"),
        ],
        "predict",
        "no_such.jpg",
    ),
    "eval_missing_data": (
        lambda run, data, tmp: ["eval", "--checkpoint", run, "--data", tmp / "missing"],
        "eval",
        "missing: no such folder",
    ),
    "train_without_output_dir": (
        lambda run, data, tmp: ["train", "--config", "detr_tiny", "--data", data],
        "train",
        "--output-dir is required",
    ),
}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_mistake_is_one_line_and_exit_code_2(name, run, synthetic_coco, tmp_path):
    build, command, needle = MISTAKES[name]
    done = _cli(*build(run, synthetic_coco, tmp_path))
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"detrkit {command}: error: ") and needle in lines[0], lines[0]


def test_resume_without_config_continues_with_the_stored_config(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    # No --config, --data nor --output-dir: all three come from the run.
    done = _cli("train", "--resume", copy, "--device", "cpu", "--set", "train.max_steps=3")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert (copy / "checkpoints" / "checkpoint_00000003.safetensors").is_file()
    resumed = [r for r in read_jsonl(copy / "metrics.jsonl") if r["kind"] == "resume"]
    assert [r["step"] for r in resumed] == [2]
    # The tiny model of the run, not the default preset's (hidden_dim 256).
    stored = load_config(str(copy / "config.yaml"))
    assert stored.model.hidden_dim == 32 and stored.train.max_steps == 3


def test_init_from_accepts_a_run_folder(run, synthetic_coco, tmp_path):
    out = tmp_path / "finetuned"
    done = _cli(
        *("train", "--config", "detr_tiny", "--data", synthetic_coco, "--output-dir", out),
        *("--init-from", run, "--device", "cpu", "--set", *TINY, "train.max_steps=1"),
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--config", "nosuchpreset", "--output-dir", "x"], "one per family: "),
        (["train", "--config", "detr_tiy", "--output-dir", "x"], "(nearest first): detr_tiny"),
        (["train", "--config", "detr_tiny", "--output-dir", "x", "--set", "bad.key=1"], "bad.key"),
        (["train", "--config", "detr_tiny", "--output-dir", "x"], "pass --data DIR"),
        (["train", "--init-from", "no_such_run", "--output-dir", "x"], "--init-from no_such_run"),
    ],
)
def test_config_mistakes_are_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is written, but "x" stays out of the checkout
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("detrkit train: error: ") and needle in lines[0]
