"""seqio Tasks over prepared TFDS datasets, defined in gin as T5X users define them.

A `TfdsTask` names a text-to-text task over a TFDS dataset: the seqio task name, the TFDS name
('dataset/config:version'), the features that become `inputs` and `targets`
(`seqio.preprocessors.rekey`) or a preprocessor of one's own, the metrics (names in
`tasks.metrics.SEQIO_METRIC_FNS`), the data directory and the splits. Registered, it is a
`seqio.Task` with a `seqio.TfdsDataSource(read_only=True)` (nothing is ever downloaded or
generated at read time) and this package's preprocessing: rekey, tokenize, cache placeholder,
`truncation.append_eos_after_trim`; output features and vocabulary from tasks/vocab.py.

In gin (gin/tasks/tfds_task.gin), one scoped `TfdsTask` per task and the list to register:

  de/tasks.tfds_tasks.TfdsTask.name = 'tfds_date_de'
  de/tasks.tfds_tasks.TfdsTask.tfds_name = 'offline_suite/date_de:1.0.0'
  de/tasks.tfds_tasks.TfdsTask.tfds_data_dir = %TFDS_DATA_DIR
  tasks.tfds_tasks.register_tfds_tasks.tasks = [@de/tasks.tfds_tasks.TfdsTask()]
  tasks.tfds_tasks.register_tfds_tasks.mixtures = {'tfds_mix': ['tfds_date_de', ...]}

`tasks.register_all()` (run by every command line after gin is parsed) registers them when
`register_tfds_tasks.tasks` is bound. A training run records `registration_args()` in its
run_config.json, and eval / infer register the same tasks from it (`tasks.apply_registration`).
In Python: `register_tfds_task(TfdsTask(...))` adds one task.

Registration checks each dataset up front: it must be prepared under its data directory (the
`tfds_data_dir` given, else $TFDS_DATA_DIR, else ~/tensorflow_datasets), hold the splits asked
for and text features `input_key` / `target_key`. Anything else raises `tasks.DataError`
naming the task, the dataset and the directory, with the fix (build it there, or point
tfds_data_dir at the directory that holds it); nothing is registered then.
`check_files(names)` (`tasks.check_data`) also reads every record of every shard a task reads.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import gin
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from tasks import metrics
from tasks import registry
from tasks import truncation
from tasks import vocab as vocab_lib
from tasks.data_files import DataError

ENV_VAR = 'TFDS_DATA_DIR'
BUNDLED_DATASET = 'offline_suite'  # tasks/offline_suite_tfds.py


@gin.configurable(module='tasks.tfds_tasks')
@dataclasses.dataclass(frozen=True)
class TfdsTask:
  """One text-to-text seqio task over a TFDS dataset (JSON-able: `record()`).

  name: the seqio task name.
  tfds_name: 'dataset/config:version' as `tfds.builder` takes it (config and version optional;
    a version may be a pattern such as '1.*.*').
  input_key, target_key: text features of the dataset that become `inputs` and `targets`;
    unused when `preprocessor` is given.
  preprocessor: a seqio preprocessor (dataset -> dataset, e.g. a function decorated with
    `seqio.map_over_dataset`) that makes text `inputs` and `targets` from a raw example, as its
    import path 'package.module.function' or the module-level function itself; replaces the rekey.
  metrics: names in `tasks.metrics.SEQIO_METRIC_FNS` ('sequence_accuracy', 'chrf', 'cer', ...).
  tfds_data_dir: the directory holding `dataset/config/version/`; None: $TFDS_DATA_DIR, else
    ~/tensorflow_datasets (registration records it as an absolute path).
  splits: TFDS split names, or {task split: TFDS split or slice such as 'train[:90%]'}; None:
    every split of the dataset.
  """
  name: str
  tfds_name: str
  input_key: str = 'inputs'
  target_key: str = 'targets'
  preprocessor: str | Callable | None = None
  metrics: Sequence[str] = ('sequence_accuracy',)
  tfds_data_dir: str | None = None
  splits: Sequence[str] | Mapping[str, str] | None = None

  def __post_init__(self):
    if callable(self.preprocessor):
      object.__setattr__(self, 'preprocessor', _import_path(self.preprocessor, self.name))
    object.__setattr__(self, 'metrics', tuple(self.metrics))
    if self.splits is not None and not isinstance(self.splits, Mapping):
      object.__setattr__(self, 'splits', tuple(self.splits))
    unknown = [m for m in self.metrics if m not in metrics.SEQIO_METRIC_FNS]
    if unknown:
      raise ValueError(f'TFDS task {self.name!r}: unknown metrics {unknown}; known: '
                       f'{sorted(metrics.SEQIO_METRIC_FNS)}.')

  @property
  def data_dir(self) -> str:
    """Absolute: tfds_data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    default = os.environ.get(ENV_VAR) or tfds.core.constants.get_default_data_dir()
    return os.path.abspath(os.path.expanduser(self.tfds_data_dir or default))

  def record(self) -> dict[str, Any]:
    """JSON-able fields, data dir absolute: what a run records and `TfdsTask(**record)` rebuilds."""
    fields = dataclasses.asdict(dataclasses.replace(self, tfds_data_dir=self.data_dir))
    return json.loads(json.dumps(fields))


