# SPDX-License-Identifier: Apache-2.0
"""A crowded synthetic COCO-format dataset: many small, overlapping objects of 12 classes.

Where ``synth.py`` draws one to four large shapes of three classes, this one is closer to
COCO's statistics, so that methods claimed to help on crowded scenes can show it:

* 12 classes (4 shapes x 3 colours) with a long-tailed frequency (class r is drawn with
  probability proportional to 1 / (r + 1)): the most common class is about 12x the rarest;
* about 9 objects per image on average (5 % of the images are empty, the rest hold 1 + Poisson(9),
  at most 40), half of the images with a crowd: a cluster that takes 40 % of the objects;
* sides log-uniform in 4-40 % of the shorter image side, so small objects dominate;
* occlusion (a shape drawn later may hide up to 65 % of an earlier one) and truncation at the
  image borders; boxes are the tight extent of the *visible* pixels.

Output is a function of the arguments only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from detrkit.data.synth import background, write_dataset

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (215, 55, 45), "green": (55, 185, 65), "blue": (55, 85, 225)}
CLASSES = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)
# Non-contiguous ids, as COCO's, to exercise the label map.
CATEGORY_IDS = tuple(2 * k + 1 for k in range(len(CLASSES)))
CLASS_PROBABILITIES = np.array([1.0 / (k + 1) for k in range(len(CLASSES))])
CLASS_PROBABILITIES /= CLASS_PROBABILITIES.sum()
COLOUR_JITTER = 25
EMPTY_FRACTION = 0.05
MEAN_EXTRA_OBJECTS = 9.0
MAX_OBJECTS = 40
CROWD_FRACTION = 0.5  # images with a crowd
CROWD_SHARE = 0.4  # share of a crowded image's objects placed in its cluster
CROWD_SPREAD = 0.12  # cluster std, as a fraction of the shorter side
SIDE_FRACTION = (0.04, 0.4)  # log-uniform
MIN_VISIBLE_FRACTION = 0.35
MIN_VISIBLE_PIXELS = 12
PLACEMENT_TRIES = 10


def _shape_mask(shape: str, x0: float, y0: float, side: int, width: int, height: int) -> np.ndarray:
    """[H, W] bool mask of one shape in the side x side square at (x0, y0), clipped to the
    image (the square may stick out of it)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1 = x0 + side - 1, y0 + side - 1
    xc, yc = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon(((xc, y0), (x1, y1), (x0, y1)), fill=255)
    else:
        draw.polygon(((xc, y0), (x1, yc), (xc, y1), (x0, yc)), fill=255)
    return np.asarray(canvas) > 0


def _corner(
    rng: np.random.Generator, side: int, width: int, height: int, crowd: np.ndarray | None
) -> tuple[float, float]:
    """Top-left corner of a shape's square: around the crowd's centre, or anywhere with up to a
    third of the square outside the image."""
    if crowd is not None:
        spread = CROWD_SPREAD * min(width, height)
        cx, cy = crowd + rng.normal(0.0, spread, 2)
        return float(cx - side / 2), float(cy - side / 2)
    margin = side / 3
    return (
        float(rng.uniform(-margin, width - side + margin)),
        float(rng.uniform(-margin, height - side + margin)),
    )


def _still_visible(owner: np.ndarray, mask: np.ndarray, sizes: list[int]) -> bool:
    """Would every shape already drawn keep enough of its pixels under ``mask``?"""
    hidden = np.bincount(owner[mask], minlength=len(sizes) + 1)[1:]
    kept = np.asarray(sizes) - hidden
    return bool(np.all(kept >= np.maximum(MIN_VISIBLE_FRACTION * np.asarray(sizes), 1)))


def _place_objects(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list]:
    """Draw objects in order; returns the owner map [H, W] (0 = background, k = k-th object)
    and the class index of each object."""
    owner = np.zeros((height, width), dtype=np.int32)
    classes: list[int] = []
    sizes: list[int] = []
    if rng.random() < EMPTY_FRACTION:
        return owner, classes
    count = min(MAX_OBJECTS, 1 + int(rng.poisson(MEAN_EXTRA_OBJECTS)))
    crowd_centre = None
    if rng.random() < CROWD_FRACTION:
        crowd_centre = rng.uniform(0.2, 0.8, 2) * np.array([width, height])
    short = min(width, height)
    low, high = np.log(SIDE_FRACTION[0] * short), np.log(SIDE_FRACTION[1] * short)
    for index in range(count):
        label = int(rng.choice(len(CLASSES), p=CLASS_PROBABILITIES))
        in_crowd = crowd_centre is not None and index < CROWD_SHARE * count
        for _ in range(PLACEMENT_TRIES):
            side = max(4, int(np.exp(rng.uniform(low, high))))
            x0, y0 = _corner(rng, side, width, height, crowd_centre if in_crowd else None)
            mask = _shape_mask(CLASSES[label][1], x0, y0, side, width, height)
            if mask.sum() >= MIN_VISIBLE_PIXELS and _still_visible(owner, mask, sizes):
                for k in np.unique(owner[mask]):
                    if k:
                        sizes[k - 1] -= int(np.count_nonzero(owner[mask] == k))
                classes.append(label)
                sizes.append(int(mask.sum()))
                owner[mask] = len(classes)
                break
    return owner, classes


def _render(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, list]:
    """One image and its objects as (class index, [x, y, w, h], visible area)."""
    pixels = background(rng, width, height)
    owner, classes = _place_objects(rng, width, height)
    objects = []
    for k, label in enumerate(classes, start=1):
        base = np.asarray(COLOURS[CLASSES[label][0]])
        colour = base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
        visible = owner == k
        pixels[visible] = np.clip(colour, 0, 255).astype(np.uint8)
        ys, xs = np.nonzero(visible)
        x_min, y_min = int(xs.min()), int(ys.min())
        box = [x_min, y_min, int(xs.max()) + 1 - x_min, int(ys.max()) + 1 - y_min]
        objects.append((label, [float(v) for v in box], float(visible.sum())))
    return Image.fromarray(pixels, mode="RGB"), objects


def _render_with_ids(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, list]:
    image, objects = _render(rng, width, height)
    return image, [(CATEGORY_IDS[label], box, area) for label, box, area in objects]


CATEGORIES = [
    {"id": cat_id, "name": f"{colour} {shape}", "supercategory": shape}
    for cat_id, (colour, shape) in zip(CATEGORY_IDS, CLASSES, strict=True)
]


def write_crowded_coco(
    out_dir: Path,
    num_train: int,
    num_val: int,
    seed: int,
    *,
    min_size: int = 128,
    max_size: int = 192,
) -> Path:
    """Write a COCO-format folder of crowded scenes and return its root (``out_dir``).

    Layout as ``write_synthetic_coco``: ``annotations/instances_{train,val}.json``, PNG images in
    ``train/`` and ``val/``; widths and heights drawn independently in ``[min_size, max_size]``;
    boxes COCO ``[x, y, w, h]`` in pixels around each object's visible pixels, ``area`` its
    visible pixel count. Each split has its own random stream.
    """
    if not 32 <= min_size <= max_size:
        raise ValueError(f"need 32 <= min_size <= max_size, got {min_size}, {max_size}")
    return write_dataset(
        out_dir,
        (num_train, num_val),
        [seed, 1],  # streams apart from the shapes dataset's
        (min_size, max_size),
        _render_with_ids,
        CATEGORIES,
        "detrkit synthetic crowded shapes",
        jpeg_every=None,
    )
