"""T5-style span corruption as seqio preprocessors (TensorFlow ops).

Objective (Raffel et al. 2020, sec. 3.1.4): a fraction `noise_density` of a
token chunk is masked in `num_spans = round(num_noise / mean_noise_span_length)`
contiguous spans. Inputs keep the unmasked tokens with each masked span
replaced by one sentinel; targets list, per span, its sentinel followed by the
masked tokens. Sentinel i is id `vocab_size - 1 - i` (T5's convention: with a
SentencePiece vocabulary with extra ids these are <extra_id_i>; with the byte
vocabulary they are bytes 0xFF, 0xFE, ..., which never occur in UTF-8 text).

Example (tokens a..j, spans [c d] and [h]):
  inputs  = a b <S0> e f g <S1> i j
  targets = <S0> c d <S1> h

Pipeline: tokenize 'targets' text -> `split_tokens_for_span_corruption`
(chunks sized so that, after corruption and EOS, inputs fit
sequence_length['inputs']) -> `span_corruption` -> append EOS after trimming.
The mask is drawn with stateless random ops from seqio's per-preprocessor seed,
so `get_dataset(seed=...)` is reproducible.
"""
from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from tasks import truncation

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def _num_noise_and_spans(length: int, noise_density: float,
                         mean_span: float) -> tuple[int, int]:
  num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
  num_spans = max(int(round(num_noise / mean_span)), 1)
  return num_noise, num_spans


def chunk_length_for(inputs_length: int,
                     noise_density: float = NOISE_DENSITY,
                     mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
                     ) -> tuple[int, int]:
  """Largest raw chunk length whose corrupted inputs (+EOS) fit inputs_length.

  Returns (chunk_length, targets_length) where targets_length is the length
  of the corrupted targets (+EOS) for a full chunk.
  """
  best = None
  for length in range(2, 4 * inputs_length + 2):
    num_noise, num_spans = _num_noise_and_spans(length, noise_density,
                                                mean_noise_span_length)
    if length - num_noise + num_spans + 1 > inputs_length:
      break
    best = (length, num_noise + num_spans + 1)
  if best is None:
    raise ValueError(f'inputs length {inputs_length} is too short for span '
                     'corruption.')
  return best


