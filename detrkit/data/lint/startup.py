# SPDX-License-Identifier: Apache-2.0
"""The start-up check that ``open_split`` runs before training or evaluation.

``startup_check`` works on the arrays an opened ``CocoDetection`` already holds, so the
annotation file is not parsed twice and no image is opened: missing image files (one directory
listing per folder) and boxes outside their image. Missing files stop the run (it
would crash mid-epoch); the rest, a systematic ``box_outside_image`` included, is one warning
line, so a heuristic never blocks a dataset the loader reads. The loader itself has already
refused unreadable or malformed files, duplicate image ids and unknown image or category ids; it
keeps no annotation ids, so duplicate annotation ids are left to ``detrkit data check``.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from detrkit.data.coco import CocoDetection
from detrkit.data.lint.annotations import extent_findings
from detrkit.data.lint.findings import Collector, Finding
from detrkit.data.lint.images import missing_files
from detrkit.errors import UserError

logger = logging.getLogger(__name__)


def check_command(root: Path | str) -> str:
    """The shell command that lints ``root``, for messages."""
    return f"detrkit data check {shlex.quote(str(root))}"


_STARTUP_BLOCKING = ("missing_image",)  # would crash mid-epoch; the loader handles the rest
# Images without objects are ordinary negatives (COCO train has about a thousand): not worth a
# warning at every start; ``detrkit data check`` still counts them.
_STARTUP_QUIET = ("empty_image",)


def startup_check(dataset: CocoDetection, root: Path | str) -> None:
    """The fast part of ``check_dataset`` on an opened dataset, before training or evaluation.

    Uses the arrays ``dataset`` already holds (no JSON re-read, no image opened): missing image
    files and boxes outside their image (the loader logged the boxes it dropped).

    Raises:
        UserError: image files are missing; one line naming the annotation file and pointing
            to ``detrkit data check``. Other findings are logged as one warning line.
    """
    col = Collector(max_examples=1)
    # The dataset's flat arrays keep the check O(annotations) in numpy instead of one Python
    # call per image.
    names, sizes_wh = dataset.file_names(), dataset.image_sizes_wh()
    boxes, _, offsets = dataset.annotation_arrays()
    boxes_xyxy = boxes.astype(np.float64)
    col.add_rows(
        "missing_image", np.flatnonzero(missing_files(dataset.images_dir, names)), names.__getitem__
    )
    rows = np.repeat(np.arange(len(names)), np.diff(offsets))
    extent_findings(boxes_xyxy, rows, sizes_wh, col, lambda k: names[rows[k]], names.__getitem__)
    blocking = [f for f in col.findings if f.code in _STARTUP_BLOCKING]
    others = [f for f in col.findings if f.code not in _STARTUP_BLOCKING + _STARTUP_QUIET]
    if blocking:
        raise UserError(
            f"{dataset.coco_json}: {_one_line(blocking)}; run `{check_command(root)}` for the "
            "full report"
        )
    if others:
        logger.warning(
            "%s: %s (details: `%s`)", dataset.coco_json, _one_line(others), check_command(root)
        )


def _one_line(findings: Sequence[Finding]) -> str:
    parts = []
    for finding in findings:
        example = f" (e.g. {finding.examples[0]})" if finding.examples else ""
        parts.append(f"{finding.count} {finding.code}{example}")
    return "; ".join(parts)
