# SPDX-License-Identifier: Apache-2.0
"""``detrkit export``: a detrkit checkpoint out to another runtime (ONNX, Hugging Face
transformers)."""

from __future__ import annotations

import sys
from pathlib import Path

FORMATS = ("onnx", "transformers")


def register(commands, add_config, add_run) -> None:
    parser = commands.add_parser(
        "export", help="export a checkpoint to ONNX or to a transformers folder"
    )
    parser.add_argument("checkpoint", type=Path, help="checkpoint file or run folder")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument(
        "--out", required=True, type=Path, help="model.onnx file, or the transformers folder"
    )
    parser.add_argument(
        "--size",
        nargs=2,
        type=int,
        default=None,
        metavar=("H", "W"),
        help="onnx: the input size traced and checked (default: the config's eval size of a "
        "640x480 image)",
    )
    parser.add_argument(
        "--dynamic", action="store_true", help="onnx: dynamic batch, height and width axes"
    )
    parser.add_argument(
        "--opset", type=int, default=None, help="onnx: opset version (default 18, at least 16)"
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    from detrkit.errors import UserError
    from detrkit.inference import load_model

    loaded = load_model(args.checkpoint, "cpu")
    if args.format == "onnx":
        from detrkit.export.onnx import export_onnx

        report = export_onnx(
            loaded, args.out, size=args.size, dynamic=args.dynamic, opset=args.opset
        )
    else:
        if args.size is not None or args.dynamic or args.opset is not None:
            raise UserError("--size, --dynamic and --opset apply to --format onnx only")
        from detrkit.export.transformers import export_transformers

        report = export_transformers(loaded, args.out)
    print(f"{args.checkpoint} -> {args.out}: {report.describe()}", file=sys.stderr)
    return 0
