# SPDX-License-Identifier: Apache-2.0
import pytest
import torch

from detrkit.data.collate import collate
from detrkit.structures import ImageBatch, Target


def _target(num_boxes, image_id, size):
    return Target(
        labels=torch.zeros(num_boxes, dtype=torch.int64),
        boxes=torch.full((num_boxes, 4), 0.5),
        image_id=image_id,
        orig_size=size,
        size=size,
    )


def test_collate_pads_bottom_right_with_zeros_and_masks_padding():
    first = torch.randn(3, 4, 7)
    second = torch.randn(3, 6, 5)
    batch, targets = collate([(first, _target(2, 1, (4, 7))), (second, _target(0, 2, (6, 5)))])

    assert isinstance(batch, ImageBatch) and len(batch) == 2
    assert batch.pixels.shape == (2, 3, 6, 7)
    torch.testing.assert_close(batch.pixels[0, :, :4, :7], first)
    torch.testing.assert_close(batch.pixels[1, :, :6, :5], second)
    assert torch.count_nonzero(batch.pixels[0, :, 4:, :]) == 0
    assert torch.count_nonzero(batch.pixels[1, :, :, 5:]) == 0

    expected_mask = torch.ones(2, 6, 7, dtype=torch.bool)
    expected_mask[0, :4, :7] = False
    expected_mask[1, :6, :5] = False
    assert torch.equal(batch.padding_mask, expected_mask)
    assert batch.padding_mask.dtype == torch.bool
    assert torch.equal(batch.sizes, torch.tensor([[4, 7], [6, 5]]))
    assert batch.sizes.dtype == torch.int64
    assert [t.image_id for t in targets] == [1, 2] and [len(t) for t in targets] == [2, 0]


def test_same_size_images_have_no_padding():
    batch, _ = collate([(torch.ones(3, 5, 5), _target(1, 1, (5, 5)))] * 3)
    assert batch.pixels.shape == (3, 3, 5, 5)
    assert not batch.padding_mask.any()


def test_empty_batch_raises():
    with pytest.raises(ValueError):
        collate([])
