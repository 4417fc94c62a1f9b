# SPDX-License-Identifier: Apache-2.0
"""Postprocessing: top-k over (query, class) sigmoid scores, optional class-wise NMS, softmax."""

from __future__ import annotations

import torch

from detrkit.models.postprocess import SoftmaxPostprocess, TopKSigmoidPostprocess
from detrkit.structures import PredictionGroup

SIZES = torch.tensor([[100, 200]])  # (h, w)


def _group(logits, boxes):
    """One layer, one image: logits [Q, C], boxes [Q, 4] cxcywh-n."""
    return PredictionGroup("main", logits[None, None], boxes[None, None], at_inference=True)


def _overlapping():
    boxes = torch.tensor(
        [[0.5, 0.5, 0.2, 0.2], [0.505, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]]
    )  # queries 0 and 1 overlap (IoU ~0.95); query 2 is elsewhere
    logits = torch.full((3, 2), -9.0)
    logits[0, 0], logits[1, 0], logits[1, 1], logits[2, 1] = 3.0, 2.0, 1.0, 0.0
    return logits, boxes


def test_top_k_ranks_query_class_pairs_and_scales_to_pixels():
    logits, boxes = _overlapping()
    (found,) = TopKSigmoidPostprocess(top_k=3)(_group(logits, boxes), SIZES)
    assert found.labels.tolist() == [0, 0, 1]
    torch.testing.assert_close(found.scores, torch.tensor([3.0, 2.0, 1.0]).sigmoid())
    torch.testing.assert_close(found.boxes_xyxy[0], torch.tensor([80.0, 40.0, 120.0, 60.0]))


def test_class_wise_nms_drops_same_class_duplicates_only():
    logits, boxes = _overlapping()
    (found,) = TopKSigmoidPostprocess(top_k=3, nms_iou_threshold=0.7)(_group(logits, boxes), SIZES)
    # (query 1, class 0) is suppressed by (query 0, class 0); (query 1, class 1) survives.
    assert found.labels.tolist() == [0, 1, 1]
    torch.testing.assert_close(found.scores, torch.tensor([3.0, 1.0, 0.0]).sigmoid())
    (capped,) = TopKSigmoidPostprocess(top_k=2, nms_iou_threshold=0.7)(_group(logits, boxes), SIZES)
    assert len(capped.scores) == 2


def test_softmax_keeps_every_query_with_its_best_real_class():
    logits = torch.tensor([[2.0, 0.0, 5.0], [0.0, 1.0, -1.0]])  # last logit: no object
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])
    (found,) = SoftmaxPostprocess()(_group(logits, boxes), SIZES)
    assert found.labels.tolist() == [0, 1]
    torch.testing.assert_close(
        found.scores, torch.stack([logits[0].softmax(0)[0], logits[1].softmax(0)[1]])
    )
