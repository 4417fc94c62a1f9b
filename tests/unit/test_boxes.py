# SPDX-License-Identifier: Apache-2.0
import torch
from torchvision.ops import generalized_box_iou

from detrkit.ops.boxes import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    inverse_sigmoid,
    paired_generalized_box_iou,
)


def _random_xyxy(n: int) -> torch.Tensor:
    corner = torch.rand(n, 2)
    return torch.cat((corner, corner + torch.rand(n, 2) + 0.01), dim=1)


def test_round_trip():
    boxes = _random_xyxy(50)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes)


def test_known_conversion():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))


def test_paired_giou_equals_torchvision_diagonal():
    a, b = _random_xyxy(40), _random_xyxy(40)
    torch.testing.assert_close(paired_generalized_box_iou(a, b), generalized_box_iou(a, b).diag())


def test_giou_of_identical_boxes_is_one_and_disjoint_negative():
    a = _random_xyxy(5)
    torch.testing.assert_close(paired_generalized_box_iou(a, a), torch.ones(5))
    far = a + 10.0
    assert (paired_generalized_box_iou(a, far) < 0).all()


def test_degenerate_point_box_against_itself_is_nan_free_elsewhere():
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    other = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    value = paired_generalized_box_iou(point, other)
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value, torch.tensor([0.0]))


def test_inverse_sigmoid_clamps():
    x = torch.tensor([-1.0, 0.0, 0.3, 1.0, 2.0])
    out = inverse_sigmoid(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[2], torch.logit(torch.tensor(0.3)))
    torch.testing.assert_close(out[0], out[1])
    torch.testing.assert_close(out[3], -out[1])
