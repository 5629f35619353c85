"""Autoregressive decoding over the 'cache' collection: greedy, temperature sampling, beam search.

All outputs are fixed-length: [batch, max_decode_length] int32 (beam: [batch, beams, length]),
with 0 (padding) after the first EOS. The decoder starts from token 0 (T5's BOS = pad).

    tokens = predict_batch(model, variables, {'encoder_input_tokens': x}, max_decode_length=32)
    tokens, scores = predict_batch(..., method='beam', num_beams=4, return_scores=True)

`variables` is {'params': ..., maybe 'schedule': ...}; `model` a `Transformer`. Functions are
jitted per (model, settings); `init_cache` / `decode_step` expose one step for custom loops.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

Array = Any
NEG_INF = -1.0e9


def _inference_vars(variables: Mapping[str, Any]) -> dict:
  return {k: v for k, v in variables.items() if k not in ('cache', 'intermediates')}


def encode(model, variables, encoder_input_tokens):
  """[batch, len] -> encoded [batch, len, d_model] (no dropout)."""
  return model.apply(_inference_vars(variables), encoder_input_tokens, enable_dropout=False,
                     method=model.encode)


def cache_batch_axis(model) -> int:
  """The batch axis of the cache's arrays: 0, or 1 after the layer axis of a scanned stack."""
  return 1 if model.config.scan_layers else 0


def init_cache(model, variables, encoded, encoder_input_tokens, max_decode_length: int):
  """A zero cache for `max_decode_length` steps (shapes via eval_shape; no decoder pass runs)."""
  dummy = jnp.ones((encoded.shape[0], max_decode_length), jnp.int32)

  def fn(enc, toks):
    _, mut = model.apply(_inference_vars(variables), enc, toks, dummy, dummy,
                         enable_dropout=False, decode=True, max_decode_length=max_decode_length,
                         mutable=['cache'], method=model.decode)
    return mut['cache']
  shapes = jax.eval_shape(fn, encoded, encoder_input_tokens)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decode_step(model, variables, cache, encoded, encoder_input_tokens, tokens,
                max_decode_length: int):
  """One cached step: tokens [batch, 1] -> (logits [batch, vocab] float32, new cache)."""
  logits, mut = model.apply({**_inference_vars(variables), 'cache': cache}, encoded,
                            encoder_input_tokens, tokens, tokens, enable_dropout=False,
                            decode=True, max_decode_length=max_decode_length,
                            mutable=['cache'], method=model.decode)
  return logits[:, 0].astype(jnp.float32), mut['cache']


# ----------------------------------------------------------------------------------------------
# Greedy / temperature sampling
# ----------------------------------------------------------------------------------------------
def sample_decode(model, variables, encoder_input_tokens, rng=None, *, max_decode_length: int,
                  eos_id: int = 1, temperature: float = 0.0, top_k: int = 0):
  """Greedy (temperature 0) or sampled decoding (temperature > 0, optionally top-k).

  Returns (tokens [batch, L] int32, log-probs [batch] float32 of the emitted tokens up to and
  including EOS, under the unscaled model distribution).
  """
  if rng is None:
    rng = jax.random.PRNGKey(0)
  return _sample_decode(model, variables, encoder_input_tokens, rng,
                        jnp.asarray(temperature if temperature > 0 else 1.0, jnp.float32),
                        max_decode_length=max_decode_length, eos_id=eos_id,
                        greedy=temperature == 0.0, top_k=int(top_k))


@functools.partial(jax.jit, static_argnames=('model', 'max_decode_length', 'eos_id', 'greedy',
                                             'top_k'))
def _sample_decode(model, variables, encoder_input_tokens, rng, temperature, *,
                   max_decode_length, eos_id, greedy, top_k):
  b, length = encoder_input_tokens.shape[0], max_decode_length
  encoded = encode(model, variables, encoder_input_tokens)
  cache = init_cache(model, variables, encoded, encoder_input_tokens, length)

  def cond(s):
    i, _, _, done, _, _, _ = s
    return jnp.logical_and(i < length, jnp.logical_not(jnp.all(done)))

  def body(s):
    i, cur, out, done, logp, cache, rng = s
    logits, cache = decode_step(model, variables, cache, encoded, encoder_input_tokens,
                                cur[:, None], length)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if greedy:
      nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      rng, sub = jax.random.split(rng)
      scaled = logits / temperature
      if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, NEG_INF, scaled)
      nxt = jax.random.categorical(sub, scaled, axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, 0, nxt)
    step_lp = jnp.take_along_axis(log_probs, nxt[:, None], axis=-1)[:, 0]
    logp = logp + jnp.where(done, 0.0, step_lp)
    out = out.at[:, i].set(nxt)
    done = jnp.logical_or(done, nxt == eos_id)
    return i + 1, nxt, out, done, logp, cache, rng

  init = (jnp.int32(0), jnp.zeros((b,), jnp.int32), jnp.zeros((b, length), jnp.int32),
          jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32), cache, rng)
  _, _, out, _, logp, _, _ = jax.lax.while_loop(cond, body, init)
  return out, logp


# ----------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------
def brevity_penalty(alpha: float, length) -> Array:
  """((5 + length) / 6) ** alpha (GNMT / T5X length normalisation)."""
  return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


