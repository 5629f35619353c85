"""Shared helpers for the trainer/checkpoint/CLI tests: a tiny model config and a fixture task.

The fixture task `fixture_reverse` (inputs: a short lowercase word, targets: the word reversed) is
built in memory, so its exact contents and the metric's value on any predictions are known.
"""
from __future__ import annotations

import random

import seqio
import tensorflow as tf

from sira_jax.adapters import AdapterConfig
from sira_jax.t5.config import T5Config

LENGTHS = {'inputs': 16, 'targets': 16}
FIXTURE_TASK = 'fixture_reverse'


def tiny_config(kind='sira', **adapter_kw) -> T5Config:
  adapter = AdapterConfig(kind=kind, rank=2, **({'num_experts': 4, 'top_k': 2} if kind == 'sira'
                                               else {}), **adapter_kw) if kind != 'none' else AdapterConfig()
  return T5Config(vocab_size=260, d_model=32, d_ff=64, num_heads=2, d_kv=16, num_encoder_layers=1,
                  num_decoder_layers=1, dropout_rate=0.0, relative_attention_num_buckets=8,
                  relative_attention_max_distance=16, adapter=adapter)


def fixture_examples(split: str) -> list[tuple[str, str]]:
  rng = random.Random({'train': 0, 'validation': 1, 'test': 2}[split])
  n = {'train': 256, 'validation': 12, 'test': 10}[split]
  out = []
  for _ in range(n):
    w = ''.join(rng.choice('abcdef') for _ in range(rng.randint(2, 5)))
    out.append((w, w[::-1]))
  return out


def exact_match(targets, predictions):
  """Percentage of predictions equal to their target."""
  return {'exact_match': 100.0 * sum(t == p for t, p in zip(targets, predictions)) / len(targets)}


def _source(split, shuffle_files=False, seed=None):
  del shuffle_files, seed
  ex = fixture_examples(split)
  return tf.data.Dataset.from_tensor_slices(
      {'inputs': [a for a, _ in ex], 'targets': [b for _, b in ex]})


def register_fixture_task() -> str:
  vocab = seqio.ByteVocabulary()
  seqio.TaskRegistry.remove(FIXTURE_TASK)
  seqio.TaskRegistry.add(
      FIXTURE_TASK,
      seqio.FunctionDataSource(_source, splits=['train', 'validation', 'test']),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={'inputs': seqio.Feature(vocab), 'targets': seqio.Feature(vocab)},
      metric_fns=[exact_match])
  return FIXTURE_TASK
