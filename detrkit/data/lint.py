# SPDX-License-Identifier: Apache-2.0
"""Dataset linter behind ``detrkit data check``, and the fast part that training runs at start-up.

``check_dataset(path)`` reads every split of a COCO-format folder (or one annotation file) and
reports each kind of problem once, with a count and a few examples. Severities:

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

The start-up check (``startup_check``, called by ``open_split``) works on the arrays an opened
``CocoDetection`` already holds, so the annotation file is not parsed twice and no image is
opened: missing image files (one directory listing per folder), boxes outside their image and
empty images. Missing files stop the run (it would crash mid-epoch); the rest, a systematic
``box_outside_image`` included, is one warning line, so a heuristic never blocks a dataset the
loader reads. The loader itself has already refused unreadable or malformed files, duplicate
image ids and unknown image or category ids; it keeps no annotation ids, so duplicate
annotation ids are left to ``detrkit data check``.

The file is over the 400-line guide because its three parts (annotation checks, image checks,
start-up check) share the finding table, the collector and the flat annotation table; split it
into a ``lint/`` package if it grows further.
"""

from __future__ import annotations

import itertools
import logging
import os
import shlex
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from detrkit.data.coco import CocoDetection, read_coco_json, resolve_split
from detrkit.data.images import exif_orientation
from detrkit.data.labels import LabelMap
from detrkit.errors import UserError

logger = logging.getLogger(__name__)

Severity = Literal["error", "warning", "info"]
_SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
BOX_TOLERANCE_PX = 1.0  # rounding in annotation tools puts box edges a fraction of a pixel out
SYSTEMATIC_FRACTION = 0.05  # this share of boxes outside their image is a format error, not noise
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_MODE_CODES = {"L": "grayscale", "1": "grayscale", "I": "sixteen_bit", "F": "sixteen_bit"}
_MODE_CODES |= dict.fromkeys(("RGBA", "RGBa", "LA", "La", "PA"), "rgba")
_MODE_CODES |= dict.fromkeys(("I;16", "I;16B", "I;16L", "I;16N"), "sixteen_bit")
_REPR_LIMIT = 80

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


class _Collector:
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


@dataclass(frozen=True)
class _SplitFiles:
    name: str
    annotation_json: Path
    images_dir: Path | None  # None: no images folder was found


@dataclass
class _Table:
    """The well-formed entries of one annotation file as flat arrays (A annotations, I images)."""

    file_names: list[str]  # [I]
    image_ids: np.ndarray  # [I] int64
    sizes_wh: np.ndarray  # [I, 2] int64, (width, height) from the file
    ann_ids: np.ndarray  # [A] int64
    ann_image_ids: np.ndarray  # [A] int64
    ann_category_ids: np.ndarray  # [A] int64
    boxes_xywh: np.ndarray  # [A, 4] float64, COCO [x, y, w, h] in pixels
    crowd: np.ndarray  # [A] bool
    categories: LabelMap | None  # None when 'categories' is unusable

    def image(self, row: int) -> str:
        return self.file_names[row]

    def annotation(self, index: int) -> str:
        return f"annotation id {int(self.ann_ids[index])}"


# ---------------------------------------------------------------------------- locating splits


def find_splits(
    path: Path, splits: Sequence[str] | None = None, images_dir: Path | None = None
) -> list[_SplitFiles]:
    """The annotation files under ``path`` (a COCO folder or one JSON file) and their images.

    Raises:
        UserError: ``path`` does not exist, holds no ``annotations/instances_*.json`` or lacks
            a split asked for (usage mistakes, exit code 2).
    """
    path = Path(path)
    if path.is_file():
        return [_json_split(path, images_dir)]
    if not path.is_dir():
        raise UserError(f"{path} does not exist; pass a COCO-format folder or annotation file")
    if not splits:
        found = sorted((path / "annotations").glob("instances_*.json"))
        splits = [p.name.removeprefix("instances_").removesuffix(".json") for p in found]
    if not splits:
        raise UserError(
            f"no annotation files under {path}: expected annotations/instances_<split>.json"
        )
    return [_folder_split(path, name, images_dir) for name in splits]


def _folder_split(root: Path, name: str, images_dir: Path | None) -> _SplitFiles:
    try:
        found_images, annotation = resolve_split(root, name)
    except UserError:
        annotation = root / "annotations" / f"instances_{name}.json"
        if not annotation.is_file():
            raise
        found_images = None  # the JSON exists, its images do not: a finding, not a usage error
    return _SplitFiles(name, annotation, images_dir or found_images)


