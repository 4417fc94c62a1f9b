# SPDX-License-Identifier: Apache-2.0
"""Pictures for people: detections drawn on an image, and training curves from the JSONL log."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

# Kelly's colours of maximum contrast (minus white and black), as 0-255 RGB.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 179, 0), (128, 62, 117), (255, 104, 0), (166, 189, 215), (193, 0, 32),
    (206, 162, 98), (129, 112, 102), (0, 125, 52), (246, 118, 142), (0, 83, 138),
    (255, 122, 92), (83, 55, 122), (255, 142, 0), (179, 40, 81), (244, 200, 0),
    (127, 24, 13), (147, 170, 0), (89, 51, 21), (241, 58, 19), (35, 44, 22),
)  # fmt: skip

# Line width and font size as fractions of the shorter image side, with readable minimums.
_LINE_WIDTH_FRACTION, _MIN_LINE_WIDTH = 1 / 250, 2
_FONT_FRACTION, _MIN_FONT_SIZE = 1 / 40, 12


def class_colors(names: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """A palette colour per distinct name: stable across images, distinct within one call.

    A name's colour is picked by a hash of the name (so "dog" looks the same in every image);
    when two names of the call land on the same colour, the later one moves to the next free one.
    """
    colors: dict[str, tuple[int, int, int]] = {}
    used: set[int] = set()
    for name in sorted(set(names)):
        index = zlib.crc32(name.encode("utf-8")) % len(PALETTE)
        for _ in range(len(PALETTE)):
            if index not in used:
                break
            index = (index + 1) % len(PALETTE)
        used.add(index)
        if len(used) == len(PALETTE):  # more classes than colours: start reusing them
            used.clear()
        colors[name] = PALETTE[index]
    return colors


def draw_detections(
    image: Image.Image,
    boxes_xyxy: Any,
    scores: Any,
    names: Sequence[str],
    score_threshold: float = 0.3,
) -> Image.Image:
    """Draw boxes with "name score" captions on a copy of ``image``.

    Args:
        image: any PIL image; the result is an RGB copy of the same size.
        boxes_xyxy: [N, 4] absolute pixel boxes (tensor, array or nested sequence).
        scores: [N] confidences.
        names: [N] class name of each detection (one colour per distinct name).
        score_threshold: detections scoring below it are not drawn.

    Returns:
        The annotated image; higher scores are drawn last, on top.
    """
    boxes, confidences = _as_list(boxes_xyxy), [float(s) for s in _as_list(scores)]
    if not len(boxes) == len(confidences) == len(names):
        raise ValueError(f"{len(boxes)} boxes, {len(confidences)} scores, {len(names)} names")
    canvas = image.convert("RGB")  # always a copy, even for RGB input
    draw = ImageDraw.Draw(canvas)
    short_side = min(canvas.size)
    width = max(_MIN_LINE_WIDTH, round(short_side * _LINE_WIDTH_FRACTION))
    font = ImageFont.load_default(size=max(_MIN_FONT_SIZE, round(short_side * _FONT_FRACTION)))
    kept = [i for i, score in enumerate(confidences) if score >= score_threshold]
    colors = class_colors([names[i] for i in kept])
    for i in sorted(kept, key=lambda i: confidences[i]):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        color = colors[names[i]]
        draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=color, width=width)
        _draw_caption(draw, (x1, y1), f"{names[i]} {confidences[i]:.2f}", color, font)
    return canvas


def _draw_caption(
    draw: ImageDraw.ImageDraw,
    corner: tuple[float, float],
    text: str,
    color: tuple[int, int, int],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> None:
    """Text on a filled box in the class colour, above the box corner (inside if no room)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    text_w, text_h, pad = right - left, bottom - top, 2
    x, y = corner
    y = y - text_h - 2 * pad if y - text_h - 2 * pad >= 0 else y
    draw.rectangle((x, y, x + text_w + 2 * pad, y + text_h + 2 * pad), fill=color)
    draw.text((x + pad - left, y + pad - top), text, fill=_text_color(color), font=font)


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones (ITU-R BT.601 luma)."""
    red, green, blue = background
    luma = 0.299 * red + 0.587 * green + 0.114 * blue
    return (0, 0, 0) if luma > 140 else (255, 255, 255)


def _as_list(values: Any) -> list:
    """Tensors and arrays become nested Python lists; sequences are used as they are."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu()
    return values.tolist() if hasattr(values, "tolist") else list(values)


def plot_curves(records: Sequence[dict], out_png: Path | str) -> None:
    """Plot training loss against step and eval AP / AP50 against epoch into a PNG.

    Args:
        records: JSONL log records; ``{"kind": "train", "step", "loss"}`` rows feed the left
            panel and ``{"kind": "eval", "epoch", "AP", "AP50"}`` rows the right one. Other rows
            are ignored; without eval rows the right panel says so.
        out_png: where the PNG goes (parent folders are created).
    """
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train = [r for r in records if r.get("kind") == "train" and "loss" in r and "step" in r]
    evals = [r for r in records if r.get("kind") == "eval" and "epoch" in r]
    figure = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, ap_axes = figure.subplots(1, 2)
    loss_axes.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    loss_axes.set(title="training loss", xlabel="step", ylabel="loss")
    ap_axes.set(title="evaluation", xlabel="epoch", ylabel="COCO box AP")
    ap_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for key in ("AP", "AP50"):
        points = [(r["epoch"], r[key]) for r in evals if key in r]
        if points:
            ap_axes.plot(*zip(*points, strict=True), marker="o", label=key)
    if any(key in r for r in evals for key in ("AP", "AP50")):
        ap_axes.legend()
    else:
        ap_axes.text(0.5, 0.5, "no evaluation yet", ha="center", va="center",
                     transform=ap_axes.transAxes)  # fmt: skip
    for axes in (loss_axes, ap_axes):
        axes.grid(alpha=0.3)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png, format="png", dpi=100)
