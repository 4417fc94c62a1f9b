# SPDX-License-Identifier: Apache-2.0
"""Capture and restore everything a run needs to continue exactly (RNGs, loop counters), and
where a run folder keeps its files:

* ``<run>/model.safetensors``: the latest weights, for inference or fine-tuning;
* ``<run>/model_ema.safetensors``: their exponential moving average (``train.ema_decay`` set);
* ``<run>/checkpoints/checkpoint_<step>.safetensors``: the last ``train.keep_last`` training
  states, for exact ``--resume``.
"""

from __future__ import annotations

import functools
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_PATTERN = "checkpoint_*.safetensors"
CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "model_ema.safetensors"


@dataclass
class LoopState:
    """Counters saved in training checkpoints: the next epoch to run and the position inside it."""

    epoch: int = 0
    step: int = 0
    steps_in_epoch: int = 0
    nonfinite_streak: int = 0


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"checkpoint_{step:08d}.safetensors"


def latest_checkpoint(path: Path) -> Path | None:
    """``path`` itself if a file, else the newest training checkpoint inside the folder (or its
    ``checkpoints/`` sub-folder); None when there is none."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (path, path / CHECKPOINT_DIR):
        found = sorted(folder.glob(CHECKPOINT_PATTERN))
        if found:
            return found[-1]
    return None


def inference_checkpoint(path: Path) -> Path | None:
    """The file to run inference with: ``path`` itself if a file; for a run folder its
    ``model_ema.safetensors``, else ``model.safetensors``, else its newest training checkpoint
    (runs written before the weights files existed); None when the folder has none of these."""
    path = Path(path)
    if path.is_file():
        return path
    for name in (EMA_FILE, MODEL_FILE):
        if (path / name).is_file():
            return path / name
    return latest_checkpoint(path)


@functools.cache  # a subprocess: once per process, not once per checkpoint
def git_sha() -> str:
    """HEAD of the detrkit checkout, "unknown" when not run from one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
