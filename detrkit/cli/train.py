# SPDX-License-Identifier: Apache-2.0
"""``detrkit train``."""

from __future__ import annotations

from pathlib import Path

from detrkit.cli.common import check_data_folder, config_from_args, stored_config_from_args
from detrkit.errors import UserError

DEFAULT_PRESET = "detr_r50"


def register(commands, add_config, add_run) -> None:
    parser = commands.add_parser(
        "train",
        help="train a detector (use torchrun for several processes)",
        description="Train a detector, or continue a run exactly with --resume RUN (its stored "
        "config and data root are reused; --data and --set still override them).",
    )
    add_config(parser)
    add_run(parser)
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="run folder (required, except with --resume: default the resumed run's folder)",
    )
    parser.add_argument(
        "--resume", type=Path, default=None, help="checkpoint or run folder to continue exactly"
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="checkpoint or run folder whose weights initialise the model (fine-tuning)",
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="with --init-from: re-initialise tensors that do not fit",
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    from detrkit.engine import distributed
    from detrkit.engine.init import find_init_checkpoint
    from detrkit.engine.trainer import Trainer

    # Paths first: a wrong one is reported before any data or model is opened.
    resume = resume_checkpoint(args.resume) if args.resume else None
    init_from = find_init_checkpoint(args.init_from) if args.init_from else None
    out = output_dir(args.output_dir, resume)
    trainer = Trainer(
        train_config(args, resume),
        out,
        resume=resume,
        init_from=init_from,
        allow_partial=args.allow_partial,
        device=args.device,
    )
    try:
        trainer.fit()
    finally:
        distributed.cleanup()
    return 0


def resume_checkpoint(path: Path) -> Path:
    """The training checkpoint ``--resume`` names: the file itself, or a run's newest one."""
    from detrkit.engine.state import CHECKPOINT_DIR, latest_checkpoint

    if not path.exists():
        raise UserError(f"--resume {path}: no such checkpoint file or run folder")
    found = latest_checkpoint(path)
    if found is None:
        raise UserError(
            f"--resume {path}: no training checkpoint there (looked for "
            f"{CHECKPOINT_DIR}/checkpoint_*.safetensors); give a run folder or checkpoint file"
        )
    return found


def train_config(args, resume: Path | None):
    """--config when given; else a resumed run's own config (data root included); else the
    default preset. --data, --precision and --set apply on top of each."""
    stored = None
    if resume is not None:
        from detrkit.engine.checkpoint import load_checkpoint

        # Read here, before data and model are built, so a corrupt file is the first (one-line)
        # error. Its config, not <run>/config.yaml, is exactly what wrote the file, even when
        # the folder's config.yaml changed since (a later resume with other --set).
        stored = load_checkpoint(resume).meta.config
    if args.config or stored is None:
        cfg = config_from_args(args, base=DEFAULT_PRESET)
        check_data_folder(cfg.data.root)
        return cfg
    cfg = stored_config_from_args(args, stored, source=f"the config stored in {resume}")
    if args.data:
        check_data_folder(cfg.data.root)
    else:
        fix = f"{resume} was trained on it; pass --data DIR to say where it is now"
        check_data_folder(cfg.data.root, "data.root", fix)
    return cfg


def output_dir(given: Path | None, resume: Path | None) -> Path:
    """--output-dir, or the folder of the resumed run."""
    from detrkit.engine.state import CHECKPOINT_DIR

    if given is not None:
        return given
    if resume is None:
        raise UserError("--output-dir is required: name the run folder to write (e.g. runs/x)")
    folder = resume.parent
    return folder.parent if folder.name == CHECKPOINT_DIR else folder
