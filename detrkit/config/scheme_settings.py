# SPDX-License-Identifier: Apache-2.0
"""``model.schemes``: the enabled training schemes, validated against the scheme registry."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from detrkit.schemes.registry import registered_schemes, scheme_spec


class SchemeSettings(Mapping[str, Any]):
    """An immutable mapping of enabled scheme name -> its typed options (the dataclass the
    scheme registered), ordered as the registry lists the schemes, whatever order the YAML
    gave: the schemes' query slots follow in this order, so a model's layout never depends on
    how its config was written.

    Args:
        items: scheme name -> options instance; an unknown name or an options object of the
            wrong type is an error.
    """

    # The config validator treats a class with this marker as a mapping of typed sections.
    config_mapping = True

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        items = dict(items or {})
        for name, options in items.items():
            expected = scheme_spec(name).config
            if not isinstance(options, expected):
                raise TypeError(
                    f"model.schemes.{name} must be a {expected.__name__}, got {type(options)}"
                )
        order = list(registered_schemes())
        self._items = dict(sorted(items.items(), key=lambda item: order.index(item[0])))

    @staticmethod
    def value_type(name: str, source: str) -> type:
        """The options dataclass of scheme ``name`` (``UserError`` naming the nearest scheme
        if there is none)."""
        return scheme_spec(name, source).config

    @staticmethod
    def known_names() -> list[str]:
        return list(registered_schemes())

    def __getitem__(self, name: str) -> Any:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SchemeSettings):
            return self._items == other._items
        return isinstance(other, Mapping) and self._items == dict(other)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return f"SchemeSettings({self._items!r})"


def scheme_settings(**sections: Any) -> SchemeSettings:
    """``SchemeSettings`` of the given sections, leaving out those that are None (off)."""
    return SchemeSettings({name: value for name, value in sections.items() if value is not None})
