# SPDX-License-Identifier: Apache-2.0
"""A small synthetic COCO-format dataset of coloured shapes, for tests, smoke runs and demos.

Images show circles, squares and triangles (category ids 1, 3 and 7: deliberately not
contiguous, to exercise the label map) on solid, gradient or noisy grey backgrounds. Shapes
cover 15-60% of the shorter image side and may overlap a little; boxes are the tight extent of
each shape's *visible* pixels. About 10% of the images are empty. A tiny detector learns it in a
few CPU minutes. Output is a function of the arguments only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
CATEGORY_IDS = (1, 3, 7)
# Saturated, well-separated base colours; backgrounds are grey, so colour alone separates
# objects from background while the shape separates the classes' overlapping colour ranges.
BASE_COLOURS = ((220, 60, 50), (60, 190, 70), (60, 90, 230))
COLOUR_JITTER = 30
EMPTY_FRACTION = 0.1
MAX_OBJECTS = 4
SIDE_FRACTION = (0.15, 0.6)
MIN_VISIBLE_FRACTION = 0.6  # an occluded shape keeps at least this share of its pixels
PLACEMENT_TRIES = 20
JPEG_EVERY = 4  # every 4th image is a JPEG, the others PNG
JPEG_QUALITY = 95


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """[H, W, 3] uint8 grey background: solid, linear gradient or noise."""
    kind = int(rng.integers(3))
    if kind == 0:
        return np.full((height, width, 3), int(rng.integers(40, 200)), dtype=np.uint8)
    if kind == 1:
        start, stop = rng.integers(30, 210, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:height, 0:width]
        t = xs / width * np.cos(angle) + ys / height * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        grey = start + (stop - start) * t
        return np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
    base = float(rng.integers(60, 180))
    grey = rng.normal(base, 25.0, size=(height, width))
    return np.repeat(np.clip(grey, 0, 255)[..., None], 3, axis=2).astype(np.uint8)


def _shape_mask(shape: int, x0: int, y0: int, side: int, width: int, height: int) -> np.ndarray:
    """[H, W] bool mask of one shape inside the side x side square at (x0, y0)."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    x1, y1 = x0 + side - 1, y0 + side - 1
    if SHAPES[shape] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif SHAPES[shape] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    else:
        draw.polygon(((x0 + (side - 1) / 2, y0), (x1, y1), (x0, y1)), fill=255)
    return np.asarray(canvas) > 0


def _place_shapes(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list]:
    """Draw objects in order; returns the owner map [H, W] (0 = background, k = k-th shape)
    and the class index of each shape."""
    owner = np.zeros((height, width), dtype=np.int16)
    classes: list[int] = []
    num_objects = 0 if rng.random() < EMPTY_FRACTION else int(rng.integers(1, MAX_OBJECTS + 1))
    short = min(width, height)
    for _ in range(num_objects):
        shape = int(rng.integers(len(SHAPES)))
        for _ in range(PLACEMENT_TRIES):
            side = max(8, int(rng.uniform(*SIDE_FRACTION) * short))
            x0 = int(rng.integers(0, width - side + 1))
            y0 = int(rng.integers(0, height - side + 1))
            mask = _shape_mask(shape, x0, y0, side, width, height)
            if _keeps_others_visible(owner, mask, len(classes)):
                classes.append(shape)
                owner[mask] = len(classes)
                break
    return owner, classes


def _keeps_others_visible(owner: np.ndarray, mask: np.ndarray, num_placed: int) -> bool:
    for k in range(1, num_placed + 1):
        visible = owner == k
        if np.count_nonzero(visible & ~mask) < MIN_VISIBLE_FRACTION * np.count_nonzero(visible):
            return False
    return True


