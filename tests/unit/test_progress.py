# SPDX-License-Identifier: Apache-2.0
"""Progress: plain lines without a terminal; nothing glues onto a bar on one."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from detrkit.engine.progress import Progress, format_duration


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, keeping what is written."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal():
    """A fake terminal that detrkit's console handler writes to, as in the CLI."""
    stream = _Terminal()
    handler = logging.StreamHandler(stream)
    package = logging.getLogger("detrkit")
    level, package.level = package.level, logging.INFO
    package.addHandler(handler)
    yield stream
    package.removeHandler(handler)
    package.setLevel(level)


def test_plain_lines_every_n_and_at_the_end(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, "detrkit"):
        with Progress(5, "eval", every=2, unit="batch", stream=stream) as progress:
            for _ in range(5):
                progress.update()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split("  ")[0] for line in lines] == [
        "eval 2/5 batches",
        "eval 4/5 batches",
        "eval 5/5 batches",
    ]
    assert lines[-1].endswith("ETA 0:00:00")
    assert stream.getvalue() == ""  # no bar drawn, no carriage returns
    assert not any("\r" in line for line in lines)


def test_disabled_progress_says_nothing(caplog):
    stream = _Terminal()
    with caplog.at_level(logging.INFO, "detrkit"):
        with Progress(3, "eval", every=1, enabled=False, stream=stream) as progress:
            progress.update()
    assert stream.getvalue() == "" and not caplog.records


def _visible_line(output: str, text: str) -> str:
    """The terminal line showing ``text``: what follows the last carriage return before it."""
    (line,) = [line for line in output.split("\n") if text in line]
    return line[: line.index(text)].rsplit("\r", 1)[-1] + text


def _alone(output: str, text: str) -> bool:
    """``text`` is on a line of its own, no bar drawn before it."""
    visible = _visible_line(output, text)
    return "%|" not in visible and "eval" not in visible and "epoch 1/2" not in visible


def test_log_messages_and_warnings_print_above_the_bar(terminal):
    log = logging.getLogger("detrkit.test")
    with Progress(4, "epoch 1/2", every=1, stream=terminal) as progress:
        progress.update("loss 1.000")
        log.warning("step 2: non-finite loss")
        warnings.warn("a library warning", UserWarning, stacklevel=1)
        progress.update("loss 0.900")
    output = terminal.getvalue()
    assert "epoch 1/2" in output and "\r" in output  # the bar was drawn
    for text in ("step 2: non-finite loss", "UserWarning: a library warning"):
        assert _alone(output, text), text
    assert warnings.showwarning.__name__ != "above_bar"  # restored


def test_an_error_does_not_glue_onto_the_bar(terminal):
    with pytest.raises(RuntimeError):
        with Progress(4, "eval", every=1, stream=terminal) as progress:
            progress.update()
            raise RuntimeError("boom")
    terminal.write("detrkit train: error: boom\n")  # what the CLI prints next
    output = terminal.getvalue()
    assert "eval" in output and _alone(output, "detrkit train: error")


def test_format_duration():
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725.2) == "1:02:05"
    assert format_duration(-3) == "0:00:00"
