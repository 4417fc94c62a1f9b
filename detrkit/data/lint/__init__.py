# SPDX-License-Identifier: Apache-2.0
"""Dataset linter behind ``detrkit data check``, and the fast part that training runs at start-up.

``check_dataset(path)`` reads every split of a COCO-format folder (or one annotation file) and
reports each kind of problem once, with a count and a few examples; the finding codes and what
each severity means are listed in ``findings``. ``startup_check`` (called by ``open_split``)
runs the checks that need neither a JSON re-read nor an opened image on an opened
``CocoDetection``.

Modules: ``findings`` (codes, severities, messages, report types), ``splits`` (locating the
annotation files and their images), ``table`` (the annotation file as flat arrays),
``annotations`` (id, reference and box checks), ``images`` (image file checks), ``check``
(``check_dataset``), ``startup`` (``startup_check``, ``check_command``).
"""

from detrkit.data.lint.check import check_dataset
from detrkit.data.lint.findings import (
    BOX_TOLERANCE_PX,
    FINDINGS,
    SYSTEMATIC_FRACTION,
    Finding,
    LintReport,
    Severity,
    SplitReport,
)
from detrkit.data.lint.images import missing_files
from detrkit.data.lint.splits import find_splits
from detrkit.data.lint.startup import check_command, startup_check

__all__ = [
    "BOX_TOLERANCE_PX",
    "FINDINGS",
    "SYSTEMATIC_FRACTION",
    "Finding",
    "LintReport",
    "Severity",
    "SplitReport",
    "check_command",
    "check_dataset",
    "find_splits",
    "missing_files",
    "startup_check",
]
