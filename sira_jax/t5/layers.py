"""The T5 network's building blocks: masks, RMS norm, the token embedder, relative position
biases, multi-head attention with the autoregressive cache, and the MLP block, each projection an
`AdaptedDense` (parameter names as in T5X's example network; see `sira_jax.t5.network`)."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sira_jax.adapters import AdaptedDense
from sira_jax.t5.config import T5Config

Array = Any
_BIG_NEG = -1e10

default_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


def _activation(name: str):
  if name == 'relu':
    return nn.relu
  if name in ('gelu', 'gelu_new', 'gelu_tanh'):
    return lambda x: nn.gelu(x, approximate=True)
  if name == 'gelu_exact':
    return lambda x: nn.gelu(x, approximate=False)
  if name in ('silu', 'swish'):
    return nn.silu
  if name == 'linear':
    return lambda x: x
  raise ValueError(f'unknown activation {name!r}')


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
def make_attention_mask(query_input: Array, key_input: Array, pairwise_fn=jnp.multiply,
                        dtype=jnp.float32) -> Array:
  """[batch, lq], [batch, lk] -> [batch, 1, lq, lk] mask (1 = attend)."""
  mask = pairwise_fn(query_input[:, :, None], key_input[:, None, :])
  return mask[:, None].astype(dtype)


def make_decoder_mask(decoder_target_tokens: Array, decoder_segment_ids: Array | None = None,
                      dtype=jnp.float32) -> Array:
  """Causal & non-padding (& same-segment) mask, [batch, 1, len, len]."""
  length = decoder_target_tokens.shape[-1]
  idx = jnp.arange(length)
  causal = (idx[None, :] <= idx[:, None])[None, None]
  valid = decoder_target_tokens > 0
  mask = jnp.logical_and(causal, make_attention_mask(valid, valid, jnp.logical_and, bool))
  if decoder_segment_ids is not None:
    mask = jnp.logical_and(
        mask, make_attention_mask(decoder_segment_ids, decoder_segment_ids, jnp.equal, bool))
  return mask.astype(dtype)


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
  """T5 layer norm: x / rms(x) * scale (no mean, no bias), computed in float32."""
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  freeze: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), self.param_dtype)
    if self.freeze:
      scale = jax.lax.stop_gradient(scale)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding [vocab, d_model]; `attend` gives x @ embedding.T."""
  num_embeddings: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  freeze: bool = True

  def setup(self):
    self.embedding = self.param(
        'embedding',
        nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ('vocab', 'embed')),
        (self.num_embeddings, self.features), self.param_dtype)

  def _table(self):
    return jax.lax.stop_gradient(self.embedding) if self.freeze else self.embedding

  def __call__(self, tokens: Array) -> Array:
    return jnp.take(self._table(), tokens.astype(jnp.int32), axis=0).astype(self.dtype)

  def attend(self, x: Array) -> Array:
    """[..., d_model] -> [..., vocab] in float32."""
    return jnp.dot(x.astype(jnp.float32), self._table().astype(jnp.float32).T)


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """T5's bucketing of (memory - query) offsets; exact below num_buckets/2 (or /4), log above.

  Computed with numpy in float32 arithmetic like the reference implementations, at trace time.
  """
  ret = np.zeros_like(relative_position)
  n = relative_position
  if bidirectional:
    num_buckets //= 2
    ret = ret + (n > 0).astype(np.int64) * num_buckets
    n = np.abs(n)
  else:
    n = -np.minimum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  with np.errstate(divide='ignore'):
    scaled = (np.log(n.astype(np.float32) / np.float32(max_exact))
              / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
  scaled = np.where(is_small, 0, scaled)  # avoid casting -inf
  val_if_large = max_exact + scaled.astype(np.int64)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
  """Per-head learned bias for each relative-position bucket; param 'rel_embedding' [heads, buckets]."""
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  freeze: bool = True

  @nn.compact
  def __call__(self, qlen: int, klen: int, bidirectional: bool = True) -> Array:
    """-> [1, heads, qlen, klen] bias."""
    ctx = np.arange(qlen, dtype=np.int64)[:, None]
    mem = np.arange(klen, dtype=np.int64)[None, :]
    buckets = relative_position_bucket(mem - ctx, bidirectional, self.num_buckets,
                                       self.max_distance)
    table = self.param(
        'rel_embedding',
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform'), ('heads', 'relpos_buckets')),
        (self.num_heads, self.num_buckets), self.param_dtype)
    if self.freeze:
      table = jax.lax.stop_gradient(table)
    values = jnp.take(table, jnp.asarray(buckets, jnp.int32), axis=1)  # [heads, q, k]
    return values[None].astype(self.dtype)


class MultiHeadAttention(nn.Module):
  """T5 attention (no 1/sqrt(d) scaling: it is folded into the query init, as in T5X)."""
  config: T5Config
  site: str  # e.g. 'encoder/attention'
  in_decoder: bool = False

  def _dense(self, features, proj, kernel_axes, kernel_init):
    cfg = self.config
    return AdaptedDense(
        features=features, adapter=cfg.adapter_for(f'{self.site}/{proj}'), kernel_axes=kernel_axes,
        kernel_init=kernel_init, dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype,
        freeze_base=cfg.freeze_base, allow_batch_priority=not self.in_decoder, name=proj)

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Array | None = None,
               bias: Array | None = None, *, q_token_mask: Array | None = None,
               kv_token_mask: Array | None = None, enable_dropout: bool = False,
               decode: bool = False, prefill: bool = False,
               prefill_lengths: Array | None = None) -> Array:
    """[b, lq, d], [b, lk, d], mask [b, 1, lq, lk], bias [1, h, lq, lk] -> [b, lq, d].

    decode: one query token per call against the 'cache' collection. The cache index is a scalar
    (every example at the same position) or, after `prefill`, a vector [b] of per-example positions.
    prefill: the teacher-forced (causal) pass over a whole decoder prompt [b, L] that also writes
    its keys/values into the cache and sets each example's next position to `prefill_lengths` [b]
    (T5X's prompt prefilling).
    """
    cfg = self.config
    h, dk = cfg.num_heads, cfg.d_kv
    inner = h * dk
    depth_scaling = jnp.sqrt(dk).astype(jnp.float32)
    query_init = lambda *a: default_kernel_init(*a) / depth_scaling  # noqa: E731
    kw = dict(enable_dropout=enable_dropout)
    q = self._dense(inner, 'query', ('embed', 'joined_kv'), query_init)(inputs_q, q_token_mask, **kw)
    k = self._dense(inner, 'key', ('embed', 'joined_kv'), default_kernel_init)(
        inputs_kv, kv_token_mask, **kw)
    v = self._dense(inner, 'value', ('embed', 'joined_kv'), default_kernel_init)(
        inputs_kv, kv_token_mask, **kw)
    b = q.shape[0]
    q = q.reshape(b, q.shape[1], h, dk)
    k = k.reshape(b, k.shape[1], h, dk)
    v = v.reshape(b, v.shape[1], h, dk)

    if decode and prefill:
      raise ValueError('decode and prefill are exclusive: prefill is the one teacher-forced pass '
                       'over the prompt, decode the one-token steps after it.')
    if decode or prefill:
      is_initialized = self.has_variable('cache', 'cached_key')
      swap = lambda s: (s[0], s[2], s[3], s[1])  # noqa: E731  [b, l, h, d] -> [b, h, d, l]
      cached_key = self.variable('cache', 'cached_key', jnp.zeros, swap(k.shape), k.dtype)
      cached_value = self.variable('cache', 'cached_value', jnp.zeros, swap(v.shape), v.dtype)
      cache_index = self.variable('cache', 'cache_index', lambda: jnp.array(0, dtype=jnp.int32))
      if prefill:
        if prefill_lengths is None:
          raise ValueError('prefill needs prefill_lengths [batch]: each prompt\'s length.')
        if cached_key.value.shape != swap(k.shape):
          raise ValueError(f'Prefill cache shape error: the cache holds {cached_key.value.shape}, '
                           f'the prompt gives {swap(k.shape)}; prefill with the full '
                           f'max_decode_length prompt.')
        cached_key.value = jnp.transpose(k, (0, 2, 3, 1))
        cached_value.value = jnp.transpose(v, (0, 2, 3, 1))
        cache_index.value = jnp.asarray(prefill_lengths, jnp.int32).reshape(b)
        # Attention below is the ordinary causal pass over the prompt.
      elif is_initialized:
        cb, ch, cd, length = cached_key.value.shape
        if q.shape != (cb, 1, ch, cd):
          raise ValueError(f'Autoregressive cache shape error: expected query shape '
                           f'{(cb, 1, ch, cd)}, got {q.shape}.')
        cur = cache_index.value
        k_new = jnp.transpose(k, (0, 2, 3, 1))  # [b, h, d, 1]
        v_new = jnp.transpose(v, (0, 2, 3, 1))
        if cur.ndim == 0:  # every example at one position
          cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k_new,
                                                          (0, 0, 0, cur))
          cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v_new,
                                                            (0, 0, 0, cur))
          # Attend only to filled positions 0..cur; take row `cur` of the [L, L] bias.
          mask = (jnp.arange(length) <= cur)[None, None, None, :].astype(jnp.float32)
          if bias is not None:
            bias = jax.lax.dynamic_slice_in_dim(bias, cur, 1, axis=2)
        else:  # per-example positions (after prefill): one-hot writes, per-example rows.
          # T5X's beam search keeps the index [batch, beams] while the cache rows are flattened
          # to [batch * beams]: the index's own shape is kept, its flat view is used.
          index_shape, cur = cur.shape, cur.reshape(cb)
          at = jax.nn.one_hot(cur, length, dtype=k_new.dtype)[:, None, None, :]  # [b, 1, 1, L]
          cached_key.value = cached_key.value * (1 - at) + k_new * at
          cached_value.value = cached_value.value * (1 - at) + v_new * at
          mask = (jnp.arange(length)[None, :] <= cur[:, None])[:, None, None, :].astype(
              jnp.float32)
          if bias is not None:  # [1, h, L, L] -> row cur_b of each example: [b, h, 1, L]
            row = jnp.take(bias[0], cur, axis=1, mode='clip')  # past the end: T5X's busy work
            bias = jnp.transpose(row, (1, 0, 2))[:, :, None, :]
          cur = cur.reshape(index_shape)
        cache_index.value = cur + 1
        k = jnp.transpose(cached_key.value, (0, 3, 1, 2))
        v = jnp.transpose(cached_value.value, (0, 3, 1, 2))

    logits_dtype = jnp.float32 if cfg.float32_attention_logits else cfg.activation_dtype
    logits = jnp.einsum('bqhd,bkhd->bhqk', q.astype(logits_dtype), k.astype(logits_dtype))
    if bias is not None:
      logits = logits + bias.astype(logits_dtype)
    if mask is not None:
      logits = jnp.where(mask > 0, logits, jnp.asarray(_BIG_NEG, logits_dtype))
    weights = jax.nn.softmax(logits, axis=-1).astype(cfg.activation_dtype)
    weights = nn.Dropout(rate=cfg.dropout_rate)(weights, deterministic=not enable_dropout)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v.astype(cfg.activation_dtype))
    out = out.reshape(b, out.shape[1], inner)
    return self._dense(cfg.d_model, 'out', ('joined_kv', 'embed'), default_kernel_init)(
        out, q_token_mask, **kw)


