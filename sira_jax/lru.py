"""A small bounded dict for the per-process caches that a sweep's runs share (compiled steps,
abstract models, eval batches, training streams)."""
from __future__ import annotations

import collections


class Bounded(collections.OrderedDict):
  """An insertion-ordered dict of at most `size` entries: `put` adds (or refreshes) a key as the
  newest and drops the oldest beyond `size`; returns the value."""

  def __init__(self, size: int):
    super().__init__()
    self.size = size

  def put(self, key, value):
    self[key] = value
    self.move_to_end(key)
    while len(self) > self.size:
      self.popitem(last=False)
    return value
