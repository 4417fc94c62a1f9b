# SPDX-License-Identifier: Apache-2.0
"""Reading local ImageNet backbone weights (.pth / .pt / .safetensors); never a download."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from detrkit.errors import UserError

logger = logging.getLogger(__name__)

# Training scripts wrap the weights: {"model": {...}} (DeiT/CoaT), {"state_dict": {...}} (mmcv).
_WRAPPERS = ("state_dict", "model")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a local weights file, unwrapped from ``state_dict``/``model`` entries.

    ``.pth`` files are read with ``torch.load(weights_only=True)`` (no code runs); a missing or
    unreadable file is a ``UserError`` naming it.
    """
    if not path.is_file():
        raise UserError(f"backbone weights {path} not found; set model.backbone.weights to a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"cannot read backbone weights {path}: {error}") from error
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_checked(
    module: nn.Module, state: dict[str, Tensor], path: str | Path, family: str
) -> None:
    """Load ``state`` into ``module`` after checking every key and shape (BatchNorm's
    ``num_batches_tracked`` counters aside); a mismatch is a ``UserError`` naming the file,
    a few keys of each kind and the config key to check."""
    counter = "num_batches_tracked"
    state = {k: v for k, v in state.items() if not k.endswith(counter)}
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(counter)]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise UserError(
            f"{path} does not hold weights of this {family}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {mismatched[:3]}; "
            "check model.backbone.name"
        )
    module.load_state_dict(state, strict=False)  # every key was checked above
    logger.info("loaded backbone weights from %s (%d tensors)", path, len(state))
