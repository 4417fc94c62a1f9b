# SPDX-License-Identifier: Apache-2.0
"""Reading official ``.pth`` checkpoints safely and writing them as detrkit checkpoints."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from detrkit.config.build import build_model
from detrkit.config.validate import config_to_dict
from detrkit.convert.classes import official_label_map, with_head_classes
from detrkit.convert.detect import check_family
from detrkit.convert.rules import ConversionResult, convert_state_dict
from detrkit.convert.sources import SourceFormat
from detrkit.engine.checkpoint import CheckpointMeta, ConvertedFrom, save_checkpoint
from detrkit.errors import UserError

logger = logging.getLogger(__name__)

# Globals the official checkpoints need besides tensors and containers: their ``args``.
SAFE_GLOBALS = [argparse.Namespace]


def read_official_checkpoint(path: Path) -> dict:
    """Load an untrusted ``.pth`` with ``weights_only=True``; nothing but tensors, containers and
    ``argparse.Namespace`` can be constructed, so a malicious pickle is refused."""
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError ...
        raise UserError(
            f"refused to load {path}: it is not a plain PyTorch checkpoint of tensors "
            f"({type(error).__name__}: {str(error).splitlines()[0][:300]}). detrkit never "
            "unpickles arbitrary objects; re-save the state_dict alone if you trust the file"
        ) from error
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a checkpoint dict")
    return data


def official_args(data: dict) -> dict | None:
    args = data.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else None


def convert_official(
    source: SourceFormat, path: Path, out: Path, args_override: dict | None = None
) -> ConversionResult:
    """Convert ``path`` (official layout) to a detrkit checkpoint at ``out``; strict throughout."""
    data = read_official_checkpoint(path)
    # mmdet files (Co-DETR) keep their weights under 'state_dict': read so that the family
    # check names them.
    state = data.get("model", data.get("state_dict", data))
    args = args_override or official_args(data)
    check_family(source.name, tuple(state), args or {}, str(path))
    if args is None:
        raise UserError(f"{path} stores no 'args'; pass --args-json with the training arguments")
    if source.check_state is not None:
        source.check_state(state, args)
    try:
        config = with_head_classes(source.config_from_args(args), state)
    except KeyError as error:
        raise UserError(
            f"{path}'s args lack {error}, which '{source.name}' checkpoints store; pass "
            "--args-json with the run's training arguments"
        ) from None
    result = convert_state_dict(state, source.rules_for(args), source.splits)
    if not result.clean:
        raise UserError(f"{path} does not match the '{source.name}' layout: {result.describe()}")
    model = build_model(config.model)
    try:
        model.load_state_dict(result.state_dict, strict=True)
    except RuntimeError as error:
        raise UserError(
            f"converted weights do not fit the model built from {path}'s args: {str(error)[:800]}"
        ) from error
    label_map = official_label_map(config.model.num_classes)
    meta = CheckpointMeta(
        config=config_to_dict(config),
        label_map=label_map,
        converted_from=ConvertedFrom(source=source.name, file=path.name),
    )
    save_checkpoint(out, model=model.state_dict(), meta=meta)  # a weights file
    return result
