"""Input pipelines: seqio tasks/mixtures -> batches of encoder-decoder model features.

Training data is a pure function of (task or mixture, feature lengths, batch size, seed, step): the
dataset is shuffled and mixed with fixed seeds, batched, and `skip(start_step)` resumes at the exact
batch an uninterrupted run would see. Mixtures sample tasks by their rates (seqio); the feature
converter keeps only model features, so the model never sees task ids.

Batch features (numpy, [batch, length]): encoder_input_tokens, decoder_target_tokens,
decoder_input_tokens, decoder_loss_weights (plus segment ids / positions when packed).
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf
from absl import logging

import tasks
from tasks import truncation


def import_task_modules() -> list[str]:
  """The registered task and mixture names (`import tasks` registered the bundled suite; XTREME-UP
  registers on `register_after_gin` or on first use of an xtreme_up name)."""
  return tasks.registered_names()


def register_after_gin():
  """Re-registers tasks with the gin-configured vocabulary / data dirs (`tasks.register_all`)."""
  tasks.register_all()


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
  per-process batch.
  """
  mt = get_mixture_or_task(mixture_or_task_name)
  shard = seqio.ShardInfo(shard_index, num_shards) if num_shards > 1 else None
  ds = mt.get_dataset(
      sequence_length=dict(task_feature_lengths), split=split, use_cached=False, shuffle=True,
      seed=seed, num_epochs=None, shard_info=shard)
  ds = feature_converter(pack)(ds, dict(task_feature_lengths))
  ds = ds.batch(batch_size, drop_remainder=True)
  if start_step:
    ds = ds.skip(start_step)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options).prefetch(2)
  return _warn_on_truncation(ds.as_numpy_iterator(), task_feature_lengths)


def _warn_on_truncation(batches: Iterator[dict[str, np.ndarray]], lengths: Mapping[str, int],
                        every: int = 50) -> Iterator[dict[str, np.ndarray]]:
  """Yields `batches`, warning when examples lose tokens to `lengths` (counted by the tasks'
  `tasks.truncation.append_eos_after_trim`): on the first batch with a cut example, then whenever
  the number cut has grown tenfold (checked every `every` batches)."""
  before = truncation.snapshot()
  warned_at = 0
  for i, batch in enumerate(batches):
    if i % every == 0:
      counts = truncation.since(before)
      cut = max((c.cut for c in counts.values()), default=0)
      if cut and cut >= 10 * warned_at:
        logging.warning('%s', truncation.message(counts, lengths, 'training data'))
        warned_at = cut
    yield batch


def eval_batches(ds: tf.data.Dataset, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches a finite model-feature dataset, padding the last batch with zero rows.

  Each yielded batch carries 'num_real' (how many leading rows are real examples).
  """
  for b in ds.batch(batch_size).as_numpy_iterator():
    n = len(next(iter(b.values())))
    if n < batch_size:
      b = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)]) for k, v in
           b.items()}
    b['num_real'] = n
    yield b
