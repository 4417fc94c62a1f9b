# SPDX-License-Identifier: Apache-2.0
"""``detrkit eval``: COCO metrics of a checkpoint on a dataset split."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from detrkit.cli.common import add_tta_options


def register(commands, add_config, add_run) -> None:
    parser = commands.add_parser("eval", help="evaluate a checkpoint (COCO metrics)")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint or run folder")
    parser.add_argument("--data", required=True, help="COCO-format dataset folder")
    parser.add_argument("--split", default=None, help="split name (default: the config's val)")
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="where to write results and metrics JSON"
    )
    parser.add_argument("--batch-size", type=int, default=None)
    add_tta_options(parser)
    add_run(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from detrkit.engine.data import eval_loader, open_split
    from detrkit.engine.distributed import choose_device
    from detrkit.engine.evaluate import evaluate
    from detrkit.engine.precision import Precision
    from detrkit.evaluation.coco_eval import write_results_json
    from detrkit.inference import load_model

    device = choose_device(args.device)
    loaded = load_model(args.checkpoint, device)
    data_cfg = replace(loaded.config.data, root=args.data)
    if args.batch_size:
        data_cfg = replace(data_cfg, eval_batch_size=args.batch_size)
    split = args.split or data_cfg.val_split
    dataset = open_split(data_cfg, split, train=False, label_map=loaded.label_map)
    precision = Precision(args.precision or "fp32", device.type)
    from detrkit.cli.common import with_tta_options
    from detrkit.config.build import build_postprocess, build_tta

    config = with_tta_options(loaded.config, args)
    metrics, results = evaluate(
        loaded.model,
        build_postprocess(loaded.config.model),
        eval_loader(dataset, data_cfg),
        dataset.coco_json,
        loaded.label_map.category_ids,
        device,
        precision,
        build_tta(replace(config, data=data_cfg)),
    )
    print(metrics.format_table())
    out = args.output_dir or loaded.path.parent.parent
    out.mkdir(parents=True, exist_ok=True)
    write_results_json(out / f"results_{split}.json", results)
    (out / f"metrics_{split}.json").write_text(json.dumps(metrics.as_dict(), indent=2))
    print(f"results written to {out / f'results_{split}.json'}", file=sys.stderr)
    return 0
