# SPDX-License-Identifier: Apache-2.0
"""Helpers shared by the sub-commands: turning run flags into a config."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from detrkit.config.load import config_from_mapping, load_config
from detrkit.config.schema import ExperimentConfig
from detrkit.errors import UserError


def _overrides(args: argparse.Namespace) -> list[str]:
    """--precision, --data, then --set: the flags that change a config, as ``key=value``."""
    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.insert(0, f"data.root={args.data}")
    if getattr(args, "precision", None):
        overrides.insert(0, f"train.precision={args.precision}")
    return overrides


def config_from_args(args: argparse.Namespace, base: str | None = None) -> ExperimentConfig:
    """--config (or ``base``) + --data + --precision + --set, validated."""
    return load_config(args.config or base, _overrides(args))


def stored_config_from_args(
    args: argparse.Namespace, stored: Mapping[str, Any], source: str
) -> ExperimentConfig:
    """A config a run stored (its checkpoint's) + --data + --precision + --set, validated."""
    return config_from_mapping(stored, _overrides(args), source=source)


_DATA_FIX = "give a COCO-format dataset folder (annotations/instances_<split>.json and images)"


def check_data_folder(root: str | Path | None, origin: str = "--data", fix: str = _DATA_FIX):
    """One clear line for a dataset folder that does not exist (before a model is built):
    ``origin`` is where the path came from, ``fix`` what to do. None (no dataset given) is
    left to the loader, which asks for --data."""
    if root is not None and not Path(root).is_dir():
        raise UserError(f"{origin} {root}: no such folder; {fix}")


def add_tta_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tta-scales",
        type=int,
        nargs="+",
        default=None,
        metavar="SHORTER_SIDE",
        help="test-time augmentation: extra passes at these shorter sides",
    )
    parser.add_argument(
        "--tta-flip", action="store_true", help="test-time augmentation: also flip every pass"
    )


def with_tta_options(cfg: ExperimentConfig, args: argparse.Namespace) -> ExperimentConfig:
    """The checkpoint's config with ``--tta-scales`` / ``--tta-flip`` applied."""
    inference = cfg.inference
    if args.tta_scales:
        inference = replace(inference, tta_scales=tuple(args.tta_scales))
    if args.tta_flip:
        inference = replace(inference, tta_flip=True)
    return replace(cfg, inference=inference)