def _json_split(path: Path, images_dir: Path | None) -> _SplitFiles:
    """Images of a lone JSON file: where ``resolve_split`` would look, else next to the file."""
    name = path.stem.removeprefix("instances_")
    in_annotations = path.parent.name == "annotations"
    root = path.parent.parent if in_annotations else path.parent
    candidates = [root / name, root / "images" / name, root / "images"]
    candidates += [] if in_annotations else [root]
    found = next((c for c in candidates if c.is_dir()), None)
    return _SplitFiles(name, path, images_dir or found)


# ---------------------------------------------------------------------------- parsing


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


def _parse_images(images: Sequence[Any]) -> tuple[list[tuple], list[int]]:
    """-> [(id, file_name, width, height)] of the well-formed entries, indices of the others."""
    good, bad = [], []
    for index, image in enumerate(images):
        try:
            entry = (image["id"], image["file_name"], image["width"], image["height"])
        except (KeyError, TypeError, IndexError):
            bad.append(index)
            continue
        ok = type(entry[0]) is int and isinstance(entry[1], str)
        if ok and all(type(v) is int and v > 0 for v in entry[2:]):
            good.append(entry)
        else:
            bad.append(index)
    return good, bad


def _parse_annotations(annotations: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """-> [A, 4] int64 (id, image_id, category_id, iscrowd), [A, 4] float64 bboxes, and the
    indices of malformed entries. Plain type tests only: COCO train has 860k annotations."""
    fields, bboxes, bad = [], [], []
    get = itemgetter("id", "image_id", "category_id", "bbox")
    for index, ann in enumerate(annotations):
        try:
            ann_id, image_id, category_id, bbox = get(ann)
            crowd = bool(ann.get("iscrowd", 0))
        except (KeyError, TypeError, IndexError, AttributeError):
            bad.append(index)
            continue
        ok = type(ann_id) is int and type(image_id) is int and type(category_id) is int
        if ok and type(bbox) is list and len(bbox) == 4:
            fields.append((ann_id, image_id, category_id, crowd, index))
            bboxes.append(bbox)
        else:
            bad.append(index)
    numeric = _numeric_rows(bboxes)
    bad = sorted(bad + [fields[k][4] for k in np.flatnonzero(~numeric)])
    fields = np.asarray(fields, dtype=np.int64).reshape(-1, 5)[numeric, :4]
    boxes = np.asarray([b for b, ok in zip(bboxes, numeric) if ok], dtype=np.float64)
    return fields, boxes.reshape(-1, 4), bad


def _numeric_rows(bboxes: list[list]) -> np.ndarray:
    """[A] bool: the bbox holds 4 numbers. One numpy conversion unless something is off."""
    try:
        if np.asarray(bboxes).dtype.kind in "biuf":
            return np.ones(len(bboxes), dtype=bool)
    except ValueError:  # ragged: a nested list inside some bbox
        pass
    number = (int, float)
    return np.asarray([all(type(v) in number for v in b) for b in bboxes], dtype=bool)


def _parse_table(data: dict[str, Any], col: _Collector) -> _Table:
    """Flatten the file; malformed entries and categories become findings and are left out."""
    images, bad_images = _parse_images(data["images"])
    fields, boxes_xywh, bad_anns = _parse_annotations(data["annotations"])
    examples = [f"images[{i}]: {_short(data['images'][i])}" for i in bad_images[:5]]
    examples += [f"annotations[{i}]: {_short(data['annotations'][i])}" for i in bad_anns[:5]]
    col.add("malformed_entry", len(bad_images) + len(bad_anns), examples)
    ids, names, widths, heights = zip(*images, strict=True) if images else ((), (), (), ())
    return _Table(
        file_names=list(names),
        image_ids=np.asarray(ids, dtype=np.int64),
        sizes_wh=np.asarray([widths, heights], dtype=np.int64).T.reshape(-1, 2),
        ann_ids=fields[:, 0],
        ann_image_ids=fields[:, 1],
        ann_category_ids=fields[:, 2],
        boxes_xywh=boxes_xywh,
        crowd=fields[:, 3].astype(bool),
        categories=_parse_categories(data["categories"], col),
    )


def _parse_categories(categories: Sequence[Any], col: _Collector) -> LabelMap | None:
    if not categories:
        col.add("bad_categories", 1, ["'categories' is empty; add one entry per object class"])
        return None
    try:
        return LabelMap.from_coco_categories(categories)
    except ValueError as exc:
        col.add("bad_categories", 1, [str(exc)])
        return None


# ---------------------------------------------------------------------------- annotation checks


def _duplicates(values: np.ndarray) -> tuple[list, list[int]]:
    """-> values occurring more than once, and how often."""
    unique, counts = np.unique(values, return_counts=True)
    return unique[counts > 1].tolist(), counts[counts > 1].tolist()


def _check_ids(table: _Table, col: _Collector) -> None:
    """duplicate_image_id, duplicate_annotation_id, duplicate_file_name."""
    for code, values in (
        ("duplicate_image_id", table.image_ids),
        ("duplicate_annotation_id", table.ann_ids),
    ):
        dup, counts = _duplicates(values)
        col.add(code, len(dup), (f"id {v} ({c} times)" for v, c in zip(dup, counts)))
    names, counts = _duplicates(np.asarray(table.file_names, dtype=object))
    col.add("duplicate_file_name", len(names), (f"{n} ({c} times)" for n, c in zip(names, counts)))


def _image_rows(table: _Table) -> np.ndarray:
    """[A] int64 row of each annotation's image in ``table``, -1 where the id is unknown."""
    if len(table.image_ids) == 0:
        return np.full(len(table.ann_ids), -1, dtype=np.int64)
    order = np.argsort(table.image_ids, kind="stable")
    sorted_ids = table.image_ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, table.ann_image_ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == table.ann_image_ids, order[pos], -1)


