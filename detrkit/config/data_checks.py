# SPDX-License-Identifier: Apache-2.0
"""Data config checks that the types alone cannot express: values are refused when the config
is loaded, with a message naming the key to change."""

from __future__ import annotations

import math

from detrkit.config.schema import DataConfig
from detrkit.errors import UserError


def validate_data_config(cfg: DataConfig, source: str) -> None:
    """Raise ``UserError`` for an LSJ canvas below one pixel or an empty / non-positive LSJ
    scale range (checked whatever ``data.augmentation`` is, so a typo never waits for the
    day the key is used)."""
    if cfg.lsj_size < 1:
        raise UserError(
            f"data.lsj_size={cfg.lsj_size} in {source} must be at least 1 (1024 in Co-DINO)"
        )
    low, high = cfg.lsj_scale_range
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise UserError(
            f"data.lsj_scale_range={[low, high]} in {source} must be [min, max] with "
            "0 < min <= max ([0.1, 2.0] in Co-DINO)"
        )
