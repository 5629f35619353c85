"""T5 encoder-decoder in Flax with an `AdaptedDense` at every projection.

Parameter names and nesting follow T5X's example network (`t5x/examples/t5/network.py`), so T5X
checkpoints map one to one:

  token_embedder/embedding                                   [vocab, d_model]
  encoder/relpos_bias/rel_embedding                          [heads, buckets]
  encoder/layers_N/pre_attention_layer_norm/scale            [d_model]
  encoder/layers_N/attention/{query,key,value}/kernel        [d_model, heads*d_kv]
  encoder/layers_N/attention/out/kernel                      [heads*d_kv, d_model]
  encoder/layers_N/pre_mlp_layer_norm/scale
  encoder/layers_N/mlp/{wi | wi_0,wi_1}/kernel               [d_model, d_ff]
  encoder/layers_N/mlp/wo/kernel                             [d_ff, d_model]
  encoder/encoder_norm/scale
  decoder/relpos_bias/rel_embedding
  decoder/layers_N/{pre_self_attention_layer_norm, self_attention,
                    pre_cross_attention_layer_norm, encoder_decoder_attention,
                    pre_mlp_layer_norm, mlp}/...
  decoder/decoder_norm/scale
  decoder/logits_dense/kernel                                [d_model, vocab] (untied only)

Adapter params (lora_a, lora_b, router_kernel, ...) sit next to the `kernel` they adapt. All params
carry logical axis names (`nn.with_logical_partitioning`): vocab, embed, mlp, heads, kv, joined_kv,
relpos_buckets (+ expert, rank on adapters), so `nn.get_partition_spec` and the rules in
`sira_jax.partitioning` place them on a mesh.

The module honours T5X's `EncoderDecoderModel` contract: `__call__`, `encode`, `decode`, with the
autoregressive cache in the 'cache' collection (`cached_key`, `cached_value` stored as
[batch, heads, d_kv, length] like T5X, and `cache_index`). Like T5X's example network, positions are
accepted and ignored (relative position biases use the index within the sequence).

Cached decoding reproduces the full teacher-forced pass exactly whenever routing is per token
(LoRA, MoLoRA, AdaMix, and SiRA without binding eval capacity); with a binding capacity the
routing groups of a one-token step differ from a full pass, as in any capacity-limited MoE.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sira_jax.adapters import AdaptedDense
from sira_jax.routers import SCHEDULE_COLLECTION
from sira_jax.t5.config import REMAT_POLICIES, T5Config
from sira_jax.t5.scan_layout import LAYERS_AXIS, SCANNED_LAYERS

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


def _norm(cfg: T5Config, name: str) -> RMSNorm:
  return RMSNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.activation_dtype,
                 param_dtype=cfg.weight_dtype, freeze=cfg.freeze_base, name=name)


def _dropout(cfg: T5Config, x: Array, enable_dropout: bool) -> Array:
  return nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(
      x, deterministic=not enable_dropout)


class EncoderLayer(nn.Module):
  """Self-attention + FFN block. Positional arguments only (the scanned stack passes them so);
  returns the new residual stream, or (it, None) in a scanned stack (`nn.scan`'s carry, output)."""
  config: T5Config

  @nn.compact
  def __call__(self, inputs, bias, encoder_mask, token_mask, enable_dropout=False):
    cfg = self.config
    x = _norm(cfg, 'pre_attention_layer_norm')(inputs)
    x = MultiHeadAttention(cfg, 'encoder/attention', name='attention')(
        x, x, encoder_mask, bias, q_token_mask=token_mask, kv_token_mask=token_mask,
        enable_dropout=enable_dropout)
    x = _dropout(cfg, x, enable_dropout) + inputs
    y = _norm(cfg, 'pre_mlp_layer_norm')(x)
    y = MlpBlock(cfg, 'encoder/mlp', name='mlp')(y, token_mask, enable_dropout=enable_dropout)
    y = _dropout(cfg, y, enable_dropout) + x
    return (y, None) if cfg.scan_layers else y


class DecoderLayer(nn.Module):
  """Self-attention + cross-attention + FFN block; positional arguments, returns as EncoderLayer."""
  config: T5Config

  @nn.compact
  def __call__(self, inputs, encoded, bias, decoder_mask, encoder_decoder_mask, token_mask,
               encoder_token_mask, enable_dropout=False, decode=False, prefill=False,
               prefill_lengths=None):
    cfg = self.config
    x = _norm(cfg, 'pre_self_attention_layer_norm')(inputs)
    x = MultiHeadAttention(cfg, 'decoder/self_attention', in_decoder=True, name='self_attention')(
        x, x, decoder_mask, bias, q_token_mask=token_mask, kv_token_mask=token_mask,
        enable_dropout=enable_dropout, decode=decode, prefill=prefill,
        prefill_lengths=prefill_lengths)
    x = _dropout(cfg, x, enable_dropout) + inputs
    y = _norm(cfg, 'pre_cross_attention_layer_norm')(x)
    y = MultiHeadAttention(cfg, 'decoder/encoder_decoder_attention', in_decoder=True,
                           name='encoder_decoder_attention')(
        y, encoded, encoder_decoder_mask, None, q_token_mask=token_mask,
        kv_token_mask=encoder_token_mask, enable_dropout=enable_dropout)
    y = _dropout(cfg, y, enable_dropout) + x
    z = _norm(cfg, 'pre_mlp_layer_norm')(y)
    z = MlpBlock(cfg, 'decoder/mlp', in_decoder=True, name='mlp')(
        z, token_mask, enable_dropout=enable_dropout)
    z = _dropout(cfg, z, enable_dropout) + y
    return (z, None) if cfg.scan_layers else z


# Positions (counting `self` as 0) of each layer's Python-valued arguments: static under remat.
_STATIC_ARGNUMS = {EncoderLayer: (5,), DecoderLayer: (8, 9, 10)}
# The collections a scanned layer keeps one slice of per layer, stacked on axis 0: its params
# (logical axis 'layers', `nn.scan`'s partition metadata), the autoregressive cache, the sown
# routing statistics and SMoE-Dropout's schedule.
_SCANNED_COLLECTIONS = ('params', 'cache', 'intermediates', SCHEDULE_COLLECTION)


def remat_policy(name: str):
  """`T5Config.remat_policy` -> (rematerialise?, `jax.checkpoint` policy).

  'none': keep every activation; 'minimal': save the matmuls without batch dimensions (the
  weights' products; T5X's 'minimal'), recompute the rest; 'full': save only each layer's input.
  """
  if name == 'none':
    return False, None
  if name == 'minimal':
    return True, jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  if name == 'full':
    return True, None
  raise ValueError(f'unknown remat_policy {name!r}; expected one of {REMAT_POLICIES}')


def layer_stack(cfg: T5Config, layer: type[nn.Module], num_layers: int, num_args: int):
  """The module factory of one stack: `layer`, rematerialised per `cfg.remat_policy`, and, with
  `cfg.scan_layers`, scanned over `num_layers` (`num_args` positional arguments after the
  carried residual stream, each the same for every layer).

  Scanned, the stack is one module named 'layers' whose variables carry a leading layer axis;
  otherwise the caller names each layer 'layers_<i>'. Rematerialisation keeps what the policy
  saves and recomputes the rest in the backward pass; within a scan CSE cannot merge the
  recomputation, so it is not prevented there (T5X's choice).
  """
  remat, policy = remat_policy(cfg.remat_policy)
  if remat:
    layer = nn.remat(layer, policy=policy, prevent_cse=not cfg.scan_layers,
                     static_argnums=_STATIC_ARGNUMS[layer])
  if not cfg.scan_layers:
    return layer
  return nn.scan(layer, variable_axes={c: 0 for c in _SCANNED_COLLECTIONS},
                 split_rngs={'params': True, 'dropout': True},
                 in_axes=(nn.broadcast,) * num_args, length=num_layers,
                 metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})


