"""The least-recently-used cache of the per-process caches whose value is built from more than the
key (functools.lru_cache keys on every argument: here the builder is a closure, or holds objects
such as an optimizer that are not part of the key)."""
from __future__ import annotations

import collections
from typing import Callable, Hashable, TypeVar

V = TypeVar('V')


class LRU:
  """At most `size` entries: `get` returns the cached value (and marks it most recently used) or
  builds and caches it, dropping the least recently used entry beyond `size`."""

  def __init__(self, size: int):
    self.size = size
    self._entries: collections.OrderedDict = collections.OrderedDict()

  def get(self, key: Hashable, build: Callable[[], V]) -> V:
    if key in self._entries:
      self._entries.move_to_end(key)
      return self._entries[key]
    value = self._entries[key] = build()
    while len(self._entries) > self.size:
      self._entries.popitem(last=False)
    return value

  def keys(self) -> list:
    """The cached keys, least recently used first."""
    return list(self._entries)