def _check_references(table: _Table, rows: np.ndarray, col: _Collector) -> np.ndarray:
    """unknown_image_id, unknown_category, unused_category; -> [A] bool: both ids known."""
    col.add_rows(
        "unknown_image_id",
        np.flatnonzero(rows < 0),
        lambda i: f"{table.annotation(i)}: image_id {table.ann_image_ids[i]}",
    )
    if table.categories is None:  # already reported as bad_categories
        return rows >= 0
    listed = np.asarray(table.categories.category_ids, dtype=np.int64)
    known = np.isin(table.ann_category_ids, listed)
    col.add_rows(
        "unknown_category",
        np.flatnonzero(~known),
        lambda i: f"{table.annotation(i)}: category_id {table.ann_category_ids[i]}",
    )
    names = table.categories.names
    col.add_rows(
        "unused_category",
        np.flatnonzero(~np.isin(listed, table.ann_category_ids)),
        lambda k: f"id {listed[k]} ({names[k]})",
    )
    return (rows >= 0) & known


def _check_boxes(table: _Table, rows: np.ndarray, valid: np.ndarray, col: _Collector) -> None:
    """crowd, degenerate_box, then box_outside_image and empty_image on the remaining boxes.

    Args:
        rows: [A] image row of each annotation.
        valid: [A] bool, annotations whose image and category are known.
    """
    col.add_rows("crowd", np.flatnonzero(valid & table.crowd), table.annotation)
    candidates = np.flatnonzero(valid & ~table.crowd)
    boxes = table.boxes_xywh[candidates]
    proper = (boxes[:, 2] > 0) & (boxes[:, 3] > 0) & np.isfinite(boxes[:, :2]).all(axis=1)

    def describe(i: int) -> str:
        return (
            f"{table.annotation(i)} in {table.image(rows[i])}: bbox {table.boxes_xywh[i].tolist()}"
        )

    col.add_rows("degenerate_box", candidates[~proper], describe)
    kept = candidates[proper]
    boxes_xyxy = boxes[proper]
    boxes_xyxy[:, 2:] += boxes_xyxy[:, :2]
    _extent_findings(
        boxes_xyxy, rows[kept], table.sizes_wh, col, lambda k: describe(kept[k]), table.image
    )


