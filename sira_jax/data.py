"""Input pipelines: seqio tasks/mixtures -> batches of encoder-decoder model features.

Training data is a pure function of (task or mixture, feature lengths, batch size, seed, step): the
dataset is shuffled and mixed with fixed seeds, batched, and `skip(start_step)` resumes at the exact
batch an uninterrupted run would see. Mixtures sample tasks by their rates (seqio); the feature
converter keeps only model features, so the model never sees task ids.

Batch features (numpy, [batch, length]): encoder_input_tokens, decoder_target_tokens,
decoder_input_tokens, decoder_loss_weights (plus segment ids / positions when packed).
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Hashable, Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf
from absl import logging

from sira_jax import lru
import tasks
from tasks import truncation


def register_tasks() -> list[str]:
  """(Re-)registers the tasks with the gin-configured vocabulary and data directories
  (`tasks.register_all`; `gin_utils.parse_and_register` calls it after parsing); returns the
  registered names."""
  return tasks.register_all()


def task_registration() -> dict:
  """How the optional task families (XTREME-UP) were registered: a training run records it in its
  run_config.json (`tasks.registration()`); {} when only the bundled suite is registered."""
  return tasks.registration()


def register_run_tasks(run_config_path: str) -> list[str]:
  """Re-applies the task registration a training run recorded in `run_config_path` (if the file
  exists), so eval and infer see the run's tasks without repeating its settings."""
  if not os.path.exists(run_config_path):
    return []
  with open(run_config_path) as f:
    return tasks.apply_registration(json.load(f))


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
  """`tasks.get_task_or_mixture`; an unknown name raises ValueError listing the closest names."""
  try:
    return tasks.get_task_or_mixture(name)
  except KeyError as e:
    raise ValueError(e.args[0] if e.args else str(e)) from None


def feature_converter(pack: bool = False) -> seqio.FeatureConverter:
  return seqio.EncDecFeatureConverter(pack=pack)


