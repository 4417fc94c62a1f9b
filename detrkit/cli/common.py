# SPDX-License-Identifier: Apache-2.0
"""Helpers shared by the sub-commands: turning run flags into a config."""

from __future__ import annotations

import argparse
from dataclasses import replace

from detrkit.config.load import load_config
from detrkit.config.schema import ExperimentConfig


def config_from_args(args: argparse.Namespace, base: str | None = None) -> ExperimentConfig:
    """--config (or ``base``) + --data + --precision + --set, validated."""
    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.insert(0, f"data.root={args.data}")
    if getattr(args, "precision", None):
        overrides.insert(0, f"train.precision={args.precision}")
    return load_config(args.config or base, overrides)


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