def _gather_beams(x, idx):
  """x [b, k, ...], idx [b, n] -> [b, n, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=('model', 'max_decode_length', 'num_beams', 'alpha',
                                             'eos_id'))
def beam_search(model, variables, encoder_input_tokens, *, max_decode_length: int,
                num_beams: int = 4, alpha: float = 0.6, eos_id: int = 1):
  """Beam search with length penalty `brevity_penalty(alpha, len)`.

  A hypothesis finishes when it emits EOS; those still alive at `max_decode_length` are scored
  as finished at that length. Returns (tokens [batch, beams, L] best first, scores [batch, beams]:
  sum of log-probs / brevity penalty).
  """
  b, k, length = encoder_input_tokens.shape[0], num_beams, max_decode_length
  encoded = encode(model, variables, encoder_input_tokens)
  enc_tok_flat = jnp.repeat(encoder_input_tokens, k, axis=0)
  encoded_flat = jnp.repeat(encoded, k, axis=0)
  cache = init_cache(model, variables, encoded_flat, enc_tok_flat, length)
  ax = cache_batch_axis(model)

  def step(s):
    i, live_tok, live_seq, live_lp, fin_seq, fin_sc, cache = s
    logits, cache = decode_step(model, variables, cache, encoded_flat, enc_tok_flat,
                                live_tok.reshape(b * k, 1), length)
    vocab = logits.shape[-1]
    cand = live_lp[:, :, None] + jax.nn.log_softmax(logits, -1).reshape(b, k, vocab)
    top_sc, top_idx = jax.lax.top_k(cand.reshape(b, k * vocab), 2 * k)
    origin, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    seqs = _gather_beams(live_seq, origin)
    seqs = seqs.at[:, :, i].set(tok)
    is_eos = tok == eos_id
    # New live beams: the best k candidates that did not end.
    live_sc, pos = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_sc), k)
    new_origin = jnp.take_along_axis(origin, pos, 1)
    live_seq = _gather_beams(seqs, pos)
    live_tok = jnp.take_along_axis(tok, pos, 1)
    flat = (jnp.arange(b)[:, None] * k + new_origin).reshape(-1)
    cache = jax.tree.map(lambda c: jnp.take(c, flat, axis=ax) if c.ndim > ax else c, cache)
    # Finished: merge the candidates that ended with the previous finished set.
    ended = jnp.where(is_eos, top_sc / brevity_penalty(alpha, i + 1), NEG_INF)
    all_sc = jnp.concatenate([fin_sc, ended], 1)
    all_seq = jnp.concatenate([fin_seq, seqs], 1)
    fin_sc, fpos = jax.lax.top_k(all_sc, k)
    fin_seq = _gather_beams(all_seq, fpos)
    return i + 1, live_tok, live_seq, live_sc, fin_seq, fin_sc, cache

  def cond(s):
    i, _, _, live_lp, _, fin_sc, _ = s
    # Live scores only fall and the penalty is largest at L, so this bounds any live beam.
    best_live = live_lp[:, 0] / brevity_penalty(alpha, length)
    can_improve = jnp.any(best_live > fin_sc[:, -1])
    return jnp.logical_and(i < length, can_improve)

  live_lp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
  init = (jnp.int32(0), jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k, length), jnp.int32),
          live_lp, jnp.zeros((b, k, length), jnp.int32), jnp.full((b, k), NEG_INF, jnp.float32),
          cache)
  i, _, live_seq, live_lp, fin_seq, fin_sc, _ = jax.lax.while_loop(cond, step, init)
  # Beams alive at the end (only when the loop ran to L) count as finished at length L.
  live_final = jnp.where(i >= length, live_lp / brevity_penalty(alpha, length), NEG_INF)
  all_sc = jnp.concatenate([fin_sc, live_final], 1)
  all_seq = jnp.concatenate([fin_seq, live_seq], 1)
  sc, pos = jax.lax.top_k(all_sc, k)
  return _gather_beams(all_seq, pos), sc


# ----------------------------------------------------------------------------------------------
# Entry point for eval / infer
# ----------------------------------------------------------------------------------------------
def predict_batch(model, variables, batch: Mapping[str, Array], *, max_decode_length: int | None = None,
                  method: str = 'greedy', num_beams: int = 4, alpha: float = 0.6,
                  temperature: float = 1.0, top_k: int = 0, rng=None, eos_id: int = 1,
                  return_scores: bool = False):
  """Decodes `batch['encoder_input_tokens']` -> tokens [batch, L] (the best beam for 'beam').

  Args:
    max_decode_length: L; default `batch['decoder_target_tokens'].shape[1]` (or
      decoder_input_tokens'), as T5X infers it from the feature lengths.
    method: 'greedy' | 'sample' | 'beam'.
    return_scores: also return per-example scores (log-prob; beam: length-normalised).
  """
  enc = jnp.asarray(batch['encoder_input_tokens'], jnp.int32)
  if max_decode_length is None:
    for key in ('decoder_target_tokens', 'decoder_input_tokens'):
      if key in batch:
        max_decode_length = int(batch[key].shape[1])
        break
    else:
      raise ValueError('max_decode_length not given and batch has no decoder tokens')
  if method == 'greedy':
    tokens, scores = sample_decode(model, variables, enc, max_decode_length=max_decode_length,
                                   eos_id=eos_id, temperature=0.0)
  elif method == 'sample':
    if temperature <= 0:
      raise ValueError(f'temperature must be > 0 for sampling, got {temperature}')
    tokens, scores = sample_decode(model, variables, enc, rng,
                                   max_decode_length=max_decode_length, eos_id=eos_id,
                                   temperature=float(temperature), top_k=int(top_k))
  elif method == 'beam':
    beams, beam_scores = beam_search(model, variables, enc, max_decode_length=max_decode_length,
                                     num_beams=num_beams, alpha=float(alpha), eos_id=eos_id)
    tokens, scores = beams[:, 0], beam_scores[:, 0]
  else:
    raise ValueError(f"unknown decoding method {method!r}; use 'greedy', 'sample' or 'beam'")
  return (tokens, scores) if return_scores else tokens