def _import_path(fn: Callable, task_name: str) -> str:
  path = f'{fn.__module__}.{fn.__qualname__}'
  if '<' in path:
    raise ValueError(f'TFDS task {task_name!r}: preprocessor {path} is not a module-level '
                     'function; define it at module level (a run records its import path).')
  return path


def _load_preprocessor(task: TfdsTask) -> Callable:
  module, _, attr = task.preprocessor.rpartition('.')
  try:
    return getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError, ValueError) as e:
    raise ValueError(f'TFDS task {task.name!r}: cannot import preprocessor '
                     f'{task.preprocessor!r} ({e}); give "package.module.function" of an '
                     'importable module.') from None


def _dataset_and_variant(tfds_name: str) -> tuple[str, str]:
  """('offline_suite', 'date_fr/1.0.0') for 'offline_suite/date_fr:1.0.0'."""
  name, _, version = tfds_name.partition(':')
  dataset, _, config = name.partition('/')
  return dataset, '/'.join(p for p in (config, version) if p)


def prepared_variants(data_dir: str, dataset: str) -> list[str]:
  """'config/version' (or 'version') folders of `dataset` under `data_dir` holding a
  dataset_info.json."""
  root = os.path.join(data_dir, dataset)
  found = []
  for folder, _, files in os.walk(root):
    if 'dataset_info.json' in files:
      found.append(os.path.relpath(folder, root))
  return sorted(found)


def _build_hint(task: TfdsTask) -> str:
  dataset, variant = _dataset_and_variant(task.tfds_name)
  if dataset == BUNDLED_DATASET:
    config = variant.split('/')[0]
    return (f'python -m tasks.offline_suite_tfds --data_dir={task.data_dir} '
            f'--configs={config}')
  return (f"tfds.builder('{task.tfds_name}', data_dir='{task.data_dir}')"
          '.download_and_prepare() (or `tfds build` with --data_dir)')


def _not_prepared(task: TfdsTask, why: str) -> DataError:
  dataset, variant = _dataset_and_variant(task.tfds_name)
  found = prepared_variants(task.data_dir, dataset)
  there = (f'it holds {dataset}/{{{", ".join(found)}}}' if found else
           f'it holds no prepared {dataset}')
  return DataError.at(
      task.data_dir, None,
      f'TFDS task {task.name!r}: dataset {task.tfds_name!r} is not prepared in this '
      f'directory ({why}; {there})',
      f'build it there ({_build_hint(task)}), or point tfds_data_dir (gin '
      f'tasks.tfds_tasks.TfdsTask.tfds_data_dir, or ${ENV_VAR}) at the directory that holds '
      f'{dataset}/{variant or "<config>/<version>"}/')


def _base_splits(split: str) -> list[str]:
  """TFDS split names in a split expression: ['train', 'validation'] for
  'train[:90%]+validation'."""
  return [re.sub(r'\[.*\]$', '', part.strip()) for part in split.split('+')]


def _task_splits(task: TfdsTask, builder: tfds.core.DatasetBuilder) -> dict[str, str]:
  """{task split: TFDS split expression}."""
  if task.splits is None:
    return {s: s for s in builder.info.splits}
  if isinstance(task.splits, Mapping):
    return dict(task.splits)
  return {s: s for s in task.splits}


