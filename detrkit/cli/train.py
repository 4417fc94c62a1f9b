# SPDX-License-Identifier: Apache-2.0
"""``detrkit train``."""

from __future__ import annotations

from pathlib import Path

from detrkit.cli.common import config_from_args


def register(commands, add_config, add_run) -> None:
    parser = commands.add_parser(
        "train", help="train a detector (use torchrun for several processes)"
    )
    add_config(parser)
    add_run(parser)
    parser.add_argument("--output-dir", required=True, type=Path, help="run folder")
    parser.add_argument(
        "--resume", type=Path, default=None, help="checkpoint or run folder to continue exactly"
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="checkpoint whose weights initialise the model (fine-tuning)",
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="with --init-from: re-initialise tensors that do not fit",
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    from detrkit.engine import distributed
    from detrkit.engine.state import latest_checkpoint
    from detrkit.engine.trainer import Trainer
    from detrkit.errors import UserError

    cfg = config_from_args(args, base="detr_r50")
    resume = None
    if args.resume:
        resume = latest_checkpoint(args.resume)
        if resume is None:
            raise UserError(f"--resume {args.resume}: no checkpoint found there")
    trainer = Trainer(
        cfg,
        args.output_dir,
        resume=resume,
        init_from=args.init_from,
        allow_partial=args.allow_partial,
        device=args.device,
    )
    try:
        trainer.fit()
    finally:
        distributed.cleanup()
    return 0
