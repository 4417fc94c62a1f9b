# SPDX-License-Identifier: Apache-2.0
"""draw_detections and plot_curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit.visualize import class_colors, draw_detections, plot_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _image() -> Image.Image:
    return Image.new("RGB", (160, 120), (128, 128, 128))


def test_draw_keeps_size_and_marks_box_pixels():
    image = _image()
    boxes = torch.tensor([[20.0, 40.0, 100.0, 110.0], [5.0, 5.0, 30.0, 30.0]])
    out = draw_detections(image, boxes, torch.tensor([0.9, 0.1]), ["cat", "dog"])
    assert out.size == image.size and out.mode == "RGB"
    before, after = np.asarray(image), np.asarray(out)
    assert (after[75, 20] != before[75, 20]).any()  # left edge of the kept box
    assert (after[75, 60] == before[75, 60]).all()  # inside the box: untouched
    assert (after[20, 5] == before[20, 5]).all()  # below-threshold box: not drawn
    assert (np.asarray(image) == 128).all()  # the input is not modified


def test_draw_with_nothing_to_draw_and_plain_lists():
    image = Image.new("L", (64, 48))
    out = draw_detections(image, [], [], [])
    assert out.size == image.size
    out = draw_detections(image, [[1, 2, 30, 40]], [0.5], ["person"], score_threshold=0.6)
    assert (np.asarray(out) == 0).all()
    with pytest.raises(ValueError, match="names"):
        draw_detections(image, [[1, 2, 30, 40]], [0.5], [])


def test_class_colours_are_distinct_and_stable():
    names = [f"class{i}" for i in range(12)]
    colors = class_colors(names)
    assert len(set(colors.values())) == len(names)
    assert class_colors(["class3"])["class3"] == class_colors(["class3", "other"])["class3"]


def test_two_classes_drawn_in_different_colours():
    boxes = [[10, 10, 70, 100], [90, 10, 150, 100]]
    out = np.asarray(draw_detections(_image(), boxes, [0.9, 0.8], ["cat", "dog"]))
    assert (out[80, 10] != out[80, 90]).any()


def _records(with_eval: bool) -> list[dict]:
    records = [{"kind": "train", "step": s, "loss": 5.0 / (s + 1), "lr": 1e-4} for s in range(50)]
    if with_eval:
        records += [
            {"kind": "eval", "epoch": e, "step": 10 * e, "AP": 0.1 * e, "AP50": 0.2 * e}
            for e in range(1, 4)
        ]
    return records


@pytest.mark.parametrize("with_eval", [True, False])
def test_plot_curves_writes_png(tmp_path: Path, with_eval: bool):
    out = tmp_path / "plots" / "curves.png"
    plot_curves(_records(with_eval), out)
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(out) as png:
        png.verify()
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 100


def test_plot_curves_with_no_records(tmp_path: Path):
    out = tmp_path / "empty.png"
    plot_curves([], out)
    assert out.read_bytes()[:8] == PNG_SIGNATURE
