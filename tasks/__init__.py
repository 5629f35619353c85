"""seqio tasks for sira-jax: the bundled offline suite, XTREME-UP and tasks over TFDS datasets.

`import tasks` registers the offline suite (no download; see
tasks/offline_suite.py and tasks/README.md). XTREME-UP (tasks/xtreme_up.py)
is registered explicitly: by `register_all()` (called after gin is parsed)
when gin or $XTREME_UP_DATA_DIR names a data directory, or on the first
`get_task_or_mixture('xtreme_up_...')`. The trainer selects tasks by name:
`tasks.get_task_or_mixture(name)`; unknown names raise a KeyError that lists
the closest registered names. Tasks over prepared TFDS datasets (tasks/tfds_tasks.py)
are defined in gin (`tasks.tfds_tasks.register_tfds_tasks.tasks`, see
gin/tasks/tfds_task.gin) and registered by `register_all()` too.

A training run records `registration()` in its run_config.json, and eval and
infer re-apply it (`apply_registration`), so they see the same tasks without
repeating the data-directory settings.

Data errors: every data source raises `tasks.DataError` (a ValueError) for a
missing, undecodable or malformed data file, one line `path:line: problem;
fix`. `check_data(name)` reads every data file a task or mixture will read, so
a command can fail on bad data before it writes anything.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import gin
import seqio
from absl import logging

from tasks import metrics
from tasks import offline_suite
from tasks import registry
from tasks import tfds_tasks
from tasks import vocab
from tasks import xtreme_up
from tasks.data_files import DataError
from tasks.offline_suite import register_offline_suite
from tasks.registry import registered_names
from tasks.tfds_tasks import TfdsTask, register_tfds_task, register_tfds_tasks
from tasks.xtreme_up import register_xtreme_up

__all__ = [
    'DataError', 'TfdsTask', 'apply_registration', 'check_data', 'family', 'family_and_language',
    'get_task_or_mixture', 'metrics', 'offline_suite', 'register_all', 'registration', 'register_offline_suite', 'register_tfds_task', 'register_tfds_tasks',
    'register_xtreme_up', 'registered_names', 'registry', 'tfds_tasks', 'vocab', 'xtreme_up',
]


@gin.configurable
def register_all(xtreme_up_data_dir: str | None = None,
                 offline_train_examples_per_task: int | None = None) -> list[str]:
  """Re-registers everything with `vocab.get_vocabulary()` (gin-aware).

  The offline suite's generation tasks train on their first
  `offline_train_examples_per_task` examples (None: all;
  gin/benchmark/finetune.gin binds it to TRAIN_EXAMPLES_PER_TASK).
  XTREME-UP is registered when `xtreme_up_data_dir`, the gin binding of
  `register_xtreme_up.data_dir`, or $XTREME_UP_DATA_DIR names a directory;
  TFDS tasks and mixtures when gin binds `register_tfds_tasks.tasks`.
  Returns the registered names.
  """
  vocabulary = vocab.get_vocabulary()
  names = register_offline_suite(vocabulary, offline_train_examples_per_task)
  data_dir = (xtreme_up_data_dir or _gin_xtreme_up_data_dir() or
              os.environ.get(xtreme_up.ENV_VAR))
  if data_dir:
    # Other register_xtreme_up arguments (families, languages, ...) come from
    # gin bindings, if any.
    names += register_xtreme_up(data_dir=data_dir, vocabulary=vocabulary)
  if _gin_binding('tasks.tfds_tasks.register_tfds_tasks.tasks') is not None:
    # The tasks and mixtures come from gin.
    names += register_tfds_tasks(vocabulary=vocabulary)
  return names


def _gin_binding(parameter: str):
  try:
    return gin.query_parameter(parameter)
  except ValueError:  # Not bound.
    return None


def _gin_xtreme_up_data_dir() -> str | None:
  return _gin_binding('tasks.xtreme_up.register_xtreme_up.data_dir')


def get_task_or_mixture(name: str) -> seqio.Task | seqio.Mixture:
  """The registered seqio Task or Mixture `name`.

  A name starting with 'xtreme_up' registers XTREME-UP first if nothing has
  (data dir from gin or $XTREME_UP_DATA_DIR; a missing dir raises an error
  naming the expected files and where to download them).

  Raises:
    KeyError: no such task or mixture; the message lists the closest names.
  """
  if (name.startswith('xtreme_up') and name not in registered_names()
      and not xtreme_up.registered_data_dir()):
    register_xtreme_up()
  return registry.get_task_or_mixture(name)


def check_data(name: str) -> list[str]:
  """Opens and decodes every data file task or mixture `name` reads (every split of every
  member task); returns the paths read. The bundled offline suite reads no file (its examples
  are generated from installed packages), so its names return []. A TFDS task's files are the
  shards of its splits: the dataset must still be prepared under its data directory, and every
  record must parse.

  Raises:
    DataError: the first unreadable file, `path:line: problem; fix` (not UTF-8, a line that is
      not JSON, a record without a field, a file removed since registration; for TFDS, the data
      directory when the dataset is not prepared there, or `shard:record number`).
    KeyError: no such task or mixture (the message lists the closest names).
  """
  task_or_mixture = get_task_or_mixture(name)
  members = (task_or_mixture.tasks if isinstance(task_or_mixture, seqio.Mixture)
             else [task_or_mixture])
  names = [task.name for task in members]
  return xtreme_up.check_files(names) + tfds_tasks.check_files(names)


def family_and_language(name: str) -> tuple[str, str]:
  """(family, language) of a task name, for per-family and per-language summaries and routing
  analysis: ('date', 'ru') for 'offline_date_ru'; ('transliteration', 'hi') for
  'xtreme_up_transliteration_hi_Deva_Latn'; ('translation', 'sw') for
  'xtreme_up_translation_en_sw' (the non-English side). A registered XTREME-UP task's family is the
  one it was registered under (query tasks: their retrieval family). Other names: (name, '')."""
  for prefix, families in (('offline_', (*offline_suite.GENERATION_TASKS, 'span_corruption')),
                           ('xtreme_up_', xtreme_up.FAMILIES)):
    if not name.startswith(prefix):
      continue
    rest = name[len(prefix):]
    for fam in sorted(families, key=len, reverse=True):
      if rest.startswith(fam + '_'):
        parts = rest[len(fam) + 1:].split('_')
        en_to = fam == 'translation' and parts[0] == 'en' and len(parts) > 1
        lang = parts[1] if en_to else parts[0]
        return xtreme_up.family_of(name) or fam, lang
  return name, ''


def family(name: str) -> str:
  """The family of a task with its suite's prefix, for per-family summaries:
  `xtreme_up_<family>` for XTREME-UP, `offline_<task>` for the bundled suite, else the name."""
  xtreme_up_family = xtreme_up.family_of(name)
  if xtreme_up_family:
    return f'xtreme_up_{xtreme_up_family}'
  fam, lang = family_and_language(name)
  return f'offline_{fam}' if lang and name.startswith('offline_') else name


# Optional task families: run_config.json key -> (their registration arguments, or None when
# none are registered; the function that registers them from those arguments).
_OPTIONAL_FAMILIES = {
    'offline': (offline_suite.registration_args,
                lambda args: register_offline_suite(vocab.get_vocabulary(), **args)),
    'xtreme_up': (xtreme_up.registration_args, lambda args: register_xtreme_up(**args)),
    'tfds': (tfds_tasks.registration_args, lambda args: register_tfds_tasks(**args)),
}


def registration() -> dict[str, Any]:
  """How the optional task families were registered (JSON-able): {} when only
  the bundled suite is, as it is by default, else {'xtreme_up':
  register_xtreme_up kwargs, 'tfds': register_tfds_tasks kwargs, 'offline':
  the offline suite's training-example limit}, for those registered."""
  record = {}
  for key, (args_fn, _) in _OPTIONAL_FAMILIES.items():
    args = args_fn()
    if args:
      record[key] = args
  return record


def apply_registration(record: Mapping[str, Any] | None) -> list[str]:
  """Registers what a run's `registration()` record names; returns the names.

  A registration already made in this process (gin or $XTREME_UP_DATA_DIR)
  is kept when it differs from the record: explicit settings win, with a
  warning.
  """
  names = []
  for key, (args_fn, register) in _OPTIONAL_FAMILIES.items():
    args = (record or {}).get(key)
    if not args:
      continue
    current = args_fn()
    if current is None:
      names += register(args)
    elif current != args:
      logging.warning('%s tasks are registered with %s, not with the run\'s %s: '
                      'keeping the explicit settings.', key, current, args)
  return names
