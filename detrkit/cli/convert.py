# SPDX-License-Identifier: Apache-2.0
"""``detrkit convert``: an official checkpoint in, a detrkit checkpoint out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# mmdet checkpoints (Co-DETR) are read by detrkit.convert.codetr_source, Hugging Face folders by
# detrkit.convert.transformers; neither is a SOURCES table.
CODETR = "codetr"
TRANSFORMERS = "transformers"


def register(commands, add_config, add_run) -> None:
    from detrkit.convert.sources import SOURCES

    parser = commands.add_parser("convert", help="convert an official checkpoint")
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=sorted([*SOURCES, CODETR, TRANSFORMERS]),
        help="layout of the input checkpoint",
    )
    parser.add_argument(
        "input",
        type=Path,
        help="official .pth file (--from transformers: a saved folder with config.json and "
        "model.safetensors, or the .safetensors file beside its config.json)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    parser.add_argument(
        "--args-json",
        type=Path,
        default=None,
        help="training arguments as JSON, for files that do not store 'args'",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="--from codetr: the mmdet 'model' section as JSON/YAML, for files whose stored "
        "config is not plain data",
    )
    parser.add_argument(
        "--keep-aux",
        action="store_true",
        help="--from codetr: keep the collaborative auxiliary heads (for fine-tuning)",
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    from detrkit.convert.codetr_source import convert_codetr_checkpoint
    from detrkit.convert.official import convert_official
    from detrkit.convert.sources import get_source
    from detrkit.errors import UserError

    if args.source == CODETR:
        if args.args_json is not None:
            raise UserError("--from codetr reads an mmdet config: use --config, not --args-json")
        result = convert_codetr_checkpoint(
            args.input, args.out, keep_aux=args.keep_aux, config=args.config
        )
        print(f"{args.input} -> {args.out}: {result.describe()}", file=sys.stderr)
        return 0
    if args.keep_aux or args.config is not None:
        raise UserError("--keep-aux and --config apply to --from codetr only")
    if args.source == TRANSFORMERS:
        from detrkit.convert.transformers import convert_transformers_checkpoint

        if args.args_json is not None:
            raise UserError("--from transformers reads the folder's config.json, not --args-json")
        result = convert_transformers_checkpoint(args.input, args.out)
        print(f"{args.input} -> {args.out}: {result.describe()}", file=sys.stderr)
        return 0
    override = json.loads(args.args_json.read_text()) if args.args_json else None
    result = convert_official(get_source(args.source), args.input, args.out, override)
    print(f"{args.input} -> {args.out}: {result.describe()}", file=sys.stderr)
    return 0