def _extent_findings(
    boxes_xyxy: np.ndarray,
    box_rows: np.ndarray,
    sizes_wh: np.ndarray,
    col: _Collector,
    describe_box: Callable[[int], str],
    describe_image: Callable[[int], str],
) -> None:
    """box_outside_image and empty_image (shared with the start-up check).

    Args:
        boxes_xyxy: [B, 4] absolute non-degenerate, non-crowd boxes.
        box_rows: [B] image row of each box.
        sizes_wh: [I, 2] image (width, height) from the annotation file.
    """
    limits = np.tile(sizes_wh[box_rows].astype(np.float64), 2)  # [B, 4] (w, h, w, h)
    beyond = np.concatenate([-boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - limits[:, 2:]], axis=1)
    outside = np.flatnonzero(beyond.max(axis=1, initial=-np.inf) > BOX_TOLERANCE_PX)
    clamped = np.clip(boxes_xyxy, 0.0, limits)
    usable = (clamped[:, 2] > clamped[:, 0]) & (clamped[:, 3] > clamped[:, 1])
    overrides = {}
    if outside.size and outside.size >= SYSTEMATIC_FRACTION * len(boxes_xyxy):
        overrides = dict(
            severity="error",
            message=f"{FINDINGS['box_outside_image'][1]}. That is {len(outside)} of "
            f"{len(boxes_xyxy)} boxes: check that 'bbox' is [x, y, width, height] in pixels "
            "and that 'width'/'height' are the image's",
        )
    col.add_rows("box_outside_image", outside, describe_box, **overrides)
    counts = np.bincount(box_rows[usable], minlength=len(sizes_wh))
    col.add_rows("empty_image", np.flatnonzero(counts == 0), describe_image)


# ---------------------------------------------------------------------------- image files


def missing_files(images_dir: Path, file_names: Sequence[str]) -> np.ndarray:
    """[I] bool: True where ``images_dir / file_name`` does not exist.

    One directory listing per folder instead of one ``stat`` per file (a network file system
    answers 118k stats slowly); names absent from the listing are confirmed with ``exists``, so
    case-insensitive file systems and odd paths give no false alarms.
    """
    listings: dict[str, set[str] | None] = {}
    missing = np.zeros(len(file_names), dtype=bool)
    for row, name in enumerate(file_names):
        folder, _, base = name.rpartition("/")
        if folder not in listings:
            try:
                listings[folder] = set(os.listdir(images_dir / folder))
            except OSError:
                listings[folder] = None
        listed = listings[folder]
        if listed is None or base not in listed:
            missing[row] = not (images_dir / name).exists()
    return missing


@dataclass(frozen=True)
class _ImageInfo:
    """What opening one file told: an error, or its mode, stored (w, h) and EXIF orientation."""

    error: str | None = None
    missing: bool = False
    mode: str = ""
    size: tuple[int, int] = (0, 0)
    orientation: int = 1


