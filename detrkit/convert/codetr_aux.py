# SPDX-License-Identifier: Apache-2.0
"""Official Co-DETR Faster R-CNN auxiliary branch (``rpn_head.*``, ``roi_head.{i}.*``, mmdet
``RPNHead`` / ``CoStandardRoIHead`` with a ``Shared2FCBBoxHead``) -> ``models.dense.rpn.RPNHead``
and ``models.dense.roi_head.RoIHead`` keys.

detrkit's heads keep mmdet's module names, so every rule is a prefix rename; the explicit
patterns make an unexpected key show up as unmatched instead of being carried along. The
Co-DINO converter (``convert.codetr``) drops ``rpn_head.*`` / ``roi_head.*``; a converter that
builds the heads puts these rules before that drop rule (the first matching rule wins).
"""

from __future__ import annotations

from detrkit.convert.rules import RenameRule

# Where the collaborative scheme is expected to hold its RPN and RoI head.
DEFAULT_RPN_TARGET = "schemes.collaborative.rpn"
DEFAULT_ROI_TARGET = "schemes.collaborative.roi"

_WB = r"(weight|bias)"


def _prefix(target: str) -> str:
    return f"{target}." if target else ""


def faster_rcnn_rules(
    index: int = 0, rpn_target: str = DEFAULT_RPN_TARGET, roi_target: str = DEFAULT_ROI_TARGET
) -> tuple[RenameRule, ...]:
    """Rename rules of ``rpn_head.*`` to ``{rpn_target}.*`` and of ``roi_head.{index}.*`` to
    ``{roi_target}.*`` (an empty target: the module's own state-dict keys)."""
    rpn, roi = _prefix(rpn_target), _prefix(roi_target)
    source = rf"roi_head\.{index}\.bbox_head\."
    return (
        RenameRule(rf"rpn_head\.(rpn_conv|rpn_cls|rpn_reg)\.{_WB}", rf"{rpn}\1.\2"),
        RenameRule(rf"{source}shared_fcs\.(\d+)\.{_WB}", rf"{roi}bbox_head.shared_fcs.\1.\2"),
        RenameRule(rf"{source}(fc_cls|fc_reg)\.{_WB}", rf"{roi}bbox_head.\1.\2"),
    )
