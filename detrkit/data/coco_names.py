# SPDX-License-Identifier: Apache-2.0
"""COCO 2017 category names by category id, for checkpoints converted from the originals.

The originals predict raw COCO category ids (1..90 with gaps, docs/methods.md#coco-category-ids);
detrkit gives their
converted checkpoints an identity label map whose names come from here.
"""

from __future__ import annotations

COCO_CATEGORY_NAMES: dict[int, str] = {
    1: "person",
    2: "bicycle",
    3: "car",
    4: "motorcycle",
    5: "airplane",
    6: "bus",
    7: "train",
    8: "truck",
    9: "boat",
    10: "traffic light",
    11: "fire hydrant",
    13: "stop sign",
    14: "parking meter",
    15: "bench",
    16: "bird",
    17: "cat",
    18: "dog",
    19: "horse",
    20: "sheep",
    21: "cow",
    22: "elephant",
    23: "bear",
    24: "zebra",
    25: "giraffe",
    27: "backpack",
    28: "umbrella",
    31: "handbag",
    32: "tie",
    33: "suitcase",
    34: "frisbee",
    35: "skis",
    36: "snowboard",
    37: "sports ball",
    38: "kite",
    39: "baseball bat",
    40: "baseball glove",
    41: "skateboard",
    42: "surfboard",
    43: "tennis racket",
    44: "bottle",
    46: "wine glass",
    47: "cup",
    48: "fork",
    49: "knife",
    50: "spoon",
    51: "bowl",
    52: "banana",
    53: "apple",
    54: "sandwich",
    55: "orange",
    56: "broccoli",
    57: "carrot",
    58: "hot dog",
    59: "pizza",
    60: "donut",
    61: "cake",
    62: "chair",
    63: "couch",
    64: "potted plant",
    65: "bed",
    67: "dining table",
    70: "toilet",
    72: "tv",
    73: "laptop",
    74: "mouse",
    75: "remote",
    76: "keyboard",
    77: "cell phone",
    78: "microwave",
    79: "oven",
    80: "toaster",
    81: "sink",
    82: "refrigerator",
    84: "book",
    85: "clock",
    86: "vase",
    87: "scissors",
    88: "teddy bear",
    89: "hair drier",
    90: "toothbrush",
}


# The originals' COCO class heads: ids 0..90 (DETR and the Deformable family); SMCA adds a 92nd
# logit that is never a target.
COCO_SLOT_COUNTS = (91, 92)


def coco_label_names(num_classes: int) -> tuple[str, ...]:
    """Names of labels 0..num_classes-1 when label == COCO category id ("N/A" for unused ids)."""
    return tuple(COCO_CATEGORY_NAMES.get(i, "N/A") for i in range(num_classes))


def coco_unused_ids(num_classes: int) -> tuple[int, ...]:
    """Ids in 0..num_classes-1 that COCO 2017 never uses (the "N/A" slots)."""
    return tuple(i for i in range(num_classes) if i not in COCO_CATEGORY_NAMES)
