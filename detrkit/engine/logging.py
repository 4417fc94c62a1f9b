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
        with self.path.open("a+b") as handle:
            # A run killed mid-write leaves a torn last line: start a fresh one after it.
            torn = handle.tell() > 0 and _last_byte(handle) != b"\n"
            handle.write((("\n" if torn else "") + json.dumps(clean) + "\n").encode())


def _last_byte(handle) -> bytes:
    handle.seek(-1, 2)
    return handle.read(1)


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSONL file, skipping a line torn by a killed process."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


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
