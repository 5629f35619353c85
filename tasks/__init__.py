"""seqio tasks for sira-jax: the bundled offline suite and XTREME-UP.

`import tasks` registers the offline suite (no download; see
tasks/offline_suite.py and tasks/README.md) and, when $XTREME_UP_DATA_DIR is
set, the XTREME-UP tasks (tasks/xtreme_up.py). The trainer selects tasks by
name: `tasks.get_task_or_mixture(name)`; unknown names raise a KeyError that
lists the closest registered names. After parsing gin, `tasks.register_all()`
re-registers with the gin-configured vocabulary (and XTREME-UP data dir).
"""
import os

import gin

from tasks import metrics
from tasks import offline_suite
from tasks import registry
from tasks import vocab
from tasks import xtreme_up
from tasks.offline_suite import register_offline_suite
from tasks.registry import get_task_or_mixture
from tasks.registry import registered_names
from tasks.xtreme_up import register_xtreme_up


@gin.configurable
def register_all(xtreme_up_data_dir: str | None = None) -> list[str]:
  """Re-registers everything with `vocab.get_vocabulary()` (gin-aware).

  XTREME-UP is registered when `xtreme_up_data_dir`, the gin binding of
  `register_xtreme_up.data_dir`, or $XTREME_UP_DATA_DIR names a directory.
  Returns the registered names.
  """
  vocabulary = vocab.get_vocabulary()
  names = register_offline_suite(vocabulary)
  data_dir = (xtreme_up_data_dir or _gin_xtreme_up_data_dir() or
              os.environ.get(xtreme_up.ENV_VAR))
  if data_dir:
    # Other register_xtreme_up arguments (families, languages, ...) come from
    # gin bindings, if any.
    names += register_xtreme_up(data_dir=data_dir, vocabulary=vocabulary)
  return names


def _gin_xtreme_up_data_dir() -> str | None:
  try:
    return gin.query_parameter('tasks.xtreme_up.register_xtreme_up.data_dir')
  except ValueError:  # Not bound.
    return None


if os.environ.get(xtreme_up.ENV_VAR):
  register_xtreme_up()
