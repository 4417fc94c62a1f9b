# SPDX-License-Identifier: Apache-2.0
"""Mapping between a dataset's category ids and the detector's contiguous labels.

COCO category ids have gaps (1...90 with 10 unused ids) and user datasets may use any integers.
Detectors in detrkit predict contiguous labels ``0 .. num_classes - 1``; label ``i`` is the
``i``-th smallest category id. The map is saved in checkpoints (``to_dict``) so predictions can
be written back with the dataset's own ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch
from torch import Tensor


@dataclass(frozen=True)
class LabelMap:
    """Bijection between category ids (sorted ascending) and labels ``0 .. num_classes - 1``.

    Attributes:
        category_ids: dataset category ids, strictly increasing; label i <-> category_ids[i].
        names: category names, aligned with ``category_ids``.
    """

    category_ids: tuple[int, ...]
    names: tuple[str, ...]
    _label_of: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = tuple(int(c) for c in self.category_ids)
        names = tuple(str(n) for n in self.names)
        if len(ids) != len(names):
            raise ValueError(f"{len(ids)} category ids but {len(names)} names")
        if any(b <= a for a, b in zip(ids, ids[1:], strict=False)):
            raise ValueError(f"category ids must be unique and sorted ascending, got {ids}")
        # Frozen dataclass: normalised values and the lookup cache are set once, here.
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
        """JSON-able form: ``{"category_ids": [...], "names": [...]}``."""
        return {"category_ids": list(self.category_ids), "names": list(self.names)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelMap:
        """Inverse of ``to_dict``.

        Raises:
            ValueError: keys missing or inconsistent.
        """
        missing = {"category_ids", "names"} - set(data)
        if missing:
            raise ValueError(f"label map is missing {sorted(missing)}")
        return cls(tuple(data["category_ids"]), tuple(data["names"]))
