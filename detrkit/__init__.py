# SPDX-License-Identifier: Apache-2.0
"""detrkit: DETR-family object detectors in pure PyTorch.

The public Python surface (what the command line itself uses)::

    from detrkit import Predictor, load_model        # inference from a run or a checkpoint
    from detrkit import load_config, build_model     # configs and models
    from detrkit import Trainer                      # training, as ``detrkit train``

Names are imported lazily, on first use, so ``import detrkit`` (and ``detrkit --version``) does
not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "Predictor": "detrkit.inference",
    "Prediction": "detrkit.inference",
    "LoadedModel": "detrkit.inference",
    "load_model": "detrkit.inference",
    "load_config": "detrkit.config.load",
    "ExperimentConfig": "detrkit.config.schema",
    "build_model": "detrkit.config.build",
    "Trainer": "detrkit.engine.trainer",
    "UserError": "detrkit.errors",
}

__all__ = [
    "ExperimentConfig",
    "LoadedModel",
    "Prediction",
    "Predictor",
    "Trainer",
    "UserError",
    "__version__",
    "build_model",
    "load_config",
    "load_model",
]

if TYPE_CHECKING:  # static tools see the real names
    from detrkit.config.build import build_model
    from detrkit.config.load import load_config
    from detrkit.config.schema import ExperimentConfig
    from detrkit.engine.trainer import Trainer
    from detrkit.errors import UserError
    from detrkit.inference import LoadedModel, Prediction, Predictor, load_model


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'detrkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
