# SPDX-License-Identifier: Apache-2.0
"""``check_dataset``: every check on every split of a dataset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detrkit.data.coco import read_coco_json
from detrkit.data.lint.annotations import check_boxes, check_ids, check_references, image_rows
from detrkit.data.lint.findings import Collector, LintReport, SplitReport
from detrkit.data.lint.images import check_files
from detrkit.data.lint.splits import SplitFiles, find_splits
from detrkit.data.lint.table import parse_table
from detrkit.errors import UserError


def check_dataset(
    root: Path,
    splits: Sequence[str] | None = None,
    *,
    open_images: bool = True,
    max_examples: int = 5,
    images_dir: Path | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> LintReport:
    """Check a COCO-format dataset (every split, or ``splits``) or one annotation file.

    Args:
        root: dataset folder as ``resolve_split`` understands it, or one annotation JSON (images
            looked for where ``resolve_split`` would, else next to the file).
        splits: split names to check; default every ``annotations/instances_*.json``.
        open_images: open every image file (decodability, mode, EXIF, size); False checks the
            annotations and that the files exist.
        max_examples: examples kept per finding.
        images_dir: images folder to use instead of the one found.
        workers: threads opening images (default: ``ThreadPoolExecutor``'s).
        progress: show a progress bar on stderr while opening images.

    Raises:
        UserError: ``root`` or a requested split does not exist (usage errors).
    """
    located = find_splits(Path(root), splits, images_dir)
    options = dict(open_images=open_images, workers=workers, progress=progress)
    reports = [_check_split(files, max_examples, options) for files in located]
    return LintReport(str(root), open_images, reports)


def _check_split(files: SplitFiles, max_examples: int, options: dict[str, Any]) -> SplitReport:
    col = Collector(max_examples)
    num_images = num_annotations = 0
    try:
        data = read_coco_json(files.annotation_json)
    except UserError as exc:  # a broken file is this split's finding, not a usage error
        col.add("unreadable_annotations", 1, [str(exc)])
    else:
        num_images, num_annotations = len(data["images"]), len(data["annotations"])
        table = parse_table(data, col)
        del data  # only the flat table is needed; the dict is several times the file size
        rows = image_rows(table)
        check_ids(table, col)
        check_boxes(table, rows, check_references(table, rows, col), col)
        check_files(table, files, col, **options)
    images_dir = str(files.images_dir) if files.images_dir is not None else None
    name, annotation_file = files.name, str(files.annotation_json)
    return SplitReport(name, annotation_file, images_dir, num_images, num_annotations, col.sorted())
