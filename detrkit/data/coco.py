# SPDX-License-Identifier: Apache-2.0
"""COCO-format detection dataset -> (normalised image, ``Target``) (docs/methods.md#data-loading).

The annotation file is validated when the dataset is built (JSON only, no image is opened):
structural problems raise ``UserError`` naming the file and the entry at fault; empty or
out-of-image boxes are skipped with one logged warning, as COCO's own tools do. Annotations are
stored as flat numpy arrays (not per-image Python lists) so DataLoader workers share them cheaply.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from detrkit.data.images import load_rgb_image
from detrkit.data.labels import LabelMap
from detrkit.data.transforms import DetectionSample, ToNormalizedTensor
from detrkit.errors import UserError
from detrkit.structures import Target

logger = logging.getLogger(__name__)

_REQUIRED_KEYS = ("images", "annotations", "categories")
_MAX_IDS_LISTED = 10
COCO2017_SUFFIX = "2017"


def resolve_split(root: Path, split: str) -> tuple[Path, Path]:
    """Find the images folder and annotation file of a split.

    Looked for, in order: ``root/annotations/instances_{split}.json`` with images in
    ``root/{split}/``, ``root/images/{split}/`` or ``root/images/``. COCO 2017 is the same layout
    with split "train2017"/"val2017"; a plain "train"/"val" falls back to it when no
    ``instances_{split}.json`` exists.

    Returns:
        (images_dir, annotation_json).

    Raises:
        UserError: nothing matched; the message lists every path tried.
    """
    root = Path(root)
    tried: list[Path] = []
    candidates = [split]
    if not split.endswith(COCO2017_SUFFIX):
        candidates.append(split + COCO2017_SUFFIX)
    for name in candidates:
        annotation = root / "annotations" / f"instances_{name}.json"
        tried.append(annotation)
        if not annotation.is_file():
            continue
        for images_dir in (root / name, root / "images" / name, root / "images"):
            tried.append(images_dir)
            if images_dir.is_dir():
                return images_dir, annotation
    listing = "\n  ".join(str(p) for p in tried)
    raise UserError(
        f"cannot find split {split!r} under {root}; looked for:\n  {listing}\n"
        "Expected root/annotations/instances_<split>.json and the images in root/<split>/ "
        "(or root/images/<split>/, root/images/)."
    )


def read_coco_json(path: Path) -> dict[str, Any]:
    """Load and structurally check a COCO annotation file.

    Raises:
        UserError: missing file, malformed JSON (with line/column), or a missing top-level key.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise UserError(f"annotation file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise UserError(
            f"annotation file {path} is not valid JSON: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"annotation file {path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise UserError(f"annotation file {path} must hold a JSON object, not a {kind}")
    missing = [key for key in _REQUIRED_KEYS if not isinstance(data.get(key), list)]
    if missing:
        raise UserError(
            f"annotation file {path} lacks the list(s) {missing}; a COCO detection file has "
            "'images', 'annotations' and 'categories'"
        )
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_images(images: Sequence[Any], path: Path) -> tuple[np.ndarray, list[str], np.ndarray]:
    """-> image ids [I] int64, file names, sizes [I, 2] int64 as (w, h)."""
    ids, names, sizes = [], [], []
    for index, image in enumerate(images):
        ok = isinstance(image, Mapping) and _is_int(image.get("id"))
        ok = ok and isinstance(image.get("file_name"), str)
        ok = ok and all(_is_int(image.get(k)) and image[k] > 0 for k in ("width", "height"))
        if not ok:
            raise UserError(
                f"{path}: images[{index}] needs an integer 'id', a 'file_name' and positive "
                f"integer 'width'/'height'; got {image!r}"
            )
        ids.append(image["id"])
        names.append(image["file_name"])
        sizes.append((image["width"], image["height"]))
    image_ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    unique, counts = np.unique(image_ids, return_counts=True)
    if (counts > 1).any():
        raise UserError(f"{path}: image id {int(unique[counts > 1][0])} appears more than once")
    return image_ids, names, np.asarray(sizes, dtype=np.int64).reshape(-1, 2)


def _label_map_from_json(categories: Sequence[Any], path: Path) -> LabelMap:
    if not categories:
        raise UserError(f"{path}: 'categories' is empty; add one entry per object class")
    try:
        return LabelMap.from_coco_categories(categories)
    except ValueError as exc:
        raise UserError(f"{path}: bad 'categories': {exc}") from None


class UnknownCategoriesError(UserError):
    """The annotation file has categories the checkpoint's label map lacks."""


def require_known_categories(file_map: LabelMap, label_map: LabelMap, path: Path) -> None:
    """Every category of the file must be a class of ``label_map`` (a checkpoint's); the file
    may have fewer (COCO 2017's 80 of a converted checkpoint's 91 slots). Names that differ for
    the same id are logged as a warning.

    Raises:
        UnknownCategoriesError: a category id of the file is unknown to ``label_map`` or an
            unused slot.
    """
    used = set(label_map.used_ids)
    unknown = [c for c in file_map.category_ids if c not in used]
    if unknown:
        shown = ", ".join(f"{c} '{file_map.name_of(c)}'" for c in unknown[:8])
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise UnknownCategoriesError(
            f"{path}: categories {shown}{more} are not classes of the checkpoint (its "
            f"{len(used)} classes have ids {_id_ranges(label_map.used_ids)}); evaluate on data "
            "with the checkpoint's category ids, or fine-tune on it with detrkit train --init-from"
        )
    renamed = [
        f"{c} '{file_map.name_of(c)}' vs '{label_map.name_of(c)}'"
        for c in file_map.category_ids
        if file_map.name_of(c) != label_map.name_of(c)
    ]
    if renamed:
        logger.warning(
            "%s: %d categories are named differently than in the checkpoint (same ids are "
            "evaluated as the same class): %s",
            path,
            len(renamed),
            "; ".join(renamed[:5]),
        )


def _id_ranges(ids: Sequence[int]) -> str:
    """``(1, 2, 3, 5)`` -> ``"1-3, 5"``."""
    ranges: list[list[int]] = []
    for c in ids:
        if ranges and c == ranges[-1][1] + 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def _check_annotation(
    ann: Any, path: Path, json_categories: set[int], mapped: set[int], row_of: dict[int, int]
) -> int:
    """Validate one annotation; return the row of its image. Raises UserError on bad structure."""
    if not isinstance(ann, Mapping):
        raise UserError(f"{path}: every annotation must be an object, got {ann!r}")
    ann_id, category = ann.get("id"), ann.get("category_id")
    if not _is_int(category) or category not in json_categories:
        raise UserError(
            f"{path}: annotation id {ann_id} has category_id {category!r}, which is not listed "
            "in 'categories'; add that category or remove the annotation"
        )
    if category not in mapped:
        raise UserError(
            f"{path}: annotation id {ann_id} has category_id {category!r}, which the label map "
            f"(category ids {sorted(mapped)}) does not know; use the same categories as the "
            "training data"
        )
    row = row_of.get(ann.get("image_id")) if _is_int(ann.get("image_id")) else None
    if row is None:
        raise UserError(
            f"{path}: annotation id {ann_id} refers to image_id {ann.get('image_id')!r}, which "
            "is not in 'images'; add the image entry or remove the annotation"
        )
    bbox = ann.get("bbox")
    if not isinstance(bbox, Sequence) or len(bbox) != 4:
        raise UserError(f"{path}: annotation id {ann_id} needs 'bbox' = [x, y, w, h], got {bbox!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox):
        raise UserError(f"{path}: annotation id {ann_id} has a non-numeric bbox {bbox!r}")
    return row


def _xywh_to_xyxy(bboxes: np.ndarray) -> np.ndarray:
    """[A, 4] xywh -> xyxy in float32, added in float32 as the original code does."""
    boxes = bboxes.astype(np.float32)
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def _clamped_is_valid(boxes_xyxy: np.ndarray, sizes_wh: np.ndarray) -> np.ndarray:
    """[A] bool: after clamping to its image ([A, 2] (w, h)), x2 > x1 and y2 > y1 (NaN fails)."""
    limits = np.tile(sizes_wh.astype(np.float32), 2)
    clamped = np.clip(boxes_xyxy, 0.0, limits)
    return (clamped[:, 2] > clamped[:, 0]) & (clamped[:, 3] > clamped[:, 1])


def _gather_annotations(
    annotations: Sequence[Any],
    path: Path,
    json_map: LabelMap,
    label_map: LabelMap,
    row_of: dict[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> image rows [A], labels [A], bboxes [A, 4] xywh float64, iscrowd [A] bool.

    The loop does only dictionary look-ups (COCO train has 860k annotations); any failure is
    re-examined by ``_check_annotation``, which raises the precise ``UserError``.
    """
    json_ids, mapped = set(json_map.category_ids), set(label_map.category_ids)
    label_of = {c: label_map.to_label(c) for c in json_ids & mapped}
    rows, labels, bboxes, crowd = [], [], [], []
    for ann in annotations:
        try:
            rows.append(row_of[ann["image_id"]])
            labels.append(label_of[ann["category_id"]])
            bboxes.append(ann["bbox"])
            crowd.append(ann.get("iscrowd", 0))
        except (KeyError, TypeError, AttributeError):
            _check_annotation(ann, path, json_ids, mapped, row_of)
            raise
    try:
        boxes = np.asarray(bboxes) if bboxes else np.zeros((0, 4))
    except (ValueError, TypeError):  # ragged or odd entries: find and name the culprit
        boxes = np.zeros(0, dtype=object)
    if boxes.dtype.kind not in "iuf" or boxes.shape[1:] != (4,):
        for ann in annotations:
            _check_annotation(ann, path, json_ids, mapped, row_of)
    return (
        np.asarray(rows, dtype=np.int64),
        np.asarray(labels, dtype=np.int64),
        boxes.astype(np.float64).reshape(-1, 4),
        np.asarray(crowd).astype(bool).reshape(-1),
    )


def _read_only(array: np.ndarray) -> np.ndarray:
    """A view of ``array`` that cannot be written through."""
    view = array.view()
    view.flags.writeable = False
    return view


class CocoDetection(Dataset):
    """COCO-format detection dataset.

    ``dataset[i]`` is ``(pixels, target)``: pixels [3, h, w] float32, normalised by the
    transforms; ``target.boxes`` [N, 4] cxcywh normalised by the transformed (h, w);
    ``target.labels`` [N] int64 contiguous labels (via ``label_map``); ``orig_size`` is the
    loaded image's (h, w), ``size`` the transformed one. Crowd annotations (``iscrowd`` 1) and
    empty boxes are left out; images without annotations are kept (empty targets).

    Attributes:
        label_map: category id <-> label map (from the file's categories unless given).
        file_categories: the map of the file's own ``categories``.
        image_ids: image ids in file order.
        coco_json: the annotation file.
        images_dir: folder that ``file_name`` entries are relative to.
    """

    def __init__(
        self,
        images_dir: Path,
        annotation_json: Path,
        transforms: Callable[[DetectionSample], DetectionSample] | None = None,
        label_map: LabelMap | None = None,
        known_categories_only: bool = False,
    ) -> None:
        self.images_dir = Path(images_dir)
        self.coco_json = Path(annotation_json)
        self.transforms = transforms if transforms is not None else ToNormalizedTensor()
        data = read_coco_json(self.coco_json)
        json_map = _label_map_from_json(data["categories"], self.coco_json)
        self.file_categories = json_map
        self.label_map = label_map if label_map is not None else json_map
        if known_categories_only:
            require_known_categories(json_map, self.label_map, self.coco_json)
        image_ids, self._file_names, self._sizes_wh = _parse_images(data["images"], self.coco_json)
        self.image_ids: list[int] = image_ids.tolist()
        self._index_annotations(data["annotations"], json_map)
        self._size_warned: set[int] = set()

    def _index_annotations(self, annotations: Sequence[Any], json_map: LabelMap) -> None:
        """Fill flat arrays: boxes [A, 4] xyxy (unclamped), labels [A], image offsets [I + 1]."""
        row_of = {image_id: row for row, image_id in enumerate(self.image_ids)}
        rows, labels, bboxes, crowd = _gather_annotations(
            annotations, self.coco_json, json_map, self.label_map, row_of
        )
        boxes = _xywh_to_xyxy(bboxes)
        valid = _clamped_is_valid(boxes, self._sizes_wh[rows])
        keep = valid & ~crowd
        order = np.argsort(rows[keep], kind="stable")
        self._boxes = boxes[keep][order]
        self._labels = labels[keep][order]
        counts = np.bincount(rows[keep], minlength=len(self.image_ids))
        self._offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        if crowd.any():
            logger.info("%s: %d crowd annotations left out", self.coco_json, int(crowd.sum()))
        skipped = np.flatnonzero(~valid & ~crowd)
        if skipped.size:
            shown = [annotations[i].get("id") for i in skipped[:_MAX_IDS_LISTED]]
            logger.warning(
                "%s: skipped %d annotations whose box is empty or outside its image "
                "(annotation ids %s%s)",
                self.coco_json,
                skipped.size,
                ", ".join(str(i) for i in shown),
                ", ..." if skipped.size > _MAX_IDS_LISTED else "",
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        """Path of the index-th image file."""
        return self.images_dir / self._file_names[index]

    def image_sizes(self) -> list[tuple[int, int]]:
        """(h, w) of every image according to the annotation file (no image read)."""
        return [(int(h), int(w)) for w, h in self._sizes_wh]

    def aspect_ratios(self) -> np.ndarray:
        """[I] float64 width / height of every image, from the annotation file (no image read)."""
        return self._sizes_wh[:, 0] / self._sizes_wh[:, 1]

    def file_names(self) -> list[str]:
        """File name of every image (relative to ``images_dir``), in file order; a copy."""
        return list(self._file_names)

    def image_sizes_wh(self) -> np.ndarray:
        """[I, 2] int64 (width, height) of every image from the annotation file; read-only."""
        return _read_only(self._sizes_wh)

    def annotation_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The kept (non-crowd, non-empty) boxes of every image as flat read-only arrays.

        Returns:
            boxes [A, 4] float32 absolute xyxy before clamping, labels [A] int64, and offsets
            [I + 1] int64: image ``i``'s boxes are rows ``offsets[i]:offsets[i + 1]``.
        """
        return _read_only(self._boxes), _read_only(self._labels), _read_only(self._offsets)

    def num_annotations(self, index: int) -> int:
        """Number of (non-crowd, non-empty) boxes of the index-th image."""
        return int(self._offsets[index + 1] - self._offsets[index])

    def raw_target(self, index: int) -> tuple[Tensor, Tensor]:
        """([N, 4] absolute xyxy boxes before clamping, [N] labels) of the index-th image."""
        start, stop = self._offsets[index], self._offsets[index + 1]
        return torch.from_numpy(self._boxes[start:stop].copy()), torch.from_numpy(
            self._labels[start:stop].copy()
        )

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image_id = self.image_ids[index]
        json_wh = tuple(int(v) for v in self._sizes_wh[index])
        image = load_rgb_image(self.image_path(index), image_id, expected_size=json_wh)
        if image.size != json_wh and image_id not in self._size_warned:
            self._size_warned.add(image_id)
            logger.warning(
                "%s: image %s (id %d) is %dx%d but the annotation file says %dx%d; boxes are "
                "clamped to the loaded size",
                self.coco_json,
                self.image_path(index),
                image_id,
                image.width,
                image.height,
                *json_wh,
            )
        boxes, labels = self.raw_target(index)
        boxes[:, 0::2].clamp_(0, image.width)
        boxes[:, 1::2].clamp_(0, image.height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        sample = DetectionSample.from_xyxy(image, boxes[keep], labels[keep])
        sample = self.transforms(sample)
        if not isinstance(sample.image, Tensor):
            sample = ToNormalizedTensor()(sample)
        target = Target(
            labels=sample.labels,
            boxes=sample.boxes_cxcywh_normalized(),
            image_id=image_id,
            orig_size=(image.height, image.width),
            size=sample.size,
        )
        return sample.image, target
