# SPDX-License-Identifier: Apache-2.0
"""Which official repository an official checkpoint comes from, from its keys and ``args``.

Used to refuse ``detrkit convert --from A`` on a file of family B with one line naming B, before
the wrong rule table produces a confusing mismatch list (or, for look-alike layouts such as
H-DETR under ``--from deformable_detr``, a silently wrong model).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from detrkit.errors import UserError


@dataclass(frozen=True)
class Signature:
    """A feature that only checkpoints of some ``--from`` formats have.

    Attributes:
        suggest: the ``--from`` name to suggest.
        compatible: every ``--from`` name that reads such files (``suggest`` among them).
        evidence: what the file has, for the message.
        matches: ``(keys, args) -> bool``.
    """

    suggest: str
    compatible: frozenset[str]
    evidence: str
    matches: Callable[[tuple[str, ...], Mapping[str, Any]], bool]


def _has_key(pattern: str) -> Callable[[tuple[str, ...], Mapping[str, Any]], bool]:
    compiled = re.compile(pattern)
    return lambda keys, args: any(compiled.search(k) for k in keys)


def _has_arg(name: str) -> Callable[[tuple[str, ...], Mapping[str, Any]], bool]:
    return lambda keys, args: name in args


_DEFORMABLE_FAMILY = frozenset({"deformable_detr", "mpvit_deformable_detr", "coat_deformable_detr"})
_ENCODER = r"^transformer\.encoder\.layers\.\d+\."
_DECODER = r"^transformer\.decoder\.layers\.\d+\."

# Most specific first: the first signature a file has decides.
SIGNATURES = (
    Signature(
        "codetr",
        frozenset({"codetr"}),
        "Co-DETR's mmdet query head keys (query_head.*)",
        _has_key(r"^query_head\."),
    ),
    Signature(
        "coat_deformable_detr",
        frozenset({"coat_deformable_detr"}),
        "CoaT backbone keys (backbone.0.backbone.cls_token*)",
        _has_key(r"^backbone\.0\.backbone\.(cls_token|cpe)\d"),
    ),
    Signature(
        "mpvit_deformable_detr",
        frozenset({"mpvit_deformable_detr"}),
        "MPViT backbone keys (backbone.0.backbone.mhca_stages.*)",
        _has_key(r"^backbone\.0\.backbone\.mhca_stages\."),
    ),
    Signature(
        "smca_ms_k7",
        frozenset({"smca_ms_k7"}),
        "multi-scale SMCA shared cross-scale convolutions (encoder ...high_to_low.weight)",
        _has_key(_ENCODER + r"high_to_low\."),
    ),
    Signature(
        "smca_ms",
        frozenset({"smca_ms"}),
        "multi-scale SMCA cross-scale convolutions (encoder ...high_to_low_1.weight)",
        _has_key(_ENCODER + r"high_to_low_\d"),
    ),
    Signature(
        "smca",
        frozenset({"smca"}),
        "SMCA's Gaussian prior layers (decoder ...point1.*)",
        _has_key(_DECODER + r"point1\."),
    ),
    Signature(
        "msdetr_impl_a",
        frozenset({"msdetr_impl_a"}),
        "separate one-to-many class heads (class_embed_o2m.*)",
        _has_key(r"^class_embed_o2m\."),
    ),
    Signature(
        "msdetr",
        frozenset({"msdetr"}),
        "MS-DETR's auxiliary decoder FFN (decoder ...linear3.weight)",
        _has_key(_DECODER + r"linear3\."),
    ),
    Signature(
        "msdetr",
        frozenset({"msdetr", "msdetr_impl_a"}),
        "MS-DETR arguments (args.use_ms_detr)",
        _has_arg("use_ms_detr"),
    ),
    Signature(
        "dino",
        frozenset({"dino"}),
        "DINO's query position head (transformer.decoder.ref_point_head.*)",
        _has_key(r"^transformer\.decoder\.ref_point_head\."),
    ),
    Signature(
        "hdetr",
        frozenset({"hdetr"}),
        "H-DETR's one-to-many query arguments (args.k_one2many)",
        _has_arg("k_one2many"),
    ),
    Signature(
        "deformable_detr",
        _DEFORMABLE_FAMILY,
        "deformable attention (...sampling_offsets.weight)",
        _has_key(r"\.sampling_offsets\."),
    ),
    Signature(
        "detr",
        frozenset({"detr"}),
        "DETR's standard attention (transformer.encoder.layers.N.self_attn.in_proj_weight)",
        _has_key(_ENCODER + r"self_attn\.in_proj_weight$"),
    ),
)


def detect_signature(keys: tuple[str, ...], args: Mapping[str, Any]) -> Signature | None:
    """The first ``SIGNATURES`` entry the checkpoint has, None for an unknown layout."""
    return next((s for s in SIGNATURES if s.matches(keys, args)), None)


def check_family(source: str, keys: tuple[str, ...], args: Mapping[str, Any], path: str) -> None:
    """Raise ``UserError`` when the file at ``path`` is not of the ``--from source`` family.

    Args:
        keys: the official state dict's keys.
        args: the official training arguments.
    """
    found = detect_signature(keys, args)
    if found is None or source in found.compatible:
        return
    raise UserError(
        f"{path} looks like a '{found.suggest}' checkpoint (it has {found.evidence}), not "
        f"'{source}': convert it with --from {found.suggest}"
    )
