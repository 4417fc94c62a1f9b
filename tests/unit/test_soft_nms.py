# SPDX-License-Identifier: Apache-2.0
"""Soft-NMS (ops/soft_nms.py) against a step-by-step reference, the class offsets, and the
sigmoid postprocessor with soft-NMS and clamping."""

from __future__ import annotations

import math

import pytest
import torch

from detrkit.models.postprocess import SoftNms, TopKSigmoidPostprocess
from detrkit.ops.soft_nms import batched_soft_nms, class_offset_boxes, soft_nms
from detrkit.structures import PredictionGroup


def _reference(boxes, scores, iou_threshold, sigma, min_score, method):
    """The textbook loop on Python floats: pick the best remaining box (first one on ties),
    decay the later ones, drop a box below min_score by moving the last one into its place."""
    rows = [list(map(float, b)) + [float(s), i] for i, (b, s) in enumerate(zip(boxes, scores))]
    for row in rows:
        row.append((row[2] - row[0]) * (row[3] - row[1]))
    n, i = len(rows), 0
    while i < n:
        best = max(range(i, n), key=lambda p: (rows[p][4], -p))
        rows[i], rows[best] = rows[best], rows[i]
        x1, y1, x2, y2, _, _, area = rows[i]
        p = i + 1
        while p < n:
            r = rows[p]
            w = max(0.0, min(x2, r[2]) - max(x1, r[0]))
            h = max(0.0, min(y2, r[3]) - max(y1, r[1]))
            inter = w * h
            iou = inter / (area + r[6] - inter)
            if method == "linear":
                weight = 1 - iou if iou >= iou_threshold else 1.0
            else:
                weight = math.exp(-(iou * iou) / sigma)
            r[4] *= weight
            if r[4] < min_score:
                rows[p] = rows[n - 1]
                n -= 1
                continue
            p += 1
        i += 1
    return [r[5] for r in rows[:n]], [r[4] for r in rows[:n]]


def _random_boxes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(count, 2, generator=generator, dtype=torch.float64) * 40
    sizes = 10 + torch.rand(count, 2, generator=generator, dtype=torch.float64) * 20
    boxes = torch.cat((centres - sizes / 2, centres + sizes / 2), 1)
    scores = torch.rand(count, generator=generator, dtype=torch.float64)
    scores[::7] = scores[0]  # exact ties
    return boxes, scores


@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("min_score", [1e-3, 0.2])
def test_soft_nms_matches_the_reference_loop(method, min_score):
    boxes, scores = _random_boxes(60, seed=3)
    options = dict(iou_threshold=0.3, sigma=0.5, min_score=min_score, method=method)
    keep, decayed = soft_nms(boxes, scores, **options)
    want_keep, want_scores = _reference(boxes.tolist(), scores.tolist(), **options)
    assert keep.tolist() == want_keep
    torch.testing.assert_close(decayed, torch.tensor(want_scores, dtype=torch.float64))
    assert (decayed[1:] <= decayed[:-1]).all()
    if min_score == 0.2:
        assert len(keep) < len(scores)  # drops happened, so the swap order was exercised


def test_soft_nms_keeps_float32_and_handles_no_boxes():
    boxes, scores = _random_boxes(10, seed=1)
    keep, decayed = soft_nms(boxes.float(), scores.float())
    assert decayed.dtype == torch.float32 and keep.dtype == torch.int64
    keep, decayed = batched_soft_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0).long())
    assert keep.numel() == 0 and decayed.numel() == 0
    with pytest.raises(ValueError, match="linear"):
        soft_nms(boxes, scores, method="hard")


def test_classes_never_decay_each_other():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes, scores = box.repeat(2, 1), torch.tensor([0.9, 0.8])
    _, same = batched_soft_nms(boxes, scores, torch.tensor([1, 1]), iou_threshold=0.5)
    _, other = batched_soft_nms(boxes, scores, torch.tensor([1, 2]), iou_threshold=0.5)
    # Identical boxes of one class: IoU 1 decays the second to 0, which is dropped.
    assert same.tolist() == pytest.approx([0.9])
    assert other.tolist() == pytest.approx([0.9, 0.8])
    shifted = class_offset_boxes(boxes, torch.tensor([0, 3]))
    assert shifted[1].tolist() == [33.0, 33.0, 43.0, 43.0]


def _group(logits: torch.Tensor, boxes: torch.Tensor) -> PredictionGroup:
    return PredictionGroup("main", logits[None], boxes[None], at_inference=True)


def test_postprocess_with_soft_nms_and_clamping():
    # Two queries on the same box and class, one box reaching outside the image.
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.5, 0.5, 0.4, 0.4], [0.9, 0.9, 0.4, 0.4]]])
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 0, 1], logits[0, 1, 1], logits[0, 2, 0] = 3.0, 2.0, 1.0
    sizes = torch.tensor([[100, 200]])
    soft = SoftNms(candidates=3, iou_threshold=0.5, min_score=1e-3)
    found = TopKSigmoidPostprocess(top_k=2, soft_nms=soft, clip=True)(_group(logits, boxes), sizes)
    det = found[0]
    assert det.labels.tolist() == [1, 0] and det.query_index.tolist() == [0, 2]
    assert det.boxes_xyxy[1].tolist() == pytest.approx([140.0, 70.0, 200.0, 100.0])
    unclipped = TopKSigmoidPostprocess(top_k=3)(_group(logits, boxes), sizes)[0]
    assert unclipped.boxes_xyxy.max() > 200
    with pytest.raises(ValueError, match="not both"):
        TopKSigmoidPostprocess(nms_iou_threshold=0.5, soft_nms=soft)
