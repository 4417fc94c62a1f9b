# SPDX-License-Identifier: Apache-2.0
import json

import pytest
import torch

from detrkit.data.labels import LabelMap

CATEGORIES = [
    {"id": 7, "name": "triangle"},
    {"id": 1, "name": "circle"},
    {"id": 3, "name": "square"},
]


def test_from_coco_categories_sorts_ids_and_keeps_names_aligned():
    label_map = LabelMap.from_coco_categories(CATEGORIES)
    assert label_map.category_ids == (1, 3, 7)
    assert label_map.names == ("circle", "square", "triangle")
    assert label_map.num_classes == 3


def test_labels_and_category_ids_map_both_ways():
    label_map = LabelMap.from_coco_categories(CATEGORIES)
    assert [label_map.to_label(c) for c in (1, 3, 7)] == [0, 1, 2]
    assert [label_map.to_category(i) for i in range(3)] == [1, 3, 7]
    labels = torch.tensor([[2, 0], [1, 1]])
    torch.testing.assert_close(label_map.to_category(labels), torch.tensor([[7, 1], [3, 3]]))
    assert label_map.to_category(torch.empty(0, dtype=torch.int64)).shape == (0,)


def test_unknown_ids_and_labels_raise():
    label_map = LabelMap.from_coco_categories(CATEGORIES)
    with pytest.raises(KeyError, match="category id 2"):
        label_map.to_label(2)
    with pytest.raises(IndexError):
        label_map.to_category(3)
    with pytest.raises(IndexError):
        label_map.to_category(torch.tensor([0, 3]))


def test_dict_round_trip_through_json():
    label_map = LabelMap.from_coco_categories(CATEGORIES)
    restored = LabelMap.from_dict(json.loads(json.dumps(label_map.to_dict())))
    assert restored == label_map
    assert restored.to_label(7) == 2


def test_identity_map():
    label_map = LabelMap.identity(4)
    assert label_map.category_ids == (0, 1, 2, 3)
    assert label_map.names == ("0", "1", "2", "3")
    assert label_map.to_label(3) == 3


def test_invalid_maps_are_rejected():
    with pytest.raises(ValueError, match="more than once"):
        LabelMap.from_coco_categories([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(ValueError, match="sorted"):
        LabelMap((3, 1), ("a", "b"))
    with pytest.raises(ValueError, match="names"):
        LabelMap((1, 2), ("a",))
    with pytest.raises(ValueError, match="missing"):
        LabelMap.from_dict({"names": []})