class MlpBlock(nn.Module):
  """FFN: prod_i act_i(x @ wi_i) -> dropout -> @ wo (gated when several activations)."""
  config: T5Config
  site: str  # 'encoder/mlp' | 'decoder/mlp'
  in_decoder: bool = False

  @nn.compact
  def __call__(self, x: Array, token_mask: Array | None = None, *,
               enable_dropout: bool = False) -> Array:
    cfg = self.config
    acts = cfg.mlp_activations
    common = dict(dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype,
                  freeze_base=cfg.freeze_base, allow_batch_priority=not self.in_decoder,
                  kernel_init=default_kernel_init)
    h = None
    for i, act in enumerate(acts):
      name = 'wi' if len(acts) == 1 else f'wi_{i}'
      y = AdaptedDense(features=cfg.d_ff, adapter=cfg.adapter_for(f'{self.site}/wi'),
                       kernel_axes=('embed', 'mlp'), name=name, **common)(
                           x, token_mask, enable_dropout=enable_dropout)
      y = _activation(act)(y)
      h = y if h is None else h * y
    h = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(
        h, deterministic=not enable_dropout)
    return AdaptedDense(features=cfg.d_model, adapter=cfg.adapter_for(f'{self.site}/wo'),
                        kernel_axes=('mlp', 'embed'), name='wo', **common)(
                            h, token_mask, enable_dropout=enable_dropout)
