"""The project's seqio tasks for T5X gin files (gin/t5x/tasks/*.gin).

`registered(name)` (re)registers the bundled offline suite, and XTREME-UP when a data directory is
given, with the gin-configured vocabulary (`tasks.vocab.get_vocabulary`: bytes, or the local
SentencePiece file of t5x/models/sentencepiece.gin) and returns `name`, so that
`MIXTURE_OR_TASK_NAME = @t5x_tasks.registered()` names a task whose vocabulary matches the model.
"""
from __future__ import annotations

from typing import Optional


def registered(name: str, xtreme_up_data_dir: Optional[str] = None) -> str:
  """Registers the tasks (see the module docstring); returns `name`.

  Raises KeyError (listing close registered names) when `name` is not a task or mixture.
  """
  import tasks
  tasks.register_all(xtreme_up_data_dir=xtreme_up_data_dir)
  tasks.get_task_or_mixture(name)
  return name
