# SPDX-License-Identifier: Apache-2.0
"""``detrkit eval``: COCO metrics of a checkpoint on a dataset split."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

from detrkit.cli.common import add_tta_options, check_data_folder

# Characters kept from each part of an evaluation file name; others (and "_", which separates
# the parts, so a name splits back unambiguously) become "-".
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")


def register(commands, add_config, add_run) -> None:
    parser = commands.add_parser("eval", help="evaluate a checkpoint (COCO metrics)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint or run folder")
    parser.add_argument("--data", required=True, help="COCO-format dataset folder")
    parser.add_argument("--split", default=None, help="split name (default: the config's val)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where to write the metrics and detections JSON (default: the checkpoint's run "
        "folder)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="(default: the config's data.eval_batch_size)"
    )
    add_tta_options(parser)
    add_run(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from detrkit.engine.data import eval_loader, open_split
    from detrkit.engine.distributed import choose_device
    from detrkit.engine.evaluate import evaluate
    from detrkit.engine.precision import Precision
    from detrkit.errors import UserError
    from detrkit.evaluation.coco_eval import format_per_class_table
    from detrkit.inference import load_model

    # Both paths are checked before the model is loaded, the checkpoint first (it comes first).
    if not args.checkpoint.exists():
        raise UserError(f"--checkpoint {args.checkpoint}: no such checkpoint file or run folder")
    check_data_folder(args.data)
    device = choose_device(args.device)
    loaded = load_model(args.checkpoint, device)
    data_cfg = replace(loaded.config.data, root=args.data)
    if args.batch_size:
        data_cfg = replace(data_cfg, eval_batch_size=args.batch_size)
    split = args.split or data_cfg.val_split
    dataset = open_split(
        data_cfg, split, train=False, label_map=loaded.label_map, known_categories_only=True
    )
    # Labels the file has no category for (unused slots of a converted checkpoint, classes the
    # dataset lacks) never score, so they take no place among a query's or an image's top-k.
    evaluated = dataset.file_categories.category_ids
    precision = Precision(args.precision or "fp32", device.type)
    from detrkit.cli.common import with_tta_options
    from detrkit.config.build import build_postprocess, build_tta

    config = with_tta_options(loaded.config, args)
    metrics, results = evaluate(
        loaded.model,
        build_postprocess(loaded.config.model, loaded.label_map.ignored_labels(evaluated)),
        eval_loader(dataset, data_cfg),
        dataset.coco_json,
        loaded.label_map.category_table(evaluated),
        device,
        precision,
        build_tta(replace(config, data=data_cfg)),
    )
    print(metrics.format_table())
    print()
    print(format_per_class_table(metrics.per_class))
    write_report(args, loaded.path, split, metrics, results)
    return 0


def eval_file_names(checkpoint: Path, data: str | Path, split: str) -> tuple[str, str]:
    """(metrics, detections) file names of an evaluation, e.g. ``eval_model_coco_val.json`` and
    ``eval_model_coco_val_results.json``: one pair per checkpoint, dataset and split, so an
    evaluation never overwrites the run's own ``results_val.json`` or another evaluation."""
    parts = (checkpoint.stem, Path(data).resolve().name, split)
    tag = "_".join(["eval", *(_UNSAFE.sub("-", part) for part in parts)])
    return f"{tag}.json", f"{tag}_results.json"


def run_folder(checkpoint: Path) -> Path:
    """The run a checkpoint file belongs to (``<run>/checkpoints/x`` and ``<run>/x``)."""
    from detrkit.engine.state import CHECKPOINT_DIR

    folder = checkpoint.parent
    return folder.parent if folder.name == CHECKPOINT_DIR else folder


def write_report(args, checkpoint: Path, split: str, metrics, results: list[dict]) -> Path:
    """Write the metrics (12 numbers and the per-class table) and the detections as JSON."""
    from detrkit.evaluation.coco_eval import write_results_json

    out = args.output_dir or run_folder(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    metrics_name, results_name = eval_file_names(checkpoint, args.data, split)
    report = {
        "checkpoint": str(checkpoint),
        "data": str(args.data),
        "split": split,
        "results": results_name,
        "metrics": metrics.as_dict(),
        "per_class": [row.as_dict() for row in metrics.per_class],
    }
    write_results_json(out / results_name, results)
    (out / metrics_name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"metrics written to {out / metrics_name}, detections to {results_name}", file=sys.stderr)
    return out / metrics_name