def _relpos(cfg: T5Config) -> RelativePositionBiases:
  return RelativePositionBiases(
      num_buckets=cfg.relative_attention_num_buckets,
      max_distance=cfg.relative_attention_max_distance, num_heads=cfg.num_heads,
      dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype, freeze=cfg.freeze_base,
      name='relpos_bias')


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_mask, enable_dropout=False):
    cfg = self.config
    length = encoder_input_tokens.shape[-1]
    bias = _relpos(cfg)(length, length, True)  # shared by every layer, as in T5
    token_mask = encoder_input_tokens > 0
    x = self.shared_embedding(encoder_input_tokens)
    x = _dropout(cfg, x, enable_dropout).astype(cfg.activation_dtype)
    args = (bias, encoder_mask, token_mask, enable_dropout)
    stack = layer_stack(cfg, EncoderLayer, cfg.num_encoder_layers, len(args))
    if cfg.scan_layers:
      x, _ = stack(cfg, name=SCANNED_LAYERS)(x, *args)
    else:
      for i in range(cfg.num_encoder_layers):
        x = stack(cfg, name=f'layers_{i}')(x, *args)
    x = _norm(cfg, 'encoder_norm')(x)
    return _dropout(cfg, x, enable_dropout)


class Decoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded, decoder_input_tokens, decoder_mask, encoder_decoder_mask,
               token_mask, encoder_token_mask, enable_dropout=False, decode=False,
               max_decode_length=None, prefill=False, prefill_lengths=None):
    cfg = self.config
    # The whole [L, L] bias (a decode step takes its row), shared by every layer.
    length = max_decode_length if decode and max_decode_length else decoder_input_tokens.shape[-1]
    bias = _relpos(cfg)(length, length, False)
    y = self.shared_embedding(decoder_input_tokens)
    y = _dropout(cfg, y, enable_dropout).astype(cfg.activation_dtype)
    args = (encoded, bias, decoder_mask, encoder_decoder_mask, token_mask, encoder_token_mask,
            enable_dropout, decode, prefill, prefill_lengths)
    stack = layer_stack(cfg, DecoderLayer, cfg.num_decoder_layers, len(args))
    if cfg.scan_layers:
      y, _ = stack(cfg, name=SCANNED_LAYERS)(y, *args)
    else:
      for i in range(cfg.num_decoder_layers):
        y = stack(cfg, name=f'layers_{i}')(y, *args)
    y = _norm(cfg, 'decoder_norm')(y)
    y = _dropout(cfg, y, enable_dropout)
    if cfg.logits_scaled:
      y = y.astype(jnp.float32) / jnp.sqrt(jnp.float32(y.shape[-1]))
    if cfg.tie_word_embeddings:
      return self.shared_embedding.attend(y)
    return AdaptedDense(features=cfg.vocab_size, kernel_axes=('embed', 'vocab'),
                        kernel_init=default_kernel_init, dtype=jnp.float32,
                        param_dtype=cfg.weight_dtype, freeze_base=cfg.freeze_base,
                        allow_batch_priority=False, name='logits_dense')(y)


