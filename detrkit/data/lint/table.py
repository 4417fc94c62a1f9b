# SPDX-License-Identifier: Apache-2.0
"""The flat annotation table: one annotation file's well-formed entries as numpy arrays.

Malformed entries and an unusable ``categories`` list become findings and are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import numpy as np

from detrkit.data.labels import LabelMap
from detrkit.data.lint.findings import Collector

_REPR_LIMIT = 80


@dataclass
class Table:
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


def parse_table(data: dict[str, Any], col: Collector) -> Table:
    """Flatten the file; malformed entries and categories become findings and are left out."""
    images, bad_images = _parse_images(data["images"])
    fields, boxes_xywh, bad_anns = _parse_annotations(data["annotations"])
    examples = [f"images[{i}]: {_short(data['images'][i])}" for i in bad_images[:5]]
    examples += [f"annotations[{i}]: {_short(data['annotations'][i])}" for i in bad_anns[:5]]
    col.add("malformed_entry", len(bad_images) + len(bad_anns), examples)
    ids, names, widths, heights = zip(*images, strict=True) if images else ((), (), (), ())
    return Table(
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


def _parse_categories(categories: Sequence[Any], col: Collector) -> LabelMap | None:
    if not categories:
        col.add("bad_categories", 1, ["'categories' is empty; add one entry per object class"])
        return None
    try:
        return LabelMap.from_coco_categories(categories)
    except ValueError as exc:
        col.add("bad_categories", 1, [str(exc)])
        return None
