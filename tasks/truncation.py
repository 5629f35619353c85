"""Counting what the length limits cut: a seqio preprocessor and its counters.

`append_eos_after_trim` is seqio's preprocessor of the same name plus a count:
every example it sees adds to per-feature counters (examples seen, examples
longer than the limit, the longest length), kept in TensorFlow variables so
the count runs inside the tf.data pipeline at no Python cost. Every task of
this project uses it in place of seqio's, so truncation is counted where it
happens; `sira_jax.data` (training) and `sira_jax.eval` / `sira_jax.infer`
read the counters and warn.

Lengths count tokens including the EOS that is appended, so "longer than the
limit" means the example lost tokens: a target of `targets` length L keeps
L - 1 tokens and its EOS.
"""
from __future__ import annotations

import dataclasses
import threading

import seqio
import tensorflow as tf

_LOCK = threading.Lock()
_COUNTERS: dict[str, tf.Variable] = {}  # feature -> int64 [seen, cut, longest]


def _counter(feature: str) -> tf.Variable:
  with _LOCK:
    if feature not in _COUNTERS:
      with tf.init_scope():  # Created eagerly even when first asked in a trace.
        _COUNTERS[feature] = tf.Variable(tf.zeros([3], tf.int64), trainable=False,
                                         name=f'truncation_{feature}')
    return _COUNTERS[feature]


@dataclasses.dataclass(frozen=True)
class Counts:
  """Examples seen and cut for one feature; `longest` in tokens with EOS."""
  seen: int = 0
  cut: int = 0
  longest: int = 0


def snapshot() -> dict[str, Counts]:
  """Current counts per feature (cumulative since the process started)."""
  with _LOCK:
    items = list(_COUNTERS.items())
  return {k: Counts(*(int(x) for x in v.numpy())) for k, v in items}


def since(before: dict[str, Counts]) -> dict[str, Counts]:
  """Counts added after `before = snapshot()` (longest: the overall longest)."""
  out = {}
  for k, now in snapshot().items():
    old = before.get(k, Counts())
    out[k] = Counts(now.seen - old.seen, now.cut - old.cut, now.longest)
  return out


def message(counts: dict[str, Counts], lengths, where: str) -> str | None:
  """A warning naming each cut feature, how many and the length that fits; None if none cut."""
  parts = []
  for feature, c in sorted(counts.items()):
    if c.cut:
      limit = lengths.get(feature) if lengths else None
      parts.append(f"{c.cut} of {c.seen} {feature} ({100 * c.cut / max(c.seen, 1):.1f}%) longer "
                   f"than {limit} tokens were truncated (longest: {c.longest} tokens with EOS)")
  if not parts:
    return None
  return (f'{where}: ' + '; '.join(parts) + '. Raise TASK_FEATURE_LENGTHS (e.g. '
          "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': ..., 'targets': ...}\") to keep them whole.")


def append_eos_after_trim(dataset: tf.data.Dataset, output_features, sequence_length=None
                          ) -> tf.data.Dataset:
  """seqio.preprocessors.append_eos_after_trim, counting examples that lose tokens."""
  if sequence_length:
    limits = {k: int(sequence_length[k]) for k, f in output_features.items()
              if sequence_length.get(k) and f.add_eos}
    counters = {k: _counter(k) for k in limits}

    def count(ex):
      for k, limit in limits.items():
        if k in ex:
          n = tf.cast(tf.shape(ex[k])[-1], tf.int64) + 1  # + EOS
          counters[k].assign_add(tf.stack([tf.constant(1, tf.int64),
                                           tf.cast(n > limit, tf.int64),
                                           tf.constant(0, tf.int64)]))
          counters[k].scatter_max(tf.IndexedSlices(tf.reshape(n, [1]), tf.constant([2])))
      return ex

    dataset = dataset.map(count, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return seqio.preprocessors.append_eos_after_trim(dataset, output_features, sequence_length)