def dataset_builder(task: TfdsTask) -> tfds.core.DatasetBuilder:
  """The prepared builder of `task`'s dataset, its splits and features checked.

  Raises:
    DataError: the dataset is not prepared under `task.data_dir` (or not found at all), lacks a
      split, or lacks a text feature input_key / target_key; names the task, dataset and directory.
  """
  try:
    builder = tfds.builder(task.tfds_name, data_dir=task.data_dir)
  # Not found; a bad config or version; an unreadable dataset_info.json (OSError).
  except (ValueError, AssertionError, KeyError, OSError) as e:
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise _not_prepared(task, first_line.rstrip('.')) from None
  if not builder.is_prepared():
    raise _not_prepared(task, f'no dataset_info.json in {builder.data_path}')
  available = list(builder.info.splits)
  for task_split, split in _task_splits(task, builder).items():
    missing = [s for s in _base_splits(split) if s not in available]
    if missing:
      raise DataError.at(
          str(builder.data_path), None,
          f'TFDS task {task.name!r}: dataset {task.tfds_name!r} has no split {missing[0]!r} '
          f'(for task split {task_split!r}); its splits: {", ".join(available)}',
          'set TfdsTask.splits to some of them')
  if task.preprocessor is None:
    features = builder.info.features
    for field, key in (('input_key', task.input_key), ('target_key', task.target_key)):
      if key not in features:
        raise DataError.at(
            str(builder.data_path), None,
            f'TFDS task {task.name!r}: dataset {task.tfds_name!r} has no feature {key!r} '
            f'({field}); its features: {", ".join(sorted(features))}',
            f'set {field} to one of them, or give a preprocessor')
      if not isinstance(features[key], tfds.features.Text) and features[key].dtype != tf.string:
        raise DataError.at(
            str(builder.data_path), None,
            f'TFDS task {task.name!r}: feature {key!r} ({field}) of {task.tfds_name!r} is '
            f'{type(features[key]).__name__}, not text',
            'give a preprocessor that maps it to a text feature')
  return builder


def _to_text(task: TfdsTask) -> Callable:
  """The preprocessor that makes text `inputs` and `targets` of a raw example."""
  if task.preprocessor is None:
    return functools.partial(seqio.preprocessors.rekey,
                             key_map={'inputs': task.input_key, 'targets': task.target_key})
  return _load_preprocessor(task)


def _check_name_free(name: str) -> None:
  """A TFDS task or mixture may replace its own earlier registration, never another task's."""
  if registry.registered(name) is not None and name not in registered_names():
    raise ValueError(f'TFDS task or mixture name {name!r} is taken by another registered task '
                     'or mixture; choose another name.')


def _prepare(task: TfdsTask) -> tuple[TfdsTask, tfds.core.DatasetBuilder, Callable]:
  """Everything `_add_task` needs, checked (DataError, ValueError) before anything registers;
  the task with its data directory made absolute (a later chdir cannot move it)."""
  _check_name_free(task.name)
  task = dataclasses.replace(task, tfds_data_dir=task.data_dir)
  return task, dataset_builder(task), _to_text(task)


def _add_task(task: TfdsTask, builder: tfds.core.DatasetBuilder, to_text: Callable,
              vocabulary: seqio.Vocabulary) -> None:
  registry.add_task(
      task.name,
      source=seqio.TfdsDataSource(tfds_name=task.tfds_name, tfds_data_dir=task.data_dir,
                                  splits=_task_splits(task, builder), read_only=True),
      preprocessors=[to_text,
                     seqio.preprocessors.tokenize,
                     seqio.CacheDatasetPlaceholder(),
                     truncation.append_eos_after_trim],
      output_features=vocab_lib.get_output_features(vocabulary),
      metric_fns=[metrics.SEQIO_METRIC_FNS[m] for m in task.metrics])
  _STATE['tasks'][task.name] = task


# name -> TfdsTask of every registered TFDS task; mixtures registered with them.
_STATE: dict[str, Any] = {'tasks': {}, 'mixtures': {}}


