"""One check shared by the network tests: T5X-style prompt prefill, then one-token cached steps,
against a full teacher-forced pass."""
import jax
import jax.numpy as jnp
import numpy as np

from sira_jax.t5 import decoding


def check_prefill_then_cached_steps(model, variables, enc, dec_in, lengths):
  """Prefills the decoder cache with `dec_in` [b, L] up to `lengths` [b], then steps each example
  on from its own length to L one token at a time. Asserts that the prefill logits and every
  step's logits equal the full pass's (every position, atol/rtol 1e-5). Returns
  (the cache right after the prefill, full logits [b, L, vocab])."""
  ones = jnp.ones_like(dec_in)
  full = model.apply(variables, enc, dec_in, ones, enable_dropout=False)
  length = dec_in.shape[1]
  encoded = decoding.encode(model, variables, enc)
  cache = decoding.init_cache(model, variables, encoded, enc, length)
  prefill_logits, mut = model.apply(
      {**variables, 'cache': cache}, encoded, enc, dec_in, ones, enable_dropout=False,
      prefill=True, prefill_lengths=lengths, mutable=['cache'], method=model.decode)
  np.testing.assert_allclose(prefill_logits, full, rtol=1e-5, atol=1e-5)
  prefilled = cache = mut['cache']
  step = jax.jit(lambda c, t: decoding.decode_step(model, variables, c, encoded, enc, t, length))
  rows = np.arange(dec_in.shape[0])
  cur = np.asarray(lengths)
  for _ in range(length - int(cur.min())):
    logits, cache = step(cache, dec_in[rows, np.minimum(cur, length - 1)][:, None])
    for b in rows:
      if cur[b] < length:
        np.testing.assert_allclose(logits[b], full[b, cur[b]], rtol=1e-5, atol=1e-5)
    cur = cur + 1
  return prefilled, full
