# SPDX-License-Identifier: Apache-2.0
"""``detrkit predict``: images or folders in; COCO-style JSON and drawn PNGs out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
    from detrkit.errors import UserError

    found = []
    for path in inputs:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{path} does not exist; give image files or folders")
    if not found:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {inputs}")
    return found


def run(args) -> int:
    from detrkit.cli.common import with_tta_options
    from detrkit.engine.distributed import choose_device
    from detrkit.inference import Predictor, load_model

    loaded = load_model(args.checkpoint, choose_device(args.device))
    loaded.config = with_tta_options(loaded.config, args)
    predictor = Predictor(loaded, args.precision or "fp32")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    paths = collect_images(args.inputs)
    records = []
    for start in range(0, len(paths), args.batch_size):
        chunk = paths[start : start + args.batch_size]
        records += predict_and_draw(predictor, chunk, args.output_dir, args.score_threshold)
    out = args.output_dir / "predictions.json"
    out.write_text(json.dumps(records, indent=1))
    print(f"{len(records)} detections in {len(paths)} images -> {out}", file=sys.stderr)
    return 0


def predict_and_draw(predictor, paths: list[Path], output_dir: Path, threshold: float) -> list:
    """Run the predictor on ``paths``; write ``<stem>.png`` drawings; return COCO-style records."""
    from detrkit.data.images import load_rgb_image
    from detrkit.visualize import draw_detections

    images = [load_rgb_image(p, index) for index, p in enumerate(paths)]
    records = []
    for path, image, pred in zip(paths, images, predictor(images)):
        keep = pred.scores >= threshold
        names = [n for n, k in zip(pred.names, keep.tolist()) if k]
        # Small images are drawn enlarged so that their labels stay readable.
        scale = max(1, MIN_DRAWN_SIDE // max(image.size))
        canvas = image.resize((image.width * scale, image.height * scale))
        drawn = draw_detections(
            canvas,
            pred.boxes_xyxy[keep] * scale,
            pred.scores[keep],
            names,
            score_threshold=threshold,
        )
        drawn.save(output_dir / f"{path.stem}.png")
        for box, score, cat, name in zip(
            pred.boxes_xyxy[keep].tolist(),
            pred.scores[keep].tolist(),
            pred.category_ids[keep].tolist(),
            names,
        ):
            x1, y1, x2, y2 = box
            records.append(
                {
                    "file_name": path.name,
                    "category_id": cat,
                    "category_name": name,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    return records