def register_tfds_task(task: TfdsTask, vocabulary: seqio.Vocabulary | None = None) -> str:
  """Checks `task`'s dataset (`dataset_builder`) and registers it (replacing a TFDS task of the
  same name); returns its name. vocabulary: default `tasks.vocab.get_vocabulary()`."""
  prepared = _prepare(task)
  _add_task(*prepared, vocabulary if vocabulary is not None else vocab_lib.get_vocabulary())
  return task.name


@gin.configurable(module='tasks.tfds_tasks')
def register_tfds_tasks(
    tasks: Sequence[TfdsTask | Mapping[str, Any]] = (),
    mixtures: Mapping[str, Sequence[str | Sequence]] | None = None,
    vocabulary: seqio.Vocabulary | None = None) -> list[str]:
  """Registers `tasks` and `mixtures` in place of every TFDS task and mixture registered before;
  returns their names.

  tasks: `TfdsTask`s (or their `record()` dicts).
  mixtures: {mixture name: member task names, or [name, rate] pairs}, rate 1 by default; members
    may be any registered tasks.
  Every task is checked before anything is registered: its dataset (DataError, see
  `dataset_builder`), its preprocessor's import path and a name no other task holds (ValueError).
  """
  specs = [t if isinstance(t, TfdsTask) else TfdsTask(**t) for t in tasks]
  names = [t.name for t in specs] + list(mixtures or {})
  if len(set(names)) < len(names):
    raise ValueError(f'TFDS task and mixture names repeat: {names}.')
  prepared = [_prepare(t) for t in specs]
  for name in mixtures or {}:
    _check_name_free(name)
  vocabulary = vocabulary if vocabulary is not None else vocab_lib.get_vocabulary()
  unregister()
  for task_args in prepared:
    _add_task(*task_args, vocabulary)
  for name, members in (mixtures or {}).items():
    members = [m if isinstance(m, str) else tuple(m) for m in members]
    registry.add_mixture(name, members)
    _STATE['mixtures'][name] = members
  return registered_names()


def registered_names() -> list[str]:
  """Every registered TFDS task and mixture name."""
  return [*_STATE['tasks'], *_STATE['mixtures']]


def registration_args() -> dict[str, Any] | None:
  """`register_tfds_tasks` keyword arguments that register the current TFDS tasks and mixtures
  again (JSON-able, data dirs absolute); None when there are none. A run records it."""
  if not _STATE['tasks'] and not _STATE['mixtures']:
    return None
  return json.loads(json.dumps({
      'tasks': [t.record() for t in _STATE['tasks'].values()],
      'mixtures': _STATE['mixtures']}))


def unregister() -> None:
  """Removes every registered TFDS task and mixture."""
  registry.remove(registered_names())
  _STATE.update(tasks={}, mixtures={})


def check_files(task_names: Iterable[str]) -> list[str]:
  """Reads every record of every shard the registered TFDS tasks among `task_names` read (other
  names are ignored); returns the shard paths.

  Raises:
    DataError: a dataset no longer prepared (see `dataset_builder`), a missing shard, or a record
      that does not parse, as `shard:record number: problem; fix`.
  """
  read = []
  for name in task_names:
    task = _STATE['tasks'].get(name)
    if task is None:
      continue
    builder = dataset_builder(task)
    splits = {s for split in _task_splits(task, builder).values() for s in _base_splits(split)}
    for split in sorted(splits):
      for path in builder.info.splits[split].filepaths:
        _check_shard(task, builder, str(path))
        read.append(str(path))
  return read


def _check_shard(task: TfdsTask, builder: tfds.core.DatasetBuilder, path: str) -> None:
  fix = f'build the dataset again ({_build_hint(task)})'
  if not os.path.isfile(path):
    raise DataError.at(path, None, f'TFDS task {task.name!r}: shard of {task.tfds_name!r} is '
                       'missing', fix)
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    return  # Other formats (array_record) are read by seqio as they are; existence checked.
  checked = 0
  try:
    for record in tf.data.TFRecordDataset(path).as_numpy_iterator():
      builder.info.features.deserialize_example(record)
      checked += 1
  except (tf.errors.OpError, ValueError) as e:
    raise DataError.at(path, checked + 1, f'TFDS task {task.name!r}: record {checked + 1} of '
                       f'{task.tfds_name!r} does not parse ({type(e).__name__})', fix) from None
