# SPDX-License-Identifier: Apache-2.0
"""Run logging: JSONL metrics file and console set-up (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path


class JsonlWriter:
    """Append one JSON object per line; a no-op on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def setup_console_logging(is_main: bool, verbose: bool = False) -> None:
    """detrkit's messages to stderr: INFO on rank 0, warnings only elsewhere.

    Only the ``detrkit`` logger is configured, so an application's own logging set-up is kept.
    """
    level = (logging.DEBUG if verbose else logging.INFO) if is_main else logging.WARNING
    package_logger = logging.getLogger("detrkit")
    package_logger.setLevel(level)
    if not any(getattr(h, "_detrkit", False) for h in package_logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._detrkit = True
        package_logger.addHandler(handler)
