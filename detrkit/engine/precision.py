# SPDX-License-Identifier: Apache-2.0
"""Mixed-precision policy: autocast for the model, fp32 for losses, a GradScaler only for fp16."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """Autocast settings for one device.

    Args:
        name: "fp32" | "bf16" | "fp16".
        device_type: "cpu" | "cuda" | "mps".
    """

    name: str = "fp32"
    device_type: str = "cpu"
    scaler: torch.amp.GradScaler | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.name not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {self.name}")
        if self.name == "fp16":
            self.scaler = torch.amp.GradScaler(self.device_type)

    def autocast(self):
        """Context for the model forward (a no-op in fp32)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.name])
