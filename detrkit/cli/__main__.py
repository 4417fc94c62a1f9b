# SPDX-License-Identifier: Apache-2.0
"""``detrkit`` command line: train, eval, predict, convert, demo, data synth."""

from __future__ import annotations

import argparse
import logging
import sys

from detrkit import __version__
from detrkit.errors import UserError

logger = logging.getLogger("detrkit")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="autocast precision (default: the config's train.precision)",
    )


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="preset name (e.g. detr_r50) or YAML path")
    parser.add_argument("--data", default=None, help="COCO-format dataset folder")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="typed overrides, e.g. model.num_queries=50 train.epochs=12",
    )


def build_parser() -> argparse.ArgumentParser:
    from detrkit.cli import convert, data, demo, evaluate, predict, train

    parser = argparse.ArgumentParser(
        prog="detrkit", description="Train, evaluate, run and convert DETR-family detectors."
    )
    parser.add_argument("--version", action="version", version=f"detrkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (train, evaluate, predict, convert, demo, data):
        module.register(commands, _add_config_options, _add_run_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from detrkit.engine.logging import setup_console_logging

    setup_console_logging(is_main=True, verbose=args.verbose)
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        print(f"detrkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
