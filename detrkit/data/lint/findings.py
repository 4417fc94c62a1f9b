# SPDX-License-Identifier: Apache-2.0
"""Finding codes with their severity and message, the report types, and the collector.

``check_dataset`` reports each kind of problem once per split, with a count and a few
examples. Severities:

* **error**: training or evaluation would crash or learn from wrong labels; ``detrkit data
  check`` exits 1.
  ``unreadable_annotations`` (missing / invalid JSON, missing top-level lists),
  ``malformed_entry`` (an image without integer ``id``, ``file_name``, positive ``width`` /
  ``height``; an annotation without integer ``id`` / ``image_id`` / ``category_id`` or a
  4-number ``bbox``), ``bad_categories``, ``duplicate_image_id``, ``duplicate_annotation_id``
  (the evaluator indexes annotations by id and would lose some), ``unknown_category``,
  ``unknown_image_id``, ``missing_images_dir``, ``missing_image``, ``corrupt_image`` (cannot
  be decoded, e.g. truncated), ``size_mismatch`` (the file's size, upright or as stored,
  differs from ``width``/``height``: boxes would land in the wrong place), and
  ``box_outside_image`` when at least ``SYSTEMATIC_FRACTION`` of the boxes are outside (then
  the box format itself is likely wrong, e.g. ``[x1, y1, x2, y2]`` instead of ``[x, y, w, h]``).
* **warning**: the loader handles it in a defined way; check that this is what you want.
  ``empty_image`` (no usable box; kept as a negative, as COCO does), ``degenerate_box`` (zero or
  negative width/height; dropped), ``box_outside_image`` (a few boxes reach more than
  ``BOX_TOLERANCE_PX`` outside their image; clipped, or dropped when nothing is left),
  ``duplicate_file_name``, and the image formats the loader converts to 8-bit RGB:
  ``grayscale``, ``rgba``, ``sixteen_bit``, ``other_mode`` (palette, CMYK, ...) and
  ``exif_rotated`` (turned upright when ``width``/``height`` describe the upright image).
* **info**: ``crowd`` (left out of training, as in COCO), ``unused_category``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
BOX_TOLERANCE_PX = 1.0  # rounding in annotation tools puts box edges a fraction of a pixel out
SYSTEMATIC_FRACTION = 0.05  # this share of boxes outside their image is a format error, not noise

# code -> (severity, message); the message says what the loader does about it.
FINDINGS: dict[str, tuple[Severity, str]] = {
    "unreadable_annotations": ("error", "the annotation file cannot be used"),
    "malformed_entry": (
        "error",
        "entries the loader rejects: images need an integer 'id', a 'file_name' and positive "
        "integer 'width'/'height'; annotations an integer 'id', 'image_id', 'category_id' and "
        "'bbox' = [x, y, w, h] numbers",
    ),
    "bad_categories": ("error", "the 'categories' list is unusable"),
    "duplicate_image_id": ("error", "image ids used by more than one image entry"),
    "duplicate_annotation_id": (
        "error",
        "annotation ids used more than once; the evaluator indexes annotations by id and "
        "would lose some",
    ),
    "unknown_image_id": ("error", "annotations whose image_id is not in 'images'"),
    "unknown_category": ("error", "annotations whose category_id is not in 'categories'"),
    "missing_images_dir": ("error", "no images folder found for this annotation file"),
    "missing_image": ("error", "image files that do not exist; training stops at the first"),
    "corrupt_image": ("error", "image files that cannot be decoded (truncated or damaged)"),
    "size_mismatch": (
        "error",
        "images whose file size (as stored, or upright per EXIF) differs from 'width'/"
        "'height'; their boxes would be misplaced",
    ),
    "box_outside_image": (
        "warning",
        f"boxes reaching more than {BOX_TOLERANCE_PX:g} px outside their image; the loader "
        "clips them, and drops those with nothing left inside",
    ),
    "degenerate_box": (
        "warning",
        "boxes with zero or negative width or height (or NaN); the loader drops them",
    ),
    "empty_image": (
        "warning",
        "images without a usable box (no annotations, or only crowd / empty ones); allowed: "
        "the loader keeps them as negatives, as COCO does",
    ),
    "duplicate_file_name": (
        "warning",
        "files listed by more than one image entry (the picture is trained on twice)",
    ),
    "grayscale": ("warning", "grayscale images; the loader converts them to RGB"),
    "rgba": (
        "warning",
        "images with an alpha channel; the loader drops it (transparent pixels keep their "
        "stored colour)",
    ),
    "sixteen_bit": ("warning", "16-bit or 32-bit images; the loader rescales them to 8-bit RGB"),
    "other_mode": (
        "warning",
        "images in another colour mode (palette, CMYK, ...); the loader converts them to RGB",
    ),
    "exif_rotated": (
        "warning",
        "images with an EXIF orientation; the loader turns them upright when 'width'/"
        "'height' describe the upright image, else uses the stored pixels (as COCO does)",
    ),
    "crowd": ("info", "crowd annotations (iscrowd 1); left out of training, as COCO's tools do"),
    "unused_category": (
        "info",
        "categories without annotations (the detector still gets a class for each)",
    ),
}


@dataclass
class Finding:
    """One kind of problem in one split.

    Attributes:
        severity: "error" (fails the check and training), "warning" or "info".
        code: stable identifier, e.g. "missing_image" (see the module docstring).
        message: what it is and what the loader does about it.
        count: number of affected images, annotations, ids or entries.
        examples: up to ``max_examples`` of them (file names, annotation ids, ...).
    """

    severity: Severity
    code: str
    message: str
    count: int
    examples: list[str] = field(default_factory=list)


@dataclass
class SplitReport:
    """Findings of one annotation file, errors first."""

    split: str
    annotation_file: str
    images_dir: str | None
    num_images: int
    num_annotations: int
    findings: list[Finding]

    def of(self, severity: Severity) -> list[Finding]:
        """The findings of one severity."""
        return [f for f in self.findings if f.severity == severity]


@dataclass
class LintReport:
    """Result of ``check_dataset``: one ``SplitReport`` per annotation file checked."""

    root: str
    images_opened: bool
    splits: list[SplitReport]

    @property
    def has_errors(self) -> bool:
        """True when any split has an error finding (``detrkit data check`` exits 1)."""
        return any(split.of("error") for split in self.splits)

    def findings(self, code: str) -> list[Finding]:
        """Every split's finding with this code."""
        return [f for split in self.splits for f in split.findings if f.code == code]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``detrkit data check --json``)."""
        return {"ok": not self.has_errors, **asdict(self)}


class Collector:
    """Accumulates findings; examples are drawn lazily so a 100k-item finding costs nothing."""

    def __init__(self, max_examples: int) -> None:
        self.max_examples = max_examples
        self.findings: list[Finding] = []

    def add(self, code: str, count: int, examples: Iterable[str], **overrides: str) -> None:
        """A finding with ``FINDINGS[code]``'s severity and message unless overridden."""
        if count > 0:
            severity, message = FINDINGS[code]
            shown = list(itertools.islice(examples, self.max_examples))
            finding = Finding(severity, code, message, int(count), shown)
            self.findings.append(replace(finding, **overrides))

    def add_rows(
        self, code: str, rows: Sequence[int], describe: Callable[[int], str], **overrides: str
    ) -> None:
        """A finding about the items at ``rows``, each example being ``describe(row)``."""
        self.add(code, len(rows), (describe(int(r)) for r in rows), **overrides)

    def sorted(self) -> list[Finding]:
        return sorted(self.findings, key=lambda f: _SEVERITY_ORDER[f.severity])
