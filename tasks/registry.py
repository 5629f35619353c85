"""Idempotent seqio registration and name look-up with suggestions.

`add_task` / `add_mixture` replace an existing entry of the same name instead
of raising, so importing or re-running a registration function twice is safe
(and re-registering with another vocabulary or data dir takes effect).
`get_task_or_mixture(name)` looks a name up: an unknown name raises a KeyError
listing the closest registered names (difflib). This module knows no task
family; `tasks.get_task_or_mixture` adds XTREME-UP's registration on first use.
"""
from __future__ import annotations

import difflib
from typing import Iterable, Sequence

import seqio


def add_task(name: str, **task_kwargs) -> seqio.Task:
  """Registers `seqio.Task(name, **task_kwargs)`, replacing any older one."""
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **task_kwargs)


def add_mixture(name: str, tasks: Sequence[str | tuple[str, float]],
                default_rate: float | None = 1.0) -> seqio.Mixture:
  """Registers a mixture, replacing any older one of the same name."""
  if not tasks:
    raise ValueError(f'Mixture {name!r} would be empty.')
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, list(tasks), default_rate=default_rate)


def remove(names: Iterable[str]) -> None:
  """Removes tasks and mixtures by name (absent names are ignored)."""
  for name in names:
    seqio.MixtureRegistry.remove(name)
    seqio.TaskRegistry.remove(name)


def registered(name: str) -> seqio.Task | seqio.Mixture | None:
  """The Task or Mixture registered as `name`, or None."""
  if name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(name)
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  return None


def registered_names() -> list[str]:
  """All registered task and mixture names, sorted."""
  return sorted(set(seqio.TaskRegistry.names()) |
                set(seqio.MixtureRegistry.names()))


def closest_names(name: str, n: int = 8) -> list[str]:
  """Registered names closest to `name` (difflib ratio), best first."""
  names = registered_names()
  close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
  if len(close) < n:  # Also offer names sharing the prefix, e.g. families.
    prefix = name.rsplit('_', 1)[0]
    close += [x for x in names if x.startswith(prefix) and x not in close]
  return close[:n]


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
  """The registered seqio Task or Mixture `name`.

  Raises:
    KeyError: no such task or mixture; the message lists the closest names.
  """
  if name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(name)
  if name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(name)
  suggestions = closest_names(name)
  hint = ', '.join(suggestions) if suggestions else '(none close)'
  raise KeyError(
      f'No seqio Task or Mixture named {name!r}. Closest registered names: '
      f'{hint}. ({len(registered_names())} names registered; '
      'tasks.registry.registered_names() lists them all.)')
