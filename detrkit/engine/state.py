# SPDX-License-Identifier: Apache-2.0
"""Capture and restore everything a run needs to continue exactly: RNGs and loop counters."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_PATTERN = "checkpoint_*.safetensors"


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
    """``path`` itself if a file, else the newest checkpoint inside the folder (or its
    ``checkpoints/`` sub-folder)."""
    if path.is_file():
        return path
    for folder in (path, path / "checkpoints"):
        found = sorted(folder.glob(CHECKPOINT_PATTERN))
        if found:
            return found[-1]
    return None


def git_sha() -> str:
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
