# SPDX-License-Identifier: Apache-2.0
"""``detrkit presets``: every shipped config preset, its published AP and a one-line summary."""

from __future__ import annotations

import shutil
import sys

# On a terminal the description column is cut so each preset stays on one line; piped output
# (grep, a file) keeps the whole description.
_MIN_DESCRIPTION = 30


def register(commands, add_config, add_run) -> None:
    parser = commands.add_parser(
        "presets",
        help="list the config presets (--config NAME) with their published AP",
        description="List the presets shipped in detrkit/configs: name, the COCO val AP the "
        "preset reproduces from its paper or repository ('-' when none) and a summary.",
    )
    parser.add_argument(
        "--full", action="store_true", help="do not cut descriptions to the terminal's width"
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    from detrkit.config.load import describe_preset, list_presets

    infos = [describe_preset(name) for name in list_presets()]
    cut = sys.stdout.isatty() and not args.full
    print(format_presets(infos, shutil.get_terminal_size().columns if cut else None))
    return 0


def format_presets(infos, width: int | None = None) -> str:
    """A ``name  AP  description`` table; descriptions cut to ``width`` columns when given."""
    name_width = max(len("preset"), *(len(info.name) for info in infos))
    lines = [f"{'preset':<{name_width}}  {'AP':>5}  description"]
    room = None if width is None else max(_MIN_DESCRIPTION, width - name_width - 9)
    for info in infos:
        ap = "-" if info.published_ap is None else f"{info.published_ap:.1f}"
        description = info.description
        if room is not None and len(description) > room:
            description = description[: room - 3].rstrip() + "..."
        lines.append(f"{info.name:<{name_width}}  {ap:>5}  {description}")
    return "\n".join(lines)
