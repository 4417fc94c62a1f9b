# SPDX-License-Identifier: Apache-2.0
"""Mapping between a dataset's category ids and the detector's contiguous labels.

COCO category ids have gaps (1...90 with 10 unused ids) and user datasets may use any integers.
Detectors in detrkit predict contiguous labels ``0 .. num_classes - 1``; label ``i`` is the
``i``-th smallest category id. The map is saved in checkpoints (``to_dict``) so predictions can
be written back with the dataset's own ids.

Checkpoints converted from the originals keep their 91-slot COCO layout (label == COCO id); the
11 ids COCO 2017 never uses are *unused slots* (``LabelMap.unused_ids``): the class head keeps
their logits, so the model computes what the original computes, but they never become a
detection (``ignored_labels``) and a dataset may not use them.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch
from torch import Tensor

# ``category_table`` entry of a label that must never be reported (an unused slot, or a class
# the evaluated dataset does not have).
NO_CATEGORY = -1


@dataclass(frozen=True)
class LabelMap:
    """Bijection between category ids (sorted ascending) and labels ``0 .. num_classes - 1``.

    Attributes:
        category_ids: dataset category ids, strictly increasing; label i <-> category_ids[i].
        names: category names, aligned with ``category_ids``.
        unused_ids: category ids of placeholder slots (a subset of ``category_ids``): the model
            has labels for them, but they are no class and never produce a detection.
    """

    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    unused_ids: tuple[int, ...] = ()
    _label_of: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = tuple(int(c) for c in self.category_ids)
        names = tuple(str(n) for n in self.names)
        if len(ids) != len(names):
            raise ValueError(f"{len(ids)} category ids but {len(names)} names")
        if any(b <= a for a, b in zip(ids, ids[1:], strict=False)):
            raise ValueError(f"category ids must be unique and sorted ascending, got {ids}")
        unused = tuple(sorted({int(c) for c in self.unused_ids}))
        if not set(unused) <= set(ids):
            raise ValueError(f"unused ids {sorted(set(unused) - set(ids))} are not category ids")
        if len(unused) == len(ids):
            raise ValueError("every category id is marked unused")
        # Frozen dataclass: normalised values and the lookup cache are set once, here.
        object.__setattr__(self, "unused_ids", unused)
        object.__setattr__(self, "category_ids", ids)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "_label_of", {c: i for i, c in enumerate(ids)})

    @classmethod
    def from_coco_categories(cls, categories: Sequence[Mapping[str, Any]]) -> LabelMap:
        """Build from a COCO ``categories`` list (``{"id": int, "name": str, ...}``), in any order.

        Raises:
            ValueError: on a missing ``id``, a non-integer id or a duplicated id.
        """
        pairs: dict[int, str] = {}
        for index, category in enumerate(categories):
            if not isinstance(category, Mapping) or "id" not in category:
                raise ValueError(f"category #{index} has no 'id': {category!r}")
            cat_id = category["id"]
            if isinstance(cat_id, bool) or not isinstance(cat_id, int):
                raise ValueError(f"category #{index} has a non-integer id {cat_id!r}")
            if cat_id in pairs:
                raise ValueError(f"category id {cat_id} appears more than once")
            pairs[cat_id] = str(category.get("name", cat_id))
        ids = tuple(sorted(pairs))
        return cls(ids, tuple(pairs[c] for c in ids))

    @classmethod
    def identity(cls, num_classes: int) -> LabelMap:
        """Label i <-> category id i, named ``str(i)`` (converted official checkpoints)."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        ids = tuple(range(num_classes))
        return cls(ids, tuple(str(i) for i in ids))

    @property
    def num_classes(self) -> int:
        """Number of contiguous labels."""
        return len(self.category_ids)

    @property
    def used_ids(self) -> tuple[int, ...]:
        """Category ids of real classes (all but ``unused_ids``), ascending."""
        unused = set(self.unused_ids)
        return tuple(c for c in self.category_ids if c not in unused)

    def name_of(self, category_id: int) -> str:
        """Name of a category id (KeyError if unknown)."""
        return self.names[self.to_label(category_id)]

    def category_table(self, keep: Collection[int] | None = None) -> tuple[int, ...]:
        """Category id of every label, ``NO_CATEGORY`` for labels that must not be reported:
        unused slots and, when ``keep`` (category ids, e.g. an evaluated dataset's) is given,
        the categories outside it."""
        unused = set(self.unused_ids)
        return tuple(
            NO_CATEGORY if c in unused or (keep is not None and c not in keep) else c
            for c in self.category_ids
        )

    def ignored_labels(self, keep: Collection[int] | None = None) -> tuple[int, ...]:
        """Labels whose ``category_table(keep)`` entry is ``NO_CATEGORY``, ascending."""
        return tuple(i for i, c in enumerate(self.category_table(keep)) if c == NO_CATEGORY)

    def to_label(self, category_id: int) -> int:
        """Contiguous label of a category id.

        Raises:
            KeyError: the id is not in the map.
        """
        try:
            return self._label_of[int(category_id)]
        except KeyError:
            raise KeyError(
                f"category id {category_id} is not one of {list(self.category_ids)}"
            ) from None

    @overload
    def to_category(self, label: int) -> int: ...

    @overload
    def to_category(self, label: Tensor) -> Tensor: ...

    def to_category(self, label: int | Tensor) -> int | Tensor:
        """Category id of a label, or of every element of an int64 tensor (any shape, same device).

        Raises:
            IndexError: a label is outside ``[0, num_classes)``.
        """
        if isinstance(label, Tensor):
            if label.numel() and (label.min() < 0 or label.max() >= self.num_classes):
                raise IndexError(f"labels must lie in [0, {self.num_classes})")
            table = torch.tensor(self.category_ids, dtype=torch.int64, device=label.device)
            return table[label.long()]
        if not 0 <= int(label) < self.num_classes:
            raise IndexError(f"label {label} is outside [0, {self.num_classes})")
        return self.category_ids[int(label)]

    def to_dict(self) -> dict[str, list[int] | list[str]]:
        """JSON-able form: ``{"category_ids": [...], "names": [...]}``, plus
        ``"unused_category_ids"`` when there are unused slots."""
        data: dict[str, list[int] | list[str]] = {
            "category_ids": list(self.category_ids),
            "names": list(self.names),
        }
        if self.unused_ids:
            data["unused_category_ids"] = list(self.unused_ids)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelMap:
        """Inverse of ``to_dict``.

        Raises:
            ValueError: keys missing or inconsistent.
        """
        missing = {"category_ids", "names"} - set(data)
        if missing:
            raise ValueError(f"label map is missing {sorted(missing)}")
        unused = tuple(data.get("unused_category_ids", ()))
        return cls(tuple(data["category_ids"]), tuple(data["names"]), unused)