def train_batches(
    mixture_or_task_name: str,
    task_feature_lengths: Mapping[str, int],
    batch_size: int,
    *,
    seed: int = 0,
    split: str = 'train',
    start_step: int = 0,
    pack: bool = False,
    shard_index: int = 0,
    num_shards: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Endless deterministic iterator of training batches, starting at batch `start_step`.

  With several processes each reads its shard (`shard_index` of `num_shards`) and `batch_size` is the
  per-process batch. Inside `shared_training_streams()` (sweeps) runs asking for the same data
  replay one pipeline's batches instead of building their own: the same batches either way.
  """
  mt = get_mixture_or_task(mixture_or_task_name)
  lengths = dict(task_feature_lengths)

  def build(start: int) -> Iterator[dict[str, np.ndarray]]:
    return _pipeline(mt, lengths, batch_size, seed=seed, split=split, start_step=start, pack=pack,
                     shard_index=shard_index, num_shards=num_shards)

  if _STREAMS is None:
    return _warn_on_truncation(build(start_step), lengths)
  # `build` keeps the task alive with the stream, so its id in the key stays unique.
  key = (mt.name, id(mt), tuple(sorted(lengths.items())), batch_size, seed, split, pack,
         shard_index, num_shards)
  streams, max_bytes = _STREAMS
  stream = streams.get(key, lambda: _SharedStream(build, lengths, max_bytes))
  return stream.iterate(start_step)


def _pipeline(mt, lengths: dict[str, int], batch_size: int, *, seed: int, split: str,
              start_step: int, pack: bool, shard_index: int, num_shards: int
              ) -> Iterator[dict[str, np.ndarray]]:
  """A fresh tf.data pipeline's batches from batch `start_step` on (seqio shuffle and mixing
  with fixed seeds: a new pipeline always gives the same sequence)."""
  shard = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
  ds = mt.get_dataset(
      sequence_length=lengths, split=split, use_cached=False, shuffle=True,
      seed=seed, num_epochs=None, shard_info=shard)
  ds = feature_converter(pack)(ds, lengths)
  ds = ds.batch(batch_size, drop_remainder=True)
  if start_step:
    ds = ds.skip(start_step)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(2).as_numpy_iterator()


# (streams, byte budget per stream) inside `shared_training_streams`, else None.
_STREAMS: tuple[lru.LRU, int] | None = None


@contextlib.contextmanager
def shared_training_streams(max_streams: int = 4, max_bytes_per_stream: int = 64 << 20):
  """Within this context, training runs of this process that read the same data (task or
  mixture object, lengths, batch size, seed, split, packing, shard) share one pipeline: the
  first run records its batches (up to `max_bytes_per_stream`, at most `max_streams` kept), the
  next ones replay them and continue the same pipeline. Building a pipeline of the 30-task bench
  mixture costs ~13 s here (seqio traces ~150 tf.data maps), and its TF threads take CPU from the
  train step; a sweep's runs of one seed read the same stream. Batch i is always batch i of one
  fresh pipeline, so what a run sees does not depend on the runs before it."""
  global _STREAMS
  saved = _STREAMS
  _STREAMS = lru.LRU(max_streams), max_bytes_per_stream
  try:
    yield
  finally:
    _STREAMS = saved


class _SharedStream:
  """Batches 0, 1, ... of one pipeline, recorded as they are first read and replayed after.

  Invariant: the live pipeline stands at batch len(recorded). Past the byte budget a reader
  builds its own pipeline from its batch on (`skip`), as without sharing. Recorded arrays are
  read-only, so no reader can change what the next one sees; truncation warnings are logged
  again at the batch where they were first logged.
  """

  def __init__(self, build: Callable[[int], Iterator[dict]], lengths: Mapping[str, int],
               max_bytes: int):
    self._build = build
    self._lengths = lengths
    self._max_bytes = max_bytes
    self._live = None
    self._recorded: list[dict[str, np.ndarray]] = []
    self._warnings: dict[int, str] = {}
    self.nbytes = 0

  def iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    i = start_step
    while i < len(self._recorded) or (i == len(self._recorded) and self.nbytes < self._max_bytes):
      if i == len(self._recorded):
        if self._live is None:
          self._live = _warn_on_truncation(self._build(0), self._lengths, log=self._warnings)
        batch = next(self._live)
        for v in batch.values():
          v.setflags(write=False)
          self.nbytes += v.nbytes
        self._recorded.append(batch)
      elif i in self._warnings:
        logging.warning('%s', self._warnings[i])
      yield dict(self._recorded[i])  # a new dict: readers may add or drop keys
      i += 1
    yield from _warn_on_truncation(self._build(i), self._lengths)


def _warn_on_truncation(batches: Iterator[dict[str, np.ndarray]], lengths: Mapping[str, int],
                        every: int = 50, log: dict[int, str] | None = None
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Yields `batches`, warning when examples lose tokens to `lengths` (counted by the tasks'
  `tasks.truncation.append_eos_after_trim`): on the first batch with a cut example, then whenever
  the number cut has grown tenfold (checked every `every` batches). `log`: {batch index: message}
  of the warnings given."""
  before = truncation.snapshot()
  warned_at = 0
  for i, batch in enumerate(batches):
    if i % every == 0:
      counts = truncation.since(before)
      cut = max((c.cut for c in counts.values()), default=0)
      if cut and cut >= 10 * warned_at:
        msg = truncation.message(counts, lengths, 'training data')
        logging.warning('%s', msg)
        if log is not None:
          log[i] = msg
        warned_at = cut
    yield batch


def eval_batches(ds: tf.data.Dataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches a finite model-feature dataset, padding the last batch with zero rows.

  Each yielded batch carries 'num_real' (how many leading rows are real examples).
  """
  for b in ds.batch(batch_size).as_numpy_iterator():
    n = len(next(iter(b.values())))
    b = pad_rows(b, batch_size)
    b['num_real'] = n
    yield b


_EVAL_BATCHES = lru.LRU(256)  # (id(owner), key) -> (owner, batches)


def cached_eval_batches(owner: Any, key: Hashable, build: Callable[[], list]) -> list:
  """The eval batches `build()` returns, built once per process per (owner, key) and reused by
  every run a sweep evaluates (the one eval-batch cache: eval, infer and the sweeps' scoring).

  owner: the object the batches come from (a registered seqio task, a dataset an Evaluator
  caches); the entry keeps it alive, so its id stays unique, and re-registering a task under the
  same name builds new batches. Callers must not modify the batches.
  """
  return _EVAL_BATCHES.get((id(owner), key), lambda: (owner, build()))[1]


def pad_rows(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """`batch` with zero rows appended to `batch_size` rows (a new dict; arrays kept if full)."""
  return {k: v if len(v) >= batch_size else
          np.concatenate([v, np.zeros((batch_size - len(v),) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}
