"""T5 encoder-decoder in Flax with an `AdaptedDense` at every projection.

Building blocks (attention, MLP, norms, embedder): `sira_jax.t5.layers`. Parameter names and
nesting follow T5X's example network (`t5x/examples/t5/network.py`), so T5X
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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sira_jax.adapters import AdaptedDense
from sira_jax.routers import SCHEDULE_COLLECTION
from sira_jax.t5.config import REMAT_POLICIES, T5Config
from sira_jax.t5.layers import (Embed, MlpBlock, MultiHeadAttention, RMSNorm, RelativePositionBiases,
                               default_kernel_init, make_attention_mask, make_decoder_mask)
from sira_jax.t5.scan_layout import LAYERS_AXIS, SCANNED_LAYERS

Array = Any


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


def apply_stack(cfg: T5Config, layer: type[nn.Module], num_layers: int, x: Array,
                args: tuple) -> Array:
  """Runs `num_layers` of `layer` on the residual stream `x` ([batch, length, d_model]) with the
  same `args` for every layer: one scanned module 'layers', or modules 'layers_<i>' in turn.
  Called inside a compact module, whose scope the layers join."""
  stack = layer_stack(cfg, layer, num_layers, len(args))
  if cfg.scan_layers:
    return stack(cfg, name=SCANNED_LAYERS)(x, *args)[0]
  for i in range(num_layers):
    x = stack(cfg, name=f'layers_{i}')(x, *args)
  return x


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
    x = apply_stack(cfg, EncoderLayer, cfg.num_encoder_layers, x, args)
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
    y = apply_stack(cfg, DecoderLayer, cfg.num_decoder_layers, y, args)
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
