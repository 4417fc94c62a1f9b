# SPDX-License-Identifier: Apache-2.0
"""Reading local ImageNet backbone weights (.pth / .pt / .safetensors); never a download."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from detrkit.errors import UserError

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
