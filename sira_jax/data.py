"""Input pipelines: seqio tasks/mixtures -> batches of encoder-decoder model features.

Training data is a pure function of (task or mixture, feature lengths, batch size, seed, step): the
dataset is shuffled and mixed with fixed seeds, batched, and `skip(start_step)` resumes at the exact
batch an uninterrupted run would see. Mixtures sample tasks by their rates (seqio); the feature
converter keeps only model features, so the model never sees task ids.

Batch features (numpy, [batch, length]): encoder_input_tokens, decoder_target_tokens,
decoder_input_tokens, decoder_loss_weights (plus segment ids / positions when packed).
"""
from __future__ import annotations

import difflib
from typing import Iterator, Mapping

import numpy as np
import seqio
import tensorflow as tf


def registered_names() -> list[str]:
  return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def import_task_modules():
  """Registers the project's tasks (bundled suite, XTREME-UP when configured) with seqio."""
  import tasks  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import


def register_after_gin():
  """Re-registers tasks with the gin-configured vocabulary / data dirs (`tasks.register_all`)."""
  import tasks  # pylint: disable=import-outside-toplevel
  if hasattr(tasks, 'register_all'):
    tasks.register_all()


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
  """seqio lookup; an unknown name raises ValueError listing the closest registered names."""
  import_task_modules()
  import tasks  # pylint: disable=import-outside-toplevel
  if hasattr(tasks, 'get_task_or_mixture'):
    try:
      return tasks.get_task_or_mixture(name)
    except KeyError as e:
      raise ValueError(e.args[0] if e.args else str(e)) from None
  names = registered_names()
  if name not in names:
    close = difflib.get_close_matches(name, names, n=8, cutoff=0.5)
    hint = ', '.join(close) if close else f'(none close; {len(names)} registered)'
    raise ValueError(f'unknown task or mixture {name!r}; closest registered names: {hint}')
  return seqio.get_mixture_or_task(name)


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
  return ds.as_numpy_iterator()


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
