# SPDX-License-Identifier: Apache-2.0
"""Optional TensorBoard scalars (``train.tensorboard``) under ``<run>/tensorboard/``."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)
SUBDIR = "tensorboard"


def tensorboard_available() -> bool:
    """Whether ``tensorboard``, which ``torch.utils.tensorboard`` needs, is installed."""
    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_wanted(setting: bool | None) -> bool:
    """``train.tensorboard``: True, False, or None = on when the package is installed."""
    if setting is None:
        return tensorboard_available()
    if setting and not tensorboard_available():
        from detrkit.errors import UserError

        raise UserError(
            "train.tensorboard=true needs the tensorboard package: pip install tensorboard "
            "(or detrkit[tensorboard]), or set train.tensorboard=false"
        )
    return setting


class TensorBoardLog:
    """A ``SummaryWriter`` on rank 0 when enabled; every method is a no-op otherwise.

    Args:
        run_dir: the run folder; events go to ``run_dir / "tensorboard"``.
        enabled: write at all (False on ranks other than 0, or when switched off).
    """

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / SUBDIR))
            logger.info("TensorBoard events in %s", Path(run_dir) / SUBDIR)

    def scalars(self, prefix: str, values: Mapping[str, float | None], step: int) -> None:
        """A scalar ``prefix/name`` per number in ``values`` (None values are left out)."""
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
