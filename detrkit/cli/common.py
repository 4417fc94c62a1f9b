# SPDX-License-Identifier: Apache-2.0
"""Helpers shared by the sub-commands: turning run flags into a config."""

from __future__ import annotations

import argparse

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
