# SPDX-License-Identifier: Apache-2.0
"""``detrkit`` command line: train, eval, predict, convert, demo, data, presets."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

from detrkit import __version__
from detrkit.errors import UserError

logger = logging.getLogger("detrkit")


class DetrkitParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose help shows every option's default, and the presets wherever
    there is a ``--config`` option.

    Sub-command parsers are built with this class too (``add_subparsers`` passes its own class
    on), so the modules registering them need nothing special.
    """

    def add_argument(self, *names, **kwargs):
        default, help_text = kwargs.get("default"), kwargs.get("help")
        # A flag's default (off) goes without saying, even for store_false's True.
        is_flag = kwargs.get("action") in ("store_true", "store_false", "store_const", "count")
        shown = _worth_showing(default) and not is_flag and "default" not in (help_text or "")
        if names and names[0].startswith("-") and shown:
            suffix = "(default: %(default)s)"
            kwargs["help"] = f"{help_text} {suffix}" if help_text else suffix
        return super().add_argument(*names, **kwargs)

    def format_help(self) -> str:
        text = super().format_help()
        if any(action.dest == "config" for action in self._actions):
            from detrkit.config.load import list_presets

            # Listed when asked for, not at start-up: help is the only reader.
            text += "\npresets for --config (described by 'detrkit presets'):\n  "
            text += "\n  ".join(textwrap.wrap(", ".join(list_presets()), 76))
            text += "\n"
        return text


def _worth_showing(default: object) -> bool:
    """Whether help should print a default: not for "unset" (None, an off flag, no items)."""
    if default is None or default is False or default is argparse.SUPPRESS:
        return False
    return not (isinstance(default, (list, tuple)) and not default)


def _asks_for_version(argv: list[str]) -> bool:
    """``--version`` among the options before the sub-command (answered without torch)."""
    for arg in argv:
        if not arg.startswith("-"):
            return False
        if arg == "--version":
            return True
    return False


# Sub-commands whose --precision defaults to the config's train.precision; the others (eval,
# predict) run a checkpoint in fp32 unless told otherwise.
_TRAINING_COMMANDS = ("train", "demo")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)"
    )
    trains = parser.prog.split()[-1] in _TRAINING_COMMANDS
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="autocast precision (default: "
        + ("the config's train.precision)" if trains else "fp32)"),
    )


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="preset name (see below) or YAML path (default: detr_r50; with --resume, the "
        "config stored in the run)",
    )
    parser.add_argument(
        "--data", default=None, help="COCO-format dataset folder (default: the config's data.root)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="typed overrides, e.g. model.num_queries=50 train.epochs=12",
    )


def build_parser() -> argparse.ArgumentParser:
    from detrkit.cli import convert, data, demo, evaluate, export, predict, presets, train

    parser = DetrkitParser(
        prog="detrkit",
        description="Train, evaluate, run, convert and export DETR-family detectors.",
    )
    parser.add_argument("--version", action="version", version=f"detrkit {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (train, evaluate, predict, convert, export, demo, data, presets):
        module.register(commands, _add_config_options, _add_run_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if _asks_for_version(argv):
        # Before build_parser: registering the sub-commands imports torch (seconds).
        print(f"detrkit {__version__}")
        return 0
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
