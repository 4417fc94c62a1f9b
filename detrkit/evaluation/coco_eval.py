# SPDX-License-Identifier: Apache-2.0
"""COCO box evaluation: accumulate detections, gather them across ranks, score them.

The evaluator turns :class:`~detrkit.structures.Detections` (absolute ``xyxy`` pixels, contiguous
labels) into COCO result records (``xywh`` pixels, dataset category ids) and computes the twelve
standard COCO numbers with faster-coco-eval on exactly the images it was given, the way DETR
restricts ``params.imgIds`` to the evaluated images.

It never talks to ``torch.distributed`` itself: the engine passes an ``all_gather`` callable (for
example a wrapper around ``torch.distributed.all_gather_object``) and the evaluator exchanges a
plain, picklable ``{image_id: [record, ...]}`` mapping through it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from detrkit.data.labels import NO_CATEGORY
from detrkit.errors import UserError
from detrkit.structures import Detections

logger = logging.getLogger(__name__)

# (title, IoU range, area range, maxDets) of the 12 standard numbers, in COCOeval.stats order.
_SUMMARY_ROWS = (
    ("AP", "0.50:0.95", "all", 100),
    ("AP", "0.50", "all", 100),
    ("AP", "0.75", "all", 100),
    ("AP", "0.50:0.95", "small", 100),
    ("AP", "0.50:0.95", "medium", 100),
    ("AP", "0.50:0.95", "large", 100),
    ("AR", "0.50:0.95", "all", 1),
    ("AR", "0.50:0.95", "all", 10),
    ("AR", "0.50:0.95", "all", 100),
    ("AR", "0.50:0.95", "small", 100),
    ("AR", "0.50:0.95", "medium", 100),
    ("AR", "0.50:0.95", "large", 100),
)
NUM_COCO_STATS = len(_SUMMARY_ROWS)

EvalState = dict[int, list[dict]]
"""Image id -> the COCO result records of that image (an empty list when nothing was detected)."""


@dataclass(frozen=True)
class ClassAP:
    """Box AP of one category, from the COCOeval precision array (area all, 100 detections).

    ``AP`` (IoU 0.50:0.95) and ``AP50`` are None for a category with no ground-truth box among
    the evaluated images: COCO has nothing to average there (shown as "-").
    """

    category_id: int
    name: str
    num_gt: int
    AP: float | None
    AP50: float | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class CocoMetrics:
    """The twelve standard COCO box numbers, in ``COCOeval.stats`` order.

    A value is -1.0 where COCO has nothing to average (e.g. ``APs`` when no evaluated image has a
    small ground-truth box), exactly as pycocotools reports it.
    """

    AP: float
    AP50: float
    AP75: float
    APs: float
    APm: float
    APl: float
    AR1: float
    AR10: float
    AR100: float
    ARs: float
    ARm: float
    ARl: float
    # Not one of the 12 numbers: left out of as_dict, format_table and equality.
    per_class: tuple[ClassAP, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_stats(cls, stats: Sequence[float], per_class: Sequence[ClassAP] = ()) -> CocoMetrics:
        """Build from the first 12 entries of a ``COCOeval.stats`` array."""
        if len(stats) < NUM_COCO_STATS:
            raise ValueError(f"expected {NUM_COCO_STATS} COCO stats, got {len(stats)}")
        return cls(*(float(value) for value in stats[:NUM_COCO_STATS]), tuple(per_class))

    def as_dict(self) -> dict[str, float]:
        """Name -> value of the 12 numbers, in the standard order ("AP", "AP50", ..., "ARl")."""
        return {f.name: getattr(self, f.name) for f in fields(self)[:NUM_COCO_STATS]}

    def format_table(self) -> str:
        """The familiar 12-line COCO summary, one metric per line (no trailing newline)."""
        lines = []
        values = [getattr(self, f.name) for f in fields(self)[:NUM_COCO_STATS]]
        for (kind, iou, area, max_dets), value in zip(_SUMMARY_ROWS, values, strict=True):
            title = "Average Precision" if kind == "AP" else "Average Recall"
            lines.append(
                f" {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6s} | "
                f"maxDets={max_dets:>3d} ] = {value:0.3f}"
            )
        return "\n".join(lines)


class CocoEvaluator:
    """Accumulates detections and computes COCO box AP/AR with faster-coco-eval.

    Args:
        annotation_json: path to a COCO annotation file, or the already-loaded dict (not mutated).
        label_to_category: ``label_to_category[label]`` is the dataset category id of contiguous
            label ``label`` (category ids need not be contiguous); ``NO_CATEGORY`` (-1) marks a
            label that is not reported (``LabelMap.category_table``): its detections are dropped.
        all_gather: optional collective ``obj -> [obj_rank0, obj_rank1, ...]`` used by
            :meth:`synchronize`; ``None`` for a single process.

    Only image ids passed to :meth:`update` are evaluated. An image id seen twice (distributed
    samplers pad the last batch by repeating images) is counted once: its first detections win.
    """

    def __init__(
        self,
        annotation_json: Path | str | dict,
        label_to_category: Sequence[int],
        all_gather: Callable[[object], list[object]] | None = None,
    ) -> None:
        self.coco_gt = _load_ground_truth(annotation_json)
        self._source = str(annotation_json) if not isinstance(annotation_json, dict) else "<dict>"
        self.label_to_category = np.asarray([int(c) for c in label_to_category], dtype=np.int64)
        self.all_gather = all_gather
        self._check_categories()
        self._state: EvalState = {}
        self._synchronized = False

    def _check_categories(self) -> None:
        known = set(self.coco_gt.getCatIds())
        unknown = sorted(set(self.label_to_category.tolist()) - known - {NO_CATEGORY})
        if unknown:
            raise UserError(
                f"{self._source}: category ids {unknown} of the label map are not among the "
                f"annotation file's categories {sorted(known)}; use the label map built from it"
            )

    def update(self, image_ids: Sequence[int], detections: Sequence[Detections]) -> None:
        """Add the detections of a batch of images.

        Args:
            image_ids: dataset image id of each image.
            detections: per image, ``boxes_xyxy`` [N, 4] absolute pixels of the original image,
                ``scores`` [N] and contiguous ``labels`` [N]. Every detection is kept.
        """
        if len(image_ids) != len(detections):
            raise ValueError(f"{len(image_ids)} image ids for {len(detections)} detections")
        for image_id, dets in zip(image_ids, detections, strict=True):
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise UserError(f"{self._source}: image id {image_id} is not in the annotations")
            if image_id not in self._state:
                self._state[image_id] = self._to_records(image_id, dets)
        self._synchronized = False

    def _to_records(self, image_id: int, dets: Detections) -> list[dict]:
        boxes = np.asarray(dets.boxes_xyxy.detach().cpu().double().numpy()).reshape(-1, 4)
        scores = dets.scores.detach().cpu().double().numpy().reshape(-1)
        labels = dets.labels.detach().cpu().numpy().astype(np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(
                f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels"
            )
        num_labels = len(self.label_to_category)
        if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
            raise UserError(
                f"image {image_id}: predicted label {int(labels.max())} is outside the "
                f"{num_labels} classes of the label map; does the model's num_classes match "
                f"the dataset ({self._source})?"
            )
        reported = self.label_to_category[labels] != NO_CATEGORY
        boxes, scores, labels = boxes[reported], scores[reported], labels[reported]
        categories = self.label_to_category[labels].tolist()
        boxes_xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
        return [
            {"image_id": image_id, "category_id": cat, "bbox": box, "score": score}
            for cat, box, score in zip(
                categories, boxes_xywh.tolist(), scores.tolist(), strict=True
            )
        ]

    @property
    def image_ids(self) -> list[int]:
        """The image ids accumulated so far, sorted."""
        return sorted(self._state)

    def state(self) -> EvalState:
        """The picklable ``{image_id: records}`` mapping that ranks exchange (a copy)."""
        return {image_id: list(records) for image_id, records in self._state.items()}

    def merge(self, states: Sequence[Mapping[int, Sequence[dict]]]) -> None:
        """Replace the accumulated state by the union of ``states`` (e.g. one per rank).

        An image present in several states keeps the records of the first state holding it.
        """
        merged: EvalState = {}
        for part in states:
            for image_id, records in part.items():
                merged.setdefault(int(image_id), list(records))
        self._state = merged

    def synchronize(self) -> None:
        """Gather every rank's images through ``all_gather``; a no-op without one.

        This is a collective call: with ``all_gather`` set, every rank must call it (or
        :meth:`summarize`, which calls it) the same number of times.
        """
        if self.all_gather is None or self._synchronized:
            return
        self.merge(self.all_gather(self.state()))
        self._synchronized = True

    def results(self) -> list[dict]:
        """Every accumulated COCO result record, grouped by sorted image id.

        Records are ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in pixels.
        Call :meth:`synchronize` first to get the records of every rank.
        """
        return [record for image_id in sorted(self._state) for record in self._state[image_id]]

    def summarize(self) -> CocoMetrics:
        """Synchronize, then evaluate the accumulated detections with faster-coco-eval.

        Returns:
            The 12 standard numbers. Detections-free evaluations give 0 AP/AR, not an error.
        """
        self.synchronize()
        if not self._state:
            raise UserError(f"{self._source}: no image was evaluated; is the dataset empty?")
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            stats, per_class = self._run_cocoeval()
        if captured.getvalue():
            logger.debug("faster-coco-eval output:\n%s", captured.getvalue().rstrip())
        return CocoMetrics.from_stats(stats, per_class)

    def _run_cocoeval(self) -> tuple[np.ndarray, list[ClassAP]]:
        # loadRes and COCOeval write "area", "id", "ignore", ... into the record dicts: copy them.
        coco_dt = self.coco_gt.loadRes(copy.deepcopy(self.results()))
        evaluator = COCOeval_faster(self.coco_gt, coco_dt, iouType="bbox", print_function=_discard)
        evaluator.params.imgIds = self.image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        per_class = per_class_ap(
            evaluator.eval["precision"], self.coco_gt, evaluator.params.catIds, self.image_ids
        )
        return np.asarray(evaluator.stats, dtype=np.float64), per_class


def per_class_ap(
    precision: np.ndarray, coco_gt: COCO, category_ids: Sequence[int], image_ids: Sequence[int]
) -> list[ClassAP]:
    """AP@[.5:.95] and AP50 of each category from COCOeval's accumulated precision array.

    Args:
        precision: ``eval["precision"]``, shape [IoU thresholds, recall points, categories,
            area ranges, max detections]; -1 where a category has no ground truth.
        coco_gt: the ground truth (category names, instance counts).
        category_ids: ``params.catIds``, the order of the category axis.
        image_ids: the evaluated images; only their boxes are counted.
    """
    # Area "all" (index 0) and the largest maxDets (100), as the headline AP; IoU 0.50 is row 0.
    table = np.asarray(precision)[:, :, :, 0, -1]
    evaluated = {int(i) for i in image_ids}
    # Crowd regions are no instances: COCO neither requires nor counts a detection of them.
    counts = Counter(
        int(a["category_id"])
        for a in coco_gt.anns.values()
        if a["image_id"] in evaluated and not a.get("iscrowd", 0)
    )
    rows = []
    for index, category_id in enumerate(int(c) for c in category_ids):
        values = table[:, :, index]
        found = values[values > -1]
        at_50 = values[0][values[0] > -1]
        rows.append(
            ClassAP(
                category_id=category_id,
                name=str(coco_gt.cats[category_id].get("name", category_id)),
                num_gt=counts[category_id],
                AP=float(found.mean()) if found.size else None,
                AP50=float(at_50.mean()) if at_50.size else None,
            )
        )
    return rows


def format_per_class_table(per_class: Sequence[ClassAP]) -> str:
    """``category  id  instances  AP  AP50`` rows in percent, "-" where a class has no ground
    truth (no trailing newline)."""
    width = max([len("category"), *(len(row.name) for row in per_class)])
    lines = [f"{'category':<{width}}  {'id':>5}  {'GT boxes':>8}  {'AP':>5}  {'AP50':>5}"]
    for row in per_class:
        lines.append(
            f"{row.name:<{width}}  {row.category_id:>5}  {row.num_gt:>8}  "
            f"{_percent(row.AP):>5}  {_percent(row.AP50):>5}"
        )
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def write_results_json(path: Path | str, results: Sequence[dict]) -> None:
    """Write COCO result records to ``path`` atomically (temporary file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(list(results), stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise


def _load_ground_truth(annotation_json: Path | str | dict) -> COCO:
    """Index a COCO annotation file or dict, with a UserError for a missing or broken file."""
    if isinstance(annotation_json, dict):
        # use_deepcopy: COCOeval writes flags into the annotation dicts; keep the caller's intact.
        source = annotation_json
    else:
        path = Path(annotation_json)
        if not path.is_file():
            raise UserError(f"{path}: COCO annotation file not found")
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: not a readable COCO annotation JSON ({error})") from error
    if not isinstance(source, dict) or not {"images", "categories"} <= source.keys():
        raise UserError(
            f"{annotation_json}: a COCO annotation file needs 'images' and 'categories'"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(source, use_deepcopy=isinstance(annotation_json, dict), print_function=_discard)


def _discard(*args: object, **kwargs: object) -> None:
    """A ``print_function`` for faster-coco-eval that drops its progress messages."""