class Transformer(nn.Module):
  """T5 encoder-decoder; logits [batch, target_len, vocab] in float32."""
  config: T5Config

  @property
  def scan_layers(self) -> bool:
    """Whether the layer stacks are scanned (T5X's decoders read it: the cache's batch axis is
    then axis 1, after the layer axis)."""
    return self.config.scan_layers

  def setup(self):
    cfg = self.config
    self.shared_embedding = Embed(num_embeddings=cfg.vocab_size, features=cfg.d_model,
                                  dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype,
                                  freeze=cfg.freeze_base, name='token_embedder')
    self.encoder = Encoder(cfg, self.shared_embedding)
    self.decoder = Decoder(cfg, self.shared_embedding)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None, enable_dropout=True):
    """[batch, len] int tokens (0 = padding) -> [batch, len, d_model]."""
    valid = encoder_input_tokens > 0
    mask = make_attention_mask(valid, valid, jnp.logical_and, bool)
    if encoder_segment_ids is not None:
      mask = jnp.logical_and(mask, make_attention_mask(encoder_segment_ids, encoder_segment_ids,
                                                       jnp.equal, bool))
    return self.encoder(encoder_input_tokens, mask.astype(jnp.float32),
                        enable_dropout=enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
             encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None,
             enable_dropout=True, decode=False, max_decode_length=None, prefill=False,
             prefill_lengths=None):
    """Decoder branch -> logits [batch, len, vocab].

    With `decode=True` the 'cache' collection must be mutable; the first call (cache absent)
    creates a zero cache for length `max_decode_length` (or the input length), later calls take
    one token [batch, 1] each. Token masks for adapter routing: targets > 0 in training; every
    token counts during decoding (the BOS id is 0).
    With `prefill=True` (T5X's prompt prefilling; 'cache' mutable and already created for the
    prompt's length): one causal pass over the decoder prompt [batch, L] writes the cache, and
    each example continues from its own position `prefill_lengths` [batch] in later `decode`
    calls. T5X passes `decoder_target_tokens` of ones here, so every prompt position is routed.
    """
    del decoder_positions  # relative positions use the index in the sequence, as in T5X.
    encoder_valid = encoder_input_tokens > 0
    if decode:
      if encoder_segment_ids is not None:
        raise ValueError('packing (encoder_segment_ids) is not supported while decoding')
      decoder_mask = None
      token_mask = jnp.ones(decoder_input_tokens.shape, bool)
      enc_dec_mask = make_attention_mask(token_mask, encoder_valid, jnp.logical_and, bool)
    else:
      decoder_mask = make_decoder_mask(decoder_target_tokens, decoder_segment_ids)
      token_mask = decoder_target_tokens > 0
      enc_dec_mask = make_attention_mask(token_mask, encoder_valid, jnp.logical_and, bool)
      if encoder_segment_ids is not None:
        enc_dec_mask = jnp.logical_and(
            enc_dec_mask,
            make_attention_mask(decoder_segment_ids, encoder_segment_ids, jnp.equal, bool))
    return self.decoder(encoded, decoder_input_tokens, decoder_mask,
                        enc_dec_mask.astype(jnp.float32), token_mask, encoder_valid,
                        enable_dropout=enable_dropout, decode=decode,
                        max_decode_length=max_decode_length, prefill=prefill,
                        prefill_lengths=prefill_lengths)

  def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, *, enable_dropout: bool = True, decode: bool = False):
    """Teacher-forced logits [batch, target_len, vocab]; `decoder_input_tokens` = shifted targets."""
    del encoder_positions
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids=encoder_segment_ids,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids=encoder_segment_ids,
                       decoder_segment_ids=decoder_segment_ids,
                       decoder_positions=decoder_positions, enable_dropout=enable_dropout,
                       decode=decode)
