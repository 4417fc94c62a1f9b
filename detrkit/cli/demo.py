# SPDX-License-Identifier: Apache-2.0
"""``detrkit demo``: synthetic data -> short CPU training -> COCO table -> drawn predictions."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

# About 2.5 minutes on a quiet 2-core CPU (AP ~0.36); ``--full`` trains 40 epochs (~7 minutes).
DEMO_PRESET = "deformable_detr_tiny_demo"
FULL_PRESET = "deformable_detr_tiny"
NUM_DRAWN = 6


def register(commands, add_config, add_run) -> None:
    parser = commands.add_parser(
        "demo", help="train and evaluate a tiny detector on synthetic data"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--num-val", type=int, default=32)
    parser.add_argument(
        "--config",
        default=None,
        help=f"preset or YAML to train (default: {DEMO_PRESET}; with --full: {FULL_PRESET})",
    )
    parser.add_argument(
        "--full", action="store_true", help=f"train the longer schedule of {FULL_PRESET}"
    )
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    add_run(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from detrkit.cli.common import config_from_args
    from detrkit.data.synth import write_synthetic_coco
    from detrkit.engine.trainer import Trainer

    started = time.perf_counter()
    data_dir = args.output_dir / "data"
    if not (data_dir / "annotations").is_dir():
        write_synthetic_coco(data_dir, args.num_train, args.num_val, seed=0)
    args.data = str(data_dir)
    args.config = args.config or (FULL_PRESET if args.full else DEMO_PRESET)
    cfg = config_from_args(args)
    run_dir = args.output_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always trains from scratch
    trainer = Trainer(cfg, run_dir, device=args.device)
    metrics = trainer.fit()
    drawn = draw_examples(run_dir, data_dir / "val", args.device)
    minutes, seconds = divmod(round(time.perf_counter() - started), 60)
    print(
        f"\nAP {metrics['AP']:.3f}  AP50 {metrics['AP50']:.3f}  ({args.config}, "
        f"{minutes} min {seconds:02d} s)\n"
        f"drawn predictions: {drawn}\ncurves: {run_dir / 'curves.png'}",
        file=sys.stderr,
    )
    return 0


def draw_examples(run_dir: Path, images_dir: Path, device: str | None) -> Path:
    from detrkit.cli.predict import collect_images, predict_and_draw
    from detrkit.inference import Predictor

    predictor = Predictor.from_checkpoint(run_dir, device)
    out = run_dir / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    predict_and_draw(predictor, collect_images([images_dir])[:NUM_DRAWN], out, threshold=0.3)
    return out