def split_tokens_for_span_corruption(
    dataset: tf.data.Dataset, sequence_length: dict[str, int],
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tf.data.Dataset:
  """Splits each example's 'targets' tokens into chunks (documents' tails too).

  Chunks shorter than 2 tokens are dropped (nothing to corrupt).
  """
  chunk, _ = chunk_length_for(sequence_length['inputs'], noise_density,
                              mean_noise_span_length)

  def split(ex):
    tokens = ex['targets']
    n = tf.size(tokens)
    num_chunks = (n + chunk - 1) // chunk
    padded = tf.pad(tokens, [[0, num_chunks * chunk - n]])
    rows = tf.reshape(padded, [num_chunks, chunk])
    lengths = tf.minimum(chunk, n - tf.range(num_chunks) * chunk)
    return tf.data.Dataset.from_tensor_slices(
        tf.RaggedTensor.from_tensor(rows, lengths=lengths))

  dataset = dataset.flat_map(split)
  dataset = dataset.filter(lambda t: tf.size(t) >= 2)
  return dataset.map(lambda t: {'targets': t},
                     num_parallel_calls=tf.data.AUTOTUNE)


def _random_partition(total: tf.Tensor, parts: tf.Tensor,
                      seed: tf.Tensor) -> tf.Tensor:
  """`parts` positive integers summing to `total`, uniformly random cut points.

  Chooses parts-1 distinct cut positions among the total-1 gaps.
  """
  gaps = tf.random.experimental.stateless_shuffle(
      tf.range(total - 1), seed=seed)
  cuts = tf.sort(gaps[:parts - 1]) + 1
  bounds = tf.concat([[0], cuts, [total]], axis=0)
  return bounds[1:] - bounds[:-1]


def noise_span_mask(length: tf.Tensor, noise_density: float,
                    mean_noise_span_length: float,
                    seed: tf.Tensor) -> tf.Tensor:
  """Boolean [length] mask: True on noise; starts with a non-noise span.

  num_noise = clip(round(length * density), 1, length - 1) tokens in
  num_spans = max(round(num_noise / mean), 1) spans, alternating
  non-noise / noise spans of random positive lengths.
  """
  length_f = tf.cast(length, tf.float32)
  num_noise = tf.cast(tf.round(length_f * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, length - 1)
  num_spans = tf.maximum(tf.cast(tf.round(
      tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32), 1)
  # Each non-noise span needs >= 1 token too.
  num_spans = tf.minimum(num_spans, length - num_noise)
  seeds = tf.random.experimental.stateless_split(seed, 2)
  noise_lengths = _random_partition(num_noise, num_spans, seeds[0])
  keep_lengths = _random_partition(length - num_noise, num_spans, seeds[1])
  span_lengths = tf.reshape(tf.stack([keep_lengths, noise_lengths], axis=1),
                            [-1])
  span_index = tf.repeat(tf.range(2 * num_spans), span_lengths)
  return tf.equal(span_index % 2, 1)


def corrupt(tokens: tf.Tensor, noise_mask: tf.Tensor,
            vocab_size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(inputs, targets) from tokens [L] and a noise mask [L] (module docstring).

  Span k (0-based, in order) gets sentinel id vocab_size - 1 - k.
  """
  previous = tf.concat([[False], noise_mask[:-1]], axis=0)
  span_start = tf.logical_and(noise_mask, tf.logical_not(previous))
  span_number = tf.cumsum(tf.cast(span_start, tokens.dtype))  # 1-based
  sentinel = tf.cast(vocab_size, tokens.dtype) - span_number
  # Inputs: every kept token, and one sentinel where each noise span starts.
  inputs = tf.boolean_mask(
      tf.where(span_start, sentinel, tokens),
      tf.logical_or(tf.logical_not(noise_mask), span_start))
  # Targets: per noise token, its span's sentinel first if it starts the span.
  pairs = tf.reshape(tf.stack([sentinel, tokens], axis=1), [-1])
  keep = tf.reshape(tf.stack([span_start, noise_mask], axis=1), [-1])
  return inputs, tf.boolean_mask(pairs, keep)


def span_corruption(dataset: tf.data.Dataset,
                    output_features: dict[str, seqio.Feature],
                    noise_density: float = NOISE_DENSITY,
                    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
                    full_targets: bool = False,
                    ) -> tf.data.Dataset:
  """Maps {'targets': tokens} to corrupted {'inputs', 'targets'}.

  full_targets: the targets are the whole uncorrupted chunk instead of the sentinel-marked spans
  (denoising reconstruction, as in MASS / BART): the decoder learns to copy from the encoder and
  to fill in the gaps.
  """
  vocab_size = output_features['targets'].vocabulary.vocab_size

  @seqio.map_over_dataset(num_seeds=1)
  def fn(ex, seed):
    tokens = ex['targets']
    mask = noise_span_mask(tf.size(tokens), noise_density,
                           mean_noise_span_length, seed)
    inputs, targets = corrupt(tokens, mask, vocab_size)
    return {'inputs': inputs, 'targets': tokens if full_targets else targets}

  return fn(dataset)


def preprocessors(noise_density: float = NOISE_DENSITY,
                  mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
                  full_targets: bool = False):
  """The seqio preprocessor list of a span-corruption task over 'targets' text
  (full_targets: denoising reconstruction, see `span_corruption`)."""
  return [
      seqio.preprocessors.tokenize,
      functools.partial(split_tokens_for_span_corruption,
                        noise_density=noise_density,
                        mean_noise_span_length=mean_noise_span_length),
      functools.partial(span_corruption, noise_density=noise_density,
                        mean_noise_span_length=mean_noise_span_length,
                        full_targets=full_targets),
      truncation.append_eos_after_trim,
  ]
