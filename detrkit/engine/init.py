# SPDX-License-Identifier: Apache-2.0
"""Weights-only initialisation from another checkpoint (``train --init-from``).

Class heads are matched by category: a row of the checkpoint's head moves to the row of the
same category (same id and name) in this model, so fine-tuning a converted COCO checkpoint on
COCO 2017's 80 classes keeps every trained row (and a softmax head's no-object row). Everything
that still does not fit is re-initialised only with ``allow_partial``; the result is one short
summary grouped by module.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from detrkit.data.labels import LabelMap
from detrkit.engine.checkpoint import load_checkpoint
from detrkit.engine.state import inference_checkpoint, latest_checkpoint
from detrkit.errors import UserError

logger = logging.getLogger(__name__)

# Every class predictor of detrkit's models (decoder heads, two-stage proposal head, MS-DETR's
# one-to-many heads) is a Linear of this name with one row per label (+ no-object); every
# embedding indexed by label (the denoising scheme's) is named ``label_embedding``, one row per
# label (+ its own extra row). Their rows move by category id.
CLASS_HEAD = re.compile(
    r"(^|\.)((class_embed|class_heads)(\.\d+)?\.(weight|bias)|label_embedding\.weight"
    r"|(fc_cls|fc_reg|atss_cls)\.(weight|bias))$"
)
# Detection heads' class predictors: their extra row is "no object" (softmax heads).
DETECTION_CLASS_HEAD = re.compile(r"(^|\.)(class_embed|class_heads)(\.\d+)?\.(weight|bias)$")
# Rows per class of a class-indexed tensor: 1 for logits, 4 for per-class box deltas (the RoI
# head's ``fc_reg``).
ROWS_PER_CLASS = (1, 4)


@dataclass(frozen=True)
class KeyGroup:
    """Tensors of one top-level module, e.g. ``encoder (12 tensors)``."""

    module: str
    keys: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.module} ({_tensors(len(self.keys))})"


@dataclass(frozen=True)
class ClassHeadChange:
    """What happened to the class heads.

    Attributes:
        tensors: class-head tensors of the model.
        source_classes: classes of the checkpoint's label map.
        target_classes: classes of this model's label map.
        kept: labels whose rows came from the checkpoint by category (0 when loaded as is).
        fresh_names: names of the classes whose rows were re-initialised.
        no_object: the softmax no-object row came from the checkpoint.
        as_is: the heads fit and were loaded unchanged (same categories or, when none match,
            the same number of classes).
    """

    tensors: int
    source_classes: int
    target_classes: int
    kept: int
    fresh_names: tuple[str, ...]
    no_object: bool
    as_is: bool

    @property
    def complete(self) -> bool:
        """Every row came from the checkpoint."""
        return self.as_is or not self.fresh_names

    def __str__(self) -> str:
        head = f"class heads ({_tensors(self.tensors)}): "
        if self.as_is:
            return head + f"loaded as they are ({self.target_classes} classes)"
        sizes = f"{self.source_classes} → {self.target_classes} classes"
        if not self.kept:
            return head + f"{sizes}, re-initialised"
        no_object = " + no-object" if self.no_object else ""
        if not self.fresh_names:
            return head + f"{sizes}, rows taken by category id ({self.kept} classes{no_object})"
        fresh = ", ".join(repr(n) for n in self.fresh_names[:4])
        more = ", ..." if len(self.fresh_names) > 4 else ""
        return head + (
            f"{sizes}, {self.kept} rows taken by category id{no_object}, "
            f"{len(self.fresh_names)} re-initialised ({fresh}{more})"
        )


@dataclass(frozen=True)
class InitReport:
    """Outcome of ``load_init_weights``.

    Attributes:
        loaded: tensors taken from the checkpoint (class heads included).
        class_heads: the class heads' fate, None when the model has none.
        mismatched: other tensors re-initialised because their shapes differ.
        missing: model tensors the checkpoint lacks (kept fresh).
        unexpected: checkpoint tensors the model lacks (ignored).
    """

    loaded: int
    reinitialised: int
    class_heads: ClassHeadChange | None
    mismatched: tuple[KeyGroup, ...] = ()
    missing: tuple[KeyGroup, ...] = ()
    unexpected: tuple[KeyGroup, ...] = ()

    @property
    def partial(self) -> bool:
        """Something was not loaded (needs ``allow_partial``)."""
        heads_ok = self.class_heads is None or self.class_heads.complete
        return not heads_ok or bool(self.mismatched or self.missing or self.unexpected)

    def format(self) -> str:
        """E.g. ``312 tensors loaded, 7 re-initialised; class heads (7 tensors): 91 → 3
        classes, re-initialised``."""
        parts = [f"{_tensors(self.loaded)} loaded, {self.reinitialised} re-initialised"]
        if self.class_heads is not None:
            parts.append(str(self.class_heads))
        if self.mismatched:
            parts.append("shape differs: " + _join(self.mismatched))
        if self.missing:
            parts.append("not in the checkpoint: " + _join(self.missing))
        if self.unexpected:
            parts.append("not in this model (ignored): " + _join(self.unexpected))
        return "; ".join(parts)


def load_init_weights(
    model: nn.Module,
    weights: Mapping[str, Tensor],
    allow_partial: bool,
    source: LabelMap | None = None,
    target: LabelMap | None = None,
) -> InitReport:
    """Load ``weights`` into ``model``, class heads matched by category.

    Args:
        weights: the checkpoint's model tensors.
        allow_partial: re-initialise what does not fit instead of raising.
        source: the checkpoint's label map (its class names), if known.
        target: this model's (the dataset's) label map.

    Raises:
        UserError: something does not fit and ``allow_partial`` is off.
    """
    own = model.state_dict()
    head_keys = [k for k in own if CLASS_HEAD.search(k) and k in weights]
    usable = {k: v for k, v in weights.items() if k in own and k not in head_keys}
    mismatched = [k for k, v in usable.items() if own[k].shape != v.shape]
    for key in mismatched:
        del usable[key]
    heads, change = _class_heads(own, weights, head_keys, source, target)
    usable.update(heads)
    report = InitReport(
        loaded=len(usable),
        reinitialised=len(own) - len(usable),
        class_heads=change,
        mismatched=_grouped(mismatched),
        missing=_grouped([k for k in own if k not in weights]),
        unexpected=_grouped([k for k in weights if k not in own]),
    )
    if report.partial and not allow_partial:
        raise UserError(
            f"--init-from weights do not fit this model ({report.format()}); pass "
            "--allow-partial to load what fits and re-initialise the rest"
        )
    model.load_state_dict(usable, strict=False)
    return report


def _class_heads(
    own: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    keys: list[str],
    source: LabelMap | None,
    target: LabelMap | None,
) -> tuple[dict[str, Tensor], ClassHeadChange | None]:
    """The class-head tensors to load and what was done to them."""
    if not keys:
        return {}, None
    rows = _row_sources(source, target) if source and target else None
    extra = _extra_rows(own, weights, keys, source, target) if rows else None
    fits = all(own[k].shape == weights[k].shape for k in keys)
    identity = rows == list(range(len(rows or ()))) and source.num_classes == target.num_classes
    sizes = dict(
        tensors=len(keys),
        source_classes=source.num_classes if source else _logits(weights[keys[0]]),
        target_classes=target.num_classes if target else _logits(own[keys[0]]),
    )
    if rows is None or extra is None or not any(r is not None for r in rows) or identity:
        if target and source and not identity:
            _warn_names(source, target)
        if fits:  # no category in common (or no names): keep the old positional behaviour
            change = ClassHeadChange(**sizes, kept=0, fresh_names=(), no_object=False, as_is=True)
            return {k: weights[k] for k in keys}, change
        names = target.names if target else ()
        change = ClassHeadChange(**sizes, kept=0, fresh_names=names, no_object=False, as_is=False)
        return {}, change
    fresh = tuple(target.names[i] for i, r in enumerate(rows) if r is None)
    if fresh:
        _warn_names(source, target)
    tensors = {k: _take_rows(own[k], weights[k], rows, extra[k]) for k in keys}
    kept = sum(r is not None for r in rows)
    no_object = any(extra[k][1] == 1 for k in keys if DETECTION_CLASS_HEAD.search(k))
    change = ClassHeadChange(
        **sizes, kept=kept, fresh_names=fresh, no_object=no_object, as_is=False
    )
    return tensors, change


def _row_sources(source: LabelMap, target: LabelMap) -> list[int | None]:
    """Per target label, the source label of the same category id and name, else None."""
    used = set(source.used_ids)
    rows: list[int | None] = []
    for category, name in zip(target.category_ids, target.names, strict=True):
        same = category in used and _same_name(source.name_of(category), name)
        rows.append(source.to_label(category) if same else None)
    return rows


def _extra_rows(
    own, weights, keys, source: LabelMap, target: LabelMap
) -> dict[str, tuple[int, int]] | None:
    """Per tensor, its layout (rows per class, rows past the classes: 1 for a no-object or a
    label table's extra row, else 0) when checkpoint and model agree on one, else None (the
    tensors do not have the label maps' layout and cannot be matched by category)."""
    layouts = {}
    for key in keys:
        if own[key].shape[1:] != weights[key].shape[1:]:
            return None
        layout = _layout(_logits(weights[key]), _logits(own[key]), source, target)
        if layout is None:
            return None
        layouts[key] = layout
    return layouts


def _layout(
    checkpoint_rows: int, model_rows: int, source: LabelMap, target: LabelMap
) -> tuple[int, int] | None:
    for per_class in ROWS_PER_CLASS:
        from_checkpoint = checkpoint_rows - per_class * source.num_classes
        in_model = model_rows - per_class * target.num_classes
        if from_checkpoint == in_model and in_model in (0, 1):
            return per_class, in_model
    return None


def _take_rows(
    fresh: Tensor, trained: Tensor, rows: list[int | None], layout: tuple[int, int]
) -> Tensor:
    """``fresh`` [R_new, ...] with class i's rows replaced by those of class ``rows[i]`` of
    ``trained`` where known (``per_class`` consecutive rows each), and the trailing extra row
    (no-object, label table) by the trained one."""
    per_class, extra = layout
    out = fresh.clone()
    known = [i for i, r in enumerate(rows) if r is not None]
    index = [i * per_class + k for i in known for k in range(per_class)]
    source = [rows[i] * per_class + k for i in known for k in range(per_class)]
    out[index] = trained[source].to(out.dtype)
    if extra:
        out[-1] = trained[-1].to(out.dtype)
    return out


def _warn_names(source: LabelMap, target: LabelMap) -> None:
    if source.used_ids == target.used_ids and all(
        _same_name(source.name_of(c), target.name_of(c)) for c in target.category_ids
    ):
        return
    rows = _row_sources(source, target)
    differ = [
        f"{c} '{n}'" + (f" (is '{source.name_of(c)}' there)" if c in source.category_ids else "")
        for c, n, r in zip(target.category_ids, target.names, rows, strict=True)
        if r is None
    ]
    logger.warning(
        "the class names of the --init-from checkpoint and the dataset differ: %d of the "
        "dataset's %d classes are not in the checkpoint by category id and name: %s%s",
        len(differ),
        target.num_classes,
        ", ".join(differ[:6]),
        ", ..." if len(differ) > 6 else "",
    )


def _same_name(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


def _logits(tensor: Tensor) -> int:
    return int(tensor.shape[0]) if tensor.dim() else 0


def _grouped(keys: list[str]) -> tuple[KeyGroup, ...]:
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".", 1)[0], []).append(key)
    return tuple(KeyGroup(module, tuple(found)) for module, found in groups.items())


def _join(groups: tuple[KeyGroup, ...]) -> str:
    return ", ".join(str(g) for g in groups)


def _tensors(count: int) -> str:
    return f"{count} tensor" + ("" if count == 1 else "s")


def init_from_checkpoint(
    model: nn.Module, path: Path, allow_partial: bool, target: LabelMap
) -> tuple[Path, InitReport]:
    """``--init-from``: load the weights of a checkpoint file or of a run folder (its newest
    training state, else its ``model.safetensors``) into ``model``, class heads matched by
    category; returns the file used and the report."""
    found = find_init_checkpoint(path)
    checkpoint = load_checkpoint(found)
    report = load_init_weights(
        model, checkpoint.model, allow_partial, checkpoint.meta.label_map, target
    )
    return found, report


def find_init_checkpoint(path: Path) -> Path:
    """The file ``--init-from`` names: the file itself, or a run's newest training state, else
    its inference weights."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--init-from {path}: no such checkpoint file or run folder")
    found = latest_checkpoint(path) or inference_checkpoint(path)
    if found is None:
        raise UserError(
            f"--init-from {path}: no detrkit checkpoint there; give a .safetensors file or a "
            "run folder"
        )
    return found