def _render(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, list]:
    """One image and its objects as (class index, [x, y, w, h], visible area)."""
    pixels = background(rng, width, height)
    owner, classes = _place_shapes(rng, width, height)
    objects = []
    for k, shape in enumerate(classes, start=1):
        colour = np.asarray(BASE_COLOURS[shape]) + rng.integers(
            -COLOUR_JITTER, COLOUR_JITTER + 1, 3
        )
        visible = owner == k
        pixels[visible] = np.clip(colour, 0, 255).astype(np.uint8)
        ys, xs = np.nonzero(visible)
        x_min, y_min = int(xs.min()), int(ys.min())
        box = [x_min, y_min, int(xs.max()) + 1 - x_min, int(ys.max()) + 1 - y_min]
        objects.append((shape, [float(v) for v in box], float(visible.sum())))
    return Image.fromarray(pixels, mode="RGB"), objects


# render(rng, width, height) -> (image, [(category id, [x, y, w, h], visible area), ...])
Renderer = Callable[[np.random.Generator, int, int], tuple[Image.Image, list]]


def write_split(
    root: Path,
    split: str,
    num_images: int,
    rng: np.random.Generator,
    size_range: tuple[int, int],
    render: Renderer,
    categories: list[dict[str, Any]],
    description: str,
    jpeg_every: int | None = JPEG_EVERY,
) -> None:
    """Render ``num_images`` images into ``root/split`` and write their COCO annotation file
    ``root/annotations/instances_{split}.json``; every ``jpeg_every``-th image is a JPEG
    (None: all PNG). Shared by the synthetic datasets."""
    images_dir = root / split
    images_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id in range(1, num_images + 1):
        width, height = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
        image, objects = render(rng, width, height)
        jpeg = jpeg_every is not None and image_id % jpeg_every == 0
        file_name = f"{image_id:06d}{'.jpg' if jpeg else '.png'}"
        if jpeg:
            image.save(images_dir / file_name, quality=JPEG_QUALITY)
        else:
            image.save(images_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for category_id, box, area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "bbox": box,
                    "area": area,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": description, "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"instances_{split}.json", "w", encoding="utf-8") as f:
        json.dump(coco, f, indent=1)


def write_dataset(
    out_dir: Path,
    counts: tuple[int, int],
    seed_key: list[int],
    size_range: tuple[int, int],
    render: Renderer,
    categories: list[dict[str, Any]],
    description: str,
    jpeg_every: int | None = JPEG_EVERY,
) -> Path:
    """Write the train and val splits (``counts`` images) with ``write_split``; each split draws
    from its own stream ``seed_key[0], split index, *seed_key[1:]``, so the train count never
    changes the validation images. Returns ``out_dir``."""
    if min(counts) < 0:
        raise ValueError("image counts must be >= 0")
    root = Path(out_dir)
    for stream, (split, count) in enumerate(zip(("train", "val"), counts, strict=True)):
        rng = np.random.default_rng([seed_key[0], stream, *seed_key[1:]])
        args = (root, split, count, rng, size_range, render, categories, description)
        write_split(*args, jpeg_every=jpeg_every)
    return root


def _render_with_ids(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, list]:
    image, objects = _render(rng, width, height)
    return image, [(CATEGORY_IDS[shape], box, area) for shape, box, area in objects]


CATEGORIES = [
    {"id": cat_id, "name": name, "supercategory": "shape"}
    for cat_id, name in zip(CATEGORY_IDS, SHAPES, strict=True)
]


def write_synthetic_coco(
    out_dir: Path,
    num_train: int,
    num_val: int,
    seed: int,
    *,
    min_size: int = 64,
    max_size: int = 128,
) -> Path:
    """Write a COCO-format folder of shape images and return its root (``out_dir``).

    Layout: ``annotations/instances_{train,val}.json``, images in ``train/`` and ``val/``
    (PNG, every 4th JPEG). Widths and heights are drawn independently in
    ``[min_size, max_size]``. Boxes are COCO ``[x, y, w, h]`` in pixels, tight around the visible
    pixels of each shape; ``area`` is the visible pixel count. The same arguments always write
    the same files; each split has its own random stream, so ``num_train`` does not change
    the validation images.
    """
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got {min_size}, {max_size}")
    return write_dataset(
        out_dir,
        (num_train, num_val),
        [seed],
        (min_size, max_size),
        _render_with_ids,
        CATEGORIES,
        "detrkit synthetic shapes",
    )
