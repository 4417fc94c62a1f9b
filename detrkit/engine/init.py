# SPDX-License-Identifier: Apache-2.0
"""Weights-only initialisation from another checkpoint, with a report of what was skipped."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from detrkit.errors import UserError


def load_weights_report(
    model: nn.Module, weights: Mapping[str, Tensor], allow_partial: bool
) -> str:
    """Load matching tensors; report missing, unexpected and re-initialised (shape-mismatched) keys.

    A class head of another size (fine-tuning on a new label set) is the usual mismatch; it is
    skipped and keeps its fresh initialisation. Without ``allow_partial`` any mismatch is an error.
    """
    own = model.state_dict()
    mismatched = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in weights.items() if k in own and k not in mismatched}
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    problems = bool(mismatched or missing or unexpected)
    if problems and not allow_partial:
        raise UserError(
            "--init-from weights do not fit this model: "
            f"{len(mismatched)} shape mismatches {mismatched[:4]}, {len(missing)} missing "
            f"{missing[:4]}, {len(unexpected)} unexpected {unexpected[:4]}; pass --allow-partial "
            "to load what fits and re-initialise the rest"
        )
    model.load_state_dict(usable, strict=False)
    return (
        f"{len(usable)} tensors loaded; re-initialised (shape mismatch): {mismatched}; "
        f"missing: {missing}; unexpected: {unexpected}"
    )