def _inspect_image(path: Path) -> _ImageInfo:
    """Header read plus the cheapest decode that still reads every byte of the file."""
    try:
        with Image.open(path) as image:
            # PNG: Pillow decodes the whole image to look for a late eXIf chunk; one before the
            # pixel data (where the PNG spec puts it) is already in ``info``.
            late_exif_only = image.format == "PNG" and "exif" not in image.info
            orientation = 1 if late_exif_only else exif_orientation(image)
            info = _ImageInfo(mode=image.mode, size=image.size, orientation=orientation)
            if image.format == "PNG":
                image.verify()  # every chunk's CRC up to IEND: catches truncation, no inflate
            else:
                if image.format == "JPEG":  # DCT-domain 1/8 scaling: still reads all the data
                    image.draft(image.mode, (image.width // 8, image.height // 8))
                image.load()
    except FileNotFoundError:
        return _ImageInfo(missing=True)
    except Exception as exc:  # any decoder failure is a finding: the linter must not stop
        return _ImageInfo(error=f"{type(exc).__name__}: {exc}")
    return info


def _inspect_all(
    paths: list[Path], desc: str, workers: int | None, progress: bool
) -> list[_ImageInfo]:
    from tqdm import tqdm

    # Threads, not processes: the work is file reads and Pillow decoders, both release the GIL.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_inspect_image, paths)
        return list(tqdm(results, total=len(paths), desc=desc, unit="img", disable=not progress))


def _check_files(
    table: _Table, files: _SplitFiles, col: _Collector, *, open_images: bool, **options: Any
) -> None:
    """missing_images_dir / missing_image, then (``open_images``) what opening each file shows."""
    if files.images_dir is None:
        where = f"<root>/{files.name}/, <root>/images/{files.name}/ or <root>/images/"
        col.add("missing_images_dir", 1, [f"looked for {where}; or pass the folder explicitly"])
        return
    missing = missing_files(files.images_dir, table.file_names)
    present = np.flatnonzero(~missing).tolist()
    infos: list[_ImageInfo] = []
    if open_images:
        paths = [files.images_dir / table.file_names[row] for row in present]
        infos = _inspect_all(paths, f"{files.name} images", **options)
        missing[[row for row, info in zip(present, infos) if info.missing]] = True
    col.add_rows("missing_image", np.flatnonzero(missing), table.image)
    _image_findings(table, present, infos, col)


def _image_findings(
    table: _Table, rows: Sequence[int], infos: Sequence[_ImageInfo], col: _Collector
) -> None:
    """corrupt_image, size_mismatch, exif_rotated and the colour-mode warnings."""
    codes = ("corrupt_image", "size_mismatch", "exif_rotated", *set(_MODE_CODES.values()))
    found: dict[str, list[str]] = {code: [] for code in (*codes, "other_mode")}
    for row, info in zip(rows, infos):
        name = table.image(row)
        if info.error is not None:
            found["corrupt_image"].append(f"{name}: {info.error}")
        if info.error is not None or info.missing:
            continue
        if info.mode != "RGB":
            found[_MODE_CODES.get(info.mode, "other_mode")].append(f"{name} ({info.mode})")
        if info.orientation != 1:
            found["exif_rotated"].append(f"{name} (orientation {info.orientation})")
        upright = info.size[::-1] if info.orientation in _ROTATING_ORIENTATIONS else info.size
        json_wh = tuple(int(v) for v in table.sizes_wh[row])
        if json_wh not in (info.size, upright):
            turned = f" (upright {upright[0]}x{upright[1]})" if upright != info.size else ""
            found["size_mismatch"].append(
                f"{name}: file {info.size[0]}x{info.size[1]}{turned}, "
                f"annotation {json_wh[0]}x{json_wh[1]}"
            )
    for code, examples in found.items():
        col.add(code, len(examples), examples)


# ---------------------------------------------------------------------------- entry points


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


def _check_split(files: _SplitFiles, max_examples: int, options: dict[str, Any]) -> SplitReport:
    col = _Collector(max_examples)
    num_images = num_annotations = 0
    try:
        data = read_coco_json(files.annotation_json)
    except UserError as exc:  # a broken file is this split's finding, not a usage error
        col.add("unreadable_annotations", 1, [str(exc)])
    else:
        num_images, num_annotations = len(data["images"]), len(data["annotations"])
        table = _parse_table(data, col)
        del data  # only the flat table is needed; the dict is several times the file size
        rows = _image_rows(table)
        _check_ids(table, col)
        _check_boxes(table, rows, _check_references(table, rows, col), col)
        _check_files(table, files, col, **options)
    images_dir = str(files.images_dir) if files.images_dir is not None else None
    name, annotation_file = files.name, str(files.annotation_json)
    return SplitReport(name, annotation_file, images_dir, num_images, num_annotations, col.sorted())


def check_command(root: Path | str) -> str:
    """The shell command that lints ``root``, for messages."""
    return f"detrkit data check {shlex.quote(str(root))}"


_STARTUP_BLOCKING = ("missing_image",)  # would crash mid-epoch; the loader handles the rest


def startup_check(dataset: CocoDetection, root: Path | str) -> None:
    """The fast part of ``check_dataset`` on an opened dataset, before training or evaluation.

    Uses the arrays ``dataset`` already holds (no JSON re-read, no image opened): missing image
    files, boxes outside their image, empty images (the loader logged the boxes it dropped).

    Raises:
        UserError: image files are missing; one line naming the annotation file and pointing
            to ``detrkit data check``. Other findings are logged as one warning line.
    """
    col = _Collector(max_examples=1)
    # CocoDetection has no public vectorised accessor for these; reading them here keeps the
    # check O(annotations) in numpy instead of one Python call per image.
    names, sizes_wh = dataset._file_names, dataset._sizes_wh
    offsets, boxes_xyxy = dataset._offsets, dataset._boxes.astype(np.float64)
    col.add_rows(
        "missing_image", np.flatnonzero(missing_files(dataset.images_dir, names)), names.__getitem__
    )
    rows = np.repeat(np.arange(len(names)), np.diff(offsets))
    _extent_findings(boxes_xyxy, rows, sizes_wh, col, lambda k: names[rows[k]], names.__getitem__)
    blocking = [f for f in col.findings if f.code in _STARTUP_BLOCKING]
    others = [f for f in col.findings if f.code not in _STARTUP_BLOCKING]
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
