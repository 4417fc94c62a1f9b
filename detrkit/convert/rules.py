# SPDX-License-Identifier: Apache-2.0
"""Checkpoint conversion as data: ordered rename rules, tensor-splitting rules and a report."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class RenameRule:
    """Rename keys that fully match ``pattern`` to ``replacement`` (a ``re`` expand template).

    ``replacement=None`` drops the key on purpose (it is reported as dropped, not unmatched).
    """

    pattern: str
    replacement: str | None


@dataclass(frozen=True)
class SplitRule:
    """Split a tensor matching ``pattern`` into equal chunks along ``dim``, one per template.

    Used for ``nn.MultiheadAttention``'s stacked (q, k, v) ``in_proj`` weights.
    """

    pattern: str
    replacements: tuple[str, ...]
    dim: int = 0


@dataclass
class ConversionResult:
    """The converted state dict and what did not map cleanly."""

    state_dict: dict[str, Tensor]
    unmatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    collisions: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.unmatched and not self.collisions

    def describe(self) -> str:
        parts = [f"{len(self.state_dict)} tensors converted"]
        if self.dropped:
            parts.append(f"{len(self.dropped)} dropped on purpose")
        if self.unmatched:
            parts.append(f"unmatched source keys: {self.unmatched[:10]}")
        if self.collisions:
            parts.append(f"target collisions: {self.collisions[:10]}")
        return "; ".join(parts)


def _convert_one(
    key: str, value: Tensor, rules: Sequence[RenameRule], splits: Sequence[SplitRule]
) -> list[tuple[str, Tensor]] | None:
    """[(new key, tensor)], [] when dropped on purpose, None when no rule matches."""
    for split in splits:
        match = re.fullmatch(split.pattern, key)
        if match:
            chunks = value.chunk(len(split.replacements), dim=split.dim)
            return [(match.expand(t), c.clone()) for t, c in zip(split.replacements, chunks)]
    for rule in rules:
        match = re.fullmatch(rule.pattern, key)
        if match:
            return [] if rule.replacement is None else [(match.expand(rule.replacement), value)]
    return None


def convert_state_dict(
    source: Mapping[str, Tensor], rules: Sequence[RenameRule], splits: Sequence[SplitRule] = ()
) -> ConversionResult:
    """Apply the first matching split or rename rule to every key of ``source``."""
    result = ConversionResult(state_dict={})
    for key, value in source.items():
        converted = _convert_one(key, value, rules, splits)
        if converted is None:
            result.unmatched.append(key)
        elif not converted:
            result.dropped.append(key)
        for new_key, tensor in converted or ():
            if new_key in result.state_dict:
                result.collisions.append(new_key)
            result.state_dict[new_key] = tensor
    return result
