"""A size-bounded mapping that forgets its least recently used entry first (for caches keyed by data)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

__all__ = ["LRUDict"]


class LRUDict:
    """At most ``max_entries`` items (0 keeps none); :meth:`get` and :meth:`put` make an entry the most recent,
    and :meth:`put` drops the least recent ones beyond the bound."""

    def __init__(self, max_entries: int):
        self.max_entries = max(0, int(max_entries))
        self._items: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable, default: Any = None) -> Any:
        if key not in self._items:
            return default
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
