# SPDX-License-Identifier: Apache-2.0
"""``detrkit predict``: images or folders in; COCO-style JSON and drawn PNGs out."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from detrkit.cli.common import add_tta_options

MIN_DRAWN_SIDE = 384
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


def register(commands, add_config, add_run) -> None:
    parser = commands.add_parser("predict", help="detect objects in images")
    parser.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint or run folder")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument(
        "--score-threshold", type=float, default=0.3, help="minimum score drawn and written"
    )
    parser.add_argument("--batch-size", type=int, default=2)
    add_tta_options(parser)
    add_run(parser)
    parser.set_defaults(run=run)


def collect_images(inputs: list[Path]) -> list[Path]:
    """The image files among ``inputs`` and inside its folders (not recursive), each once.

    Raises:
        UserError: an input does not exist, or no image was found.
    """
    from detrkit.errors import UserError

    found: dict[Path, Path] = {}  # normalised absolute path -> as given, in order
    for path in inputs:
        if path.is_dir():
            images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            images = [path]
        else:
            raise UserError(f"{path} does not exist; give image files or folders")
        for image in images:
            found.setdefault(_normalised(image), image)
    if not found:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {inputs}")
    return list(found.values())


def _normalised(path: Path) -> Path:
    return Path(os.path.normpath(path.absolute()))


@dataclass(frozen=True)
class PredictItem:
    """One input image and where its outputs go.

    Attributes:
        path: the file read.
        name: its path relative to the deepest folder holding all inputs (``file_name`` of its
            records), so ``a/x.jpg`` and ``b/x.jpg`` stay apart.
        drawing: the PNG drawn, relative to the output folder.
    """

    path: Path
    name: PurePath
    drawing: PurePath


def plan_outputs(paths: Sequence[Path]) -> list[PredictItem]:
    """Names and drawings of ``paths`` (see :class:`PredictItem`); drawings are ``<name>.png``,
    made unique when two images differ only by suffix (``x.jpg``, ``x.png`` -> ``x.png``,
    ``x_png.png``)."""
    absolute = [_normalised(p) for p in paths]
    root = Path(os.path.commonpath([p.parent for p in absolute]))
    taken: set[PurePath] = set()
    items = []
    for path, full in zip(paths, absolute):
        name = PurePath(full.relative_to(root))
        drawing = name.with_suffix(".png")
        if drawing in taken:
            drawing = name.with_name(f"{name.stem}_{name.suffix.lstrip('.')}.png")
        counter = 1
        while drawing in taken:
            drawing, counter = name.with_name(f"{name.stem}_{counter}.png"), counter + 1
        taken.add(drawing)
        items.append(PredictItem(path, name, drawing))
    return items


def run(args) -> int:
    from detrkit.cli.common import with_tta_options
    from detrkit.engine.distributed import choose_device
    from detrkit.errors import UserError
    from detrkit.inference import Predictor, load_model

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    items = plan_outputs(collect_images(args.inputs))  # a wrong path fails before the model loads
    loaded = load_model(args.checkpoint, choose_device(args.device))
    loaded.config = with_tta_options(loaded.config, args)
    predictor = Predictor(loaded, args.precision or "fp32", batch_size=args.batch_size)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for start in range(0, len(items), args.batch_size):
        chunk = items[start : start + args.batch_size]
        records += predict_and_draw(predictor, chunk, args.output_dir, args.score_threshold)
    out = args.output_dir / "predictions.json"
    out.write_text(json.dumps(records, indent=1))
    print(f"{len(records)} detections in {len(items)} images -> {out}", file=sys.stderr)
    return 0


def predict_and_draw(
    predictor, images: Sequence[Path] | Sequence[PredictItem], output_dir: Path, threshold: float
) -> list[dict]:
    """Run the predictor on ``images`` (paths, or items of :func:`plan_outputs`); draw each to
    ``<output_dir>/<drawing>``; return COCO-style records (``bbox``: x, y, w, h in pixels)."""
    from detrkit.image_inputs import open_image
    from detrkit.visualize import draw_detections

    items = [i for i in images if isinstance(i, PredictItem)] or plan_outputs(images)
    pictures = [open_image(item.path) for item in items]
    records = []
    for item, image, pred in zip(items, pictures, predictor(pictures)):
        pred = pred.above(threshold)
        # Small images are drawn enlarged so that their labels stay readable.
        scale = max(1, MIN_DRAWN_SIDE // max(image.size))
        canvas = image.resize((image.width * scale, image.height * scale))
        drawn = draw_detections(
            canvas, pred.boxes_xyxy * scale, pred.scores, pred.names, score_threshold=threshold
        )
        (output_dir / item.drawing).parent.mkdir(parents=True, exist_ok=True)
        drawn.save(output_dir / item.drawing)
        for box, score, cat, label in zip(
            pred.boxes_xyxy.tolist(), pred.scores.tolist(), pred.category_ids.tolist(), pred.names
        ):
            x1, y1, x2, y2 = box
            records.append(
                {
                    "file_name": item.name.as_posix(),
                    "category_id": cat,
                    "category_name": label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    return records
