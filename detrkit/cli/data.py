# SPDX-License-Identifier: Apache-2.0
"""``detrkit data synth``: write a synthetic COCO-format dataset."""

from __future__ import annotations

import sys
from pathlib import Path


def register(commands, add_config, add_run) -> None:
    parser = commands.add_parser("data", help="dataset utilities")
    actions = parser.add_subparsers(dest="action", required=True)
    synth = actions.add_parser("synth", help="write a synthetic COCO-format dataset of shapes")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--num-train", type=int, default=64)
    synth.add_argument("--num-val", type=int, default=16)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=run_synth)


def run_synth(args) -> int:
    from detrkit.data.synth import write_synthetic_coco

    out = write_synthetic_coco(args.out, args.num_train, args.num_val, args.seed)
    print(f"synthetic dataset written to {out}", file=sys.stderr)
    return 0
