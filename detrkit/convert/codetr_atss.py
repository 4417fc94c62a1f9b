# SPDX-License-Identifier: Apache-2.0
"""Official Co-DETR ATSS auxiliary head (``bbox_head.{i}.*``, mmdet ``CoATSSHead``) ->
``models.dense.atss.ATSSHead`` keys.

detrkit's head keeps mmdet's module names, so every rule is a prefix rename; the explicit
patterns make an unexpected key show up as unmatched instead of being carried along. The
Co-DINO converter (``convert.codetr``) drops ``bbox_head.*``; a converter that builds the
head puts these rules before that drop rule (the first matching rule wins).
"""

from __future__ import annotations

from detrkit.convert.rules import RenameRule

# Where the collaborative scheme is expected to hold its ATSS head.
DEFAULT_TARGET = "schemes.collaborative.atss"


def atss_rules(index: int = 0, target: str = DEFAULT_TARGET) -> tuple[RenameRule, ...]:
    """Rename rules of ``bbox_head.{index}`` to ``{target}.*`` (``target=""``: the head's own
    state-dict keys)."""
    source = rf"bbox_head\.{index}\."
    prefix = f"{target}." if target else ""
    return (
        RenameRule(
            rf"{source}(cls_convs|reg_convs)\.(\d+)\.conv\.weight", rf"{prefix}\1.\2.conv.weight"
        ),
        RenameRule(
            rf"{source}(cls_convs|reg_convs)\.(\d+)\.gn\.(weight|bias)", rf"{prefix}\1.\2.gn.\3"
        ),
        RenameRule(
            rf"{source}(atss_cls|atss_reg|atss_centerness)\.(weight|bias)", rf"{prefix}\1.\2"
        ),
        RenameRule(rf"{source}scales\.(\d+)\.scale", rf"{prefix}scales.\1.scale"),
    )
