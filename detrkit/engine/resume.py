# SPDX-License-Identifier: Apache-2.0
"""What ``--resume`` checks before a run continues from a training state."""

from __future__ import annotations

from pathlib import Path

from detrkit.data.labels import LabelMap
from detrkit.engine.checkpoint import Checkpoint, load_checkpoint
from detrkit.engine.state import CHECKPOINT_DIR
from detrkit.errors import UserError

# Written next to their destination by ``save_checkpoint`` and renamed when complete.
STALE_TEMP_PATTERN = ".*.safetensors.*.tmp"


def read_resume_checkpoint(
    path: Path, label_map: LabelMap, data_root: str, *, needs_ema: bool
) -> Checkpoint:
    """The training checkpoint at ``path``, refused with one clear message when it cannot
    continue this run: weights only, other categories, or no EMA where the config keeps one."""
    checkpoint = load_checkpoint(path)
    if checkpoint.training is None:
        raise UserError(
            f"{path} holds weights only; --resume needs a training state from "
            f"<run>/{CHECKPOINT_DIR}/ (or the run folder), or start from it with --init-from"
        )
    if checkpoint.meta.label_map != label_map:
        raise UserError(
            f"{path} was trained on other categories than {data_root}; "
            "use --init-from to fine-tune on a new label set"
        )
    if needs_ema and not checkpoint.training.ema:
        raise UserError(
            f"{path} has no EMA weights but train.ema_decay is set; resume with the "
            "config it was trained with, or start from it with --init-from"
        )
    return checkpoint


def remove_stale_temp_files(*folders: Path) -> None:
    """Delete the half-written files a killed run leaves behind (never a complete one)."""
    for folder in folders:
        for stale in folder.glob(STALE_TEMP_PATTERN):
            stale.unlink(missing_ok=True)
