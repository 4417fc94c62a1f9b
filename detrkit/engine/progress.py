# SPDX-License-Identifier: Apache-2.0
"""Progress of training and evaluation: a tqdm bar on a terminal, plain log lines elsewhere.

Log files and CI logs get no carriage-return redraws: when stderr is not a terminal, progress
is one ordinary log line every ``every`` updates and at the end. On a terminal, detrkit's log
messages and Python warnings are written above the bar (``tqdm.write``), and the bar is cleared
before an error propagates, so no message ever glues onto a half-drawn bar.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from typing import TextIO

from tqdm import tqdm

logger = logging.getLogger(__name__)
PACKAGE_LOGGER = "detrkit"


def format_duration(seconds: float) -> str:
    """``3725.2`` -> ``"1:02:05"`` (hours are not capped)."""
    whole = max(0, round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "h")) else "s")


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default stderr, where detrkit logs) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(getattr(stream, "isatty", lambda: False)())
    except ValueError:  # a closed stream (e.g. a handler left on a replaced sys.stderr)
        return False


def _to_terminal(handler: logging.Handler) -> bool:
    """A console handler: its lines would land on the terminal line the bar is drawn on."""
    return isinstance(handler, logging.StreamHandler) and is_terminal(handler.stream)


class _AboveBar(logging.Handler):
    """Writes what ``inner`` would, through ``tqdm.write`` (clear the bar, write, redraw)."""

    def __init__(self, inner: logging.StreamHandler) -> None:
        super().__init__(inner.level)
        self.inner = inner

    def handle(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.inner.level or not self.inner.filter(record):
            return False
        try:
            tqdm.write(self.inner.format(record), file=self.inner.stream)
        except Exception:  # a logging call must never raise, as logging's own handlers
            self.inner.handleError(record)
        return True


class Progress:
    """Counts ``total`` units of work; use as a context manager so the bar always closes.

    Args:
        total: expected updates.
        desc: what is counted, e.g. "epoch 1/12" or "eval".
        every: without a terminal, log a line every this many updates (and at the last).
        enabled: False draws and logs nothing (ranks other than 0).
        plain_lines: without a terminal, log the lines at all (training turns them off: its own
            log line every ``train.log_every`` steps already tells the progress).
        unit: the unit in the lines, e.g. "step" or "batch".
        stream: where the bar goes and which stream is tested for a terminal (default stderr).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        every: int,
        enabled: bool = True,
        plain_lines: bool = True,
        unit: str = "step",
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.every, self.unit = total, desc, max(1, every), unit
        self.count, self._started = 0, time.perf_counter()
        self._stream = sys.stderr if stream is None else stream
        tty = enabled and is_terminal(self._stream)
        self._lines = enabled and plain_lines and not tty
        self._bar = None
        self._exit = contextlib.ExitStack()
        if tty:
            self._bar = tqdm(
                total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                file=self._stream,
            )  # fmt: skip
            self._redirect_messages()

    def _redirect_messages(self) -> None:
        for owner in (logging.getLogger(PACKAGE_LOGGER), logging.getLogger()):
            original = owner.handlers
            owner.handlers = [_AboveBar(h) if _to_terminal(h) else h for h in original]
            self._exit.callback(setattr, owner, "handlers", original)
        shown, stream = warnings.showwarning, self._stream

        def above_bar(message, category, filename, lineno, file=None, line=None):
            text = warnings.formatwarning(message, category, filename, lineno, line)
            tqdm.write(text.rstrip("\n"), file=file or stream)

        warnings.showwarning = above_bar
        self._exit.callback(setattr, warnings, "showwarning", shown)

    def update(self, postfix: str = "") -> None:
        """One unit done; ``postfix`` (e.g. "loss 1.23") is shown on the bar or the line."""
        self.count += 1
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.update()
        elif self._lines and (self.count % self.every == 0 or self.count == self.total):
            logger.info(self.line(postfix))

    def line(self, postfix: str = "") -> str:
        """``"eval 4/8 batches  0.52 s/batch  ETA 0:00:02"`` (plus ``postfix``)."""
        elapsed = time.perf_counter() - self._started
        rate = elapsed / max(self.count, 1)
        parts = [
            f"{self.desc} {self.count}/{self.total} {_plural(self.unit)}",
            f"{rate:.2f} s/{self.unit}",
            f"ETA {format_duration(rate * self.remaining)}",
        ]
        return "  ".join(parts + ([postfix] if postfix else []))

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.count)

    def close(self) -> None:
        """Clear the bar and restore logging and warnings (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._exit.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
