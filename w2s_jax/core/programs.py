"""A cache of compiled programs held by the object that compiles them.

Compiling a step or a scoring program costs seconds; a :class:`ProgramCache` keeps the executables
of its owner, keyed by everything an executable depends on (shapes, static configuration, compiler
options), so that a shape seen before is a lookup. The oldest entry goes first once ``max_entries``
are held. A caller that wants two runs to share programs passes them the same cache.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["ProgramCache"]


class ProgramCache:
    """Compiled programs by key; at most ``max_entries`` (oldest evicted first)."""

    def __init__(self, max_entries: int = 16):
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._entries: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable, default: Any = None) -> Any:
        return self._entries.get(key, default)

    def put(self, key: Hashable, value: Any) -> Any:
        """Store ``value`` under ``key`` (evicting the oldest entry when full); returns ``value``."""
        if key not in self._entries and len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = value
        return value

    def get_or_make(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The entry under ``key``, made with ``make()`` and stored on a miss."""
        if key in self._entries:
            return self._entries[key]
        return self.put(key, make())

    def clear(self) -> None:
        self._entries.clear()
