# SPDX-License-Identifier: Apache-2.0
"""``detrkit convert``: an official checkpoint in, a detrkit checkpoint out."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(commands, add_config, add_run) -> None:
    from detrkit.convert.sources import SOURCES

    parser = commands.add_parser("convert", help="convert an official checkpoint")
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=sorted(SOURCES),
        help="layout of the input checkpoint",
    )
    parser.add_argument("input", type=Path, help="official .pth file")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    parser.add_argument(
        "--args-json",
        type=Path,
        default=None,
        help="training arguments as JSON, for files that do not store 'args'",
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    from detrkit.convert.official import convert_official
    from detrkit.convert.sources import get_source

    override = json.loads(args.args_json.read_text()) if args.args_json else None
    result = convert_official(get_source(args.source), args.input, args.out, override)
    print(f"{args.input} -> {args.out}: {result.describe()}", file=sys.stderr)
    return 0
