# SPDX-License-Identifier: Apache-2.0
"""Checks on the annotation table: ids, references between entries, boxes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from detrkit.data.lint.findings import (
    BOX_TOLERANCE_PX,
    FINDINGS,
    SYSTEMATIC_FRACTION,
    Collector,
)
from detrkit.data.lint.table import Table


def _duplicates(values: np.ndarray) -> tuple[list, list[int]]:
    """-> values occurring more than once, and how often."""
    unique, counts = np.unique(values, return_counts=True)
    return unique[counts > 1].tolist(), counts[counts > 1].tolist()


def check_ids(table: Table, col: Collector) -> None:
    """duplicate_image_id, duplicate_annotation_id, duplicate_file_name."""
    for code, values in (
        ("duplicate_image_id", table.image_ids),
        ("duplicate_annotation_id", table.ann_ids),
    ):
        dup, counts = _duplicates(values)
        col.add(code, len(dup), (f"id {v} ({c} times)" for v, c in zip(dup, counts)))
    names, counts = _duplicates(np.asarray(table.file_names, dtype=object))
    col.add("duplicate_file_name", len(names), (f"{n} ({c} times)" for n, c in zip(names, counts)))


def image_rows(table: Table) -> np.ndarray:
    """[A] int64 row of each annotation's image in ``table``, -1 where the id is unknown."""
    if len(table.image_ids) == 0:
        return np.full(len(table.ann_ids), -1, dtype=np.int64)
    order = np.argsort(table.image_ids, kind="stable")
    sorted_ids = table.image_ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, table.ann_image_ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == table.ann_image_ids, order[pos], -1)


def check_references(table: Table, rows: np.ndarray, col: Collector) -> np.ndarray:
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


def check_boxes(table: Table, rows: np.ndarray, valid: np.ndarray, col: Collector) -> None:
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
    extent_findings(
        boxes_xyxy, rows[kept], table.sizes_wh, col, lambda k: describe(kept[k]), table.image
    )


def extent_findings(
    boxes_xyxy: np.ndarray,
    box_rows: np.ndarray,
    sizes_wh: np.ndarray,
    col: Collector,
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
