"""T5 network: T5X names and axes, parity with transformers' PyTorch T5, cache, decoding."""
import itertools
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sira_jax import model_init
from sira_jax.adapters import AdapterConfig
from sira_jax.t5 import decoding
from sira_jax.t5.config import ALL_SITES, T5Config, small_test_config
from sira_jax.t5.network import Transformer

from decoding_checks import check_prefill_then_cached_steps


# A few SiRA sites on each side (+ LoRA on every attention output) keep compiles short.
SIRA_SITES = ('encoder/attention/query', 'encoder/mlp/wi', 'decoder/self_attention/value',
              'decoder/encoder_decoder_attention/key', 'decoder/mlp/wo')
LORA_OVERRIDE = (('*/out', AdapterConfig(kind='lora', rank=2)),)


def _flat_names(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in p)
          for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _init(model, seed=0):
  return nn.unbox(model_init.init_fn(model)(jax.random.PRNGKey(seed)))  # eager: no compile


def _rbg(seed):
  """An RBG PRNG key: same semantics here, XLA compiles its dropout far faster than threefry."""
  return jax.random.key(seed, impl='rbg')


def _perturb_lora_b(variables, scale=0.3):
  """Random (nonzero) lora_b so adapters change outputs (they init at zero)."""
  def f(path, x):
    if 'lora_b' in jax.tree_util.keystr(path):
      seed = zlib.crc32(jax.tree_util.keystr(path).encode())  # str hash() varies per process
      return x + scale * jax.random.normal(jax.random.PRNGKey(seed), x.shape, x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(f, variables)


# ----------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------
def test_param_names_follow_t5x_and_carry_logical_axes():
  cfg = small_test_config(num_encoder_layers=1, num_decoder_layers=1,
                          adapter=AdapterConfig(kind='sira', num_experts=4, top_k=2),
                          adapter_targets=('encoder/attention/query', 'decoder/mlp/*'))
  boxed = jax.eval_shape(model_init.init_fn(Transformer(cfg)), jax.random.PRNGKey(0))
  names = _flat_names(nn.unbox(boxed)['params'])
  expected = {
      'token_embedder/embedding', 'encoder/relpos_bias/rel_embedding',
      'encoder/layers_0/pre_attention_layer_norm/scale', 'encoder/layers_0/pre_mlp_layer_norm/scale',
      'encoder/layers_0/attention/query/kernel', 'encoder/layers_0/attention/key/kernel',
      'encoder/layers_0/attention/value/kernel', 'encoder/layers_0/attention/out/kernel',
      'encoder/layers_0/mlp/wi_0/kernel', 'encoder/layers_0/mlp/wi_1/kernel',
      'encoder/layers_0/mlp/wo/kernel', 'encoder/encoder_norm/scale',
      'decoder/relpos_bias/rel_embedding', 'decoder/layers_0/pre_self_attention_layer_norm/scale',
      'decoder/layers_0/self_attention/query/kernel', 'decoder/layers_0/self_attention/out/kernel',
      'decoder/layers_0/pre_cross_attention_layer_norm/scale',
      'decoder/layers_0/encoder_decoder_attention/key/kernel',
      'decoder/layers_0/pre_mlp_layer_norm/scale', 'decoder/layers_0/mlp/wo/kernel',
      'decoder/decoder_norm/scale', 'decoder/logits_dense/kernel',
      # adapters only where targeted
      'encoder/layers_0/attention/query/lora_a', 'encoder/layers_0/attention/query/router_kernel',
      'decoder/layers_0/mlp/wi_0/lora_b', 'decoder/layers_0/mlp/wo/lora_a',
  }
  assert expected <= names, expected - names
  adapter_names = {n for n in names if 'lora' in n or 'router' in n}
  assert all(n.startswith(('encoder/layers_0/attention/query/', 'decoder/layers_0/mlp/'))
             for n in adapter_names), adapter_names
  specs = nn.get_partition_spec(boxed['params'])
  for path, spec in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]:
    assert isinstance(spec, jax.sharding.PartitionSpec) and len(spec) > 0, path
  p = boxed['params']
  assert p['encoder']['layers_0']['attention']['query']['lora_a'].names == ('expert', 'rank', 'embed')
  assert p['token_embedder']['embedding'].names == ('vocab', 'embed')
  assert p['encoder']['layers_0']['mlp']['wo']['kernel'].names == ('mlp', 'embed')
  # relu: a single `wi`; tied: no logits_dense.
  cfg2 = small_test_config(mlp_activations=('relu',), tie_word_embeddings=True,
                           num_encoder_layers=1, num_decoder_layers=1)
  names2 = _flat_names(jax.eval_shape(lambda r: nn.unbox(model_init.init_fn(Transformer(cfg2))(r)),
                                      jax.random.PRNGKey(0))['params'])
  assert 'encoder/layers_0/mlp/wi/kernel' in names2
  assert not any('logits_dense' in n for n in names2)


def test_adapter_site_selection():
  a = AdapterConfig(kind='lora', rank=8)
  cfg = T5Config(adapter=a, adapter_targets=('encoder/attention/*', '*/mlp/wo'),
                 adapter_overrides=(('decoder/mlp/*', AdapterConfig(kind='sira')),))
  sites = cfg.adapted_sites()
  assert set(sites) == {'encoder/attention/query', 'encoder/attention/key',
                        'encoder/attention/value', 'encoder/attention/out', 'encoder/mlp/wo',
                        'decoder/mlp/wi', 'decoder/mlp/wo'}
  assert sites['decoder/mlp/wi'].kind == 'sira' and sites['encoder/mlp/wo'] == a
  assert T5Config().adapted_sites() == {}  # default adapter kind is 'none'
  assert len(T5Config(adapter=a, adapter_targets=('*',)).adapted_sites()) == len(ALL_SITES)
  with pytest.raises(ValueError, match='unknown adapter site'):
    cfg.adapter_for('encoder/attention/qkv')
  with pytest.raises(ValueError, match='unknown activation'):
    T5Config(mlp_activations=('gelu_fast',))


def test_dropout_uses_only_dropout_rng_and_packing_matches_separate_examples():
  # Eval-mode SiRA model for packing; a small dropout model (no adapters) for the dropout check.
  cfg = small_test_config(adapter=AdapterConfig(kind='sira', num_experts=4),
                          adapter_targets=SIRA_SITES, adapter_overrides=LORA_OVERRIDE,
                          num_encoder_layers=1, num_decoder_layers=1)
  model = Transformer(cfg)
  v = _perturb_lora_b(_init(model))
  drop_model = Transformer(small_test_config(dropout_rate=0.2, num_encoder_layers=1,
                                             num_decoder_layers=1))
  dv = _init(drop_model)

  class m:  # jitted apply (eager op-by-op dispatch is slow on CPU)
    apply = staticmethod(jax.jit(model.apply, static_argnames=('enable_dropout',)))
  drop_apply = jax.jit(drop_model.apply, static_argnames=('enable_dropout',))
  a, b = np.array([5, 6, 7, 1]), np.array([9, 3, 1])
  ta, tb = np.array([11, 12, 1]), np.array([13, 1])
  shift = lambda t: np.concatenate([[0], t[:-1]])  # noqa: E731
  pad = lambda x, n: np.pad(x, (0, n - len(x)))  # noqa: E731
  seg = lambda x, n: pad(np.ones(len(x), int), n)  # noqa: E731
  # One shape for every call (one compile per dropout setting): rows padded to 7 / 5 tokens.
  sep = [jnp.asarray(np.stack(r)) for r in (
      [pad(a, 7), pad(b, 7)], [pad(shift(ta), 5), pad(shift(tb), 5)], [pad(ta, 5), pad(tb, 5)],
      [seg(a, 7), seg(b, 7)], [seg(ta, 5), seg(tb, 5)])]
  packed = [jnp.asarray(np.stack(r)) for r in (
      [np.concatenate([a, b]), pad(b, 7)], [np.concatenate([shift(ta), shift(tb)]), pad(shift(tb), 5)],
      [np.concatenate([ta, tb]), pad(tb, 5)], [np.array([1] * 4 + [2] * 3), seg(b, 7)],
      [np.array([1] * 3 + [2] * 2), seg(tb, 5)])]
  # Dropout: needs the 'dropout' rng and changes the output; deterministic per key.
  d1 = drop_apply(dv, *sep, enable_dropout=True, rngs={'dropout': _rbg(1)})
  d2 = drop_apply(dv, *sep, enable_dropout=True, rngs={'dropout': _rbg(1)})
  d3 = drop_apply(dv, *sep, enable_dropout=True, rngs={'dropout': _rbg(2)})
  np.testing.assert_array_equal(d1, d2)
  assert np.abs(np.asarray(d1 - d3)).max() > 1e-3
  assert np.abs(np.asarray(d1 - drop_model.apply(dv, *sep[:3], enable_dropout=False))).max() > 1e-3
  e = m.apply(v, *sep, enable_dropout=False)
  # Packing: two examples in one row with segment ids give the separate rows' logits.
  p = m.apply(v, *packed, enable_dropout=False)
  np.testing.assert_allclose(p[0, :3], e[0, :3], atol=1e-5)
  np.testing.assert_allclose(p[0, 3:], e[1, :2], atol=1e-5)
  np.testing.assert_allclose(p[1], e[1], atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Cache and decoding
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def adapted_model():
  # SiRA at every site; eval capacity None = no drops, so routing is per token and cached
  # decoding must reproduce the full pass exactly.
  cfg = small_test_config(vocab_size=6, adapter=AdapterConfig(kind='sira', num_experts=4, top_k=2),
                          adapter_targets=SIRA_SITES, adapter_overrides=LORA_OVERRIDE,
                          num_encoder_layers=1, num_decoder_layers=1)
  m = Transformer(cfg)
  v = _perturb_lora_b(_init(m))
  enc = jnp.array([[3, 4, 5, 2, 0], [2, 2, 3, 0, 0]], jnp.int32)
  return m, v, enc


def test_cached_decoding_equals_full_recomputation(adapted_model):
  m, v, enc = adapted_model
  length = 5
  targets = jnp.array([[4, 5, 3, 2, 1], [2, 3, 5, 4, 4]], jnp.int32)
  dec_in = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), targets[:, :-1]], 1)
  full = m.apply(v, enc, dec_in, targets, enable_dropout=False)
  encoded = decoding.encode(m, v, enc)
  cache = decoding.init_cache(m, v, encoded, enc, length)
  assert set(_flat_names(cache)) >= {
      'decoder/layers_0/self_attention/cached_key', 'decoder/layers_0/self_attention/cached_value',
      'decoder/layers_0/self_attention/cache_index'}
  assert cache['decoder']['layers_0']['self_attention']['cached_key'].shape == (2, 2, 8, length)
  step = jax.jit(lambda c, t: decoding.decode_step(m, v, c, encoded, enc, t, length))
  cached = []
  for i in range(length):
    logits, cache = step(cache, dec_in[:, i:i + 1])
    cached.append(logits)
  cached = jnp.stack(cached, 1)
  np.testing.assert_allclose(cached, full, atol=1e-5, rtol=1e-5)
  assert int(cache['decoder']['layers_0']['self_attention']['cache_index']) == length


def test_prefilled_cache_continues_each_example_from_its_prompt_length(adapted_model):
  """T5X's prompt prefilling: one causal pass writes the cache and per-example positions [b];
  the one-token steps after it give the full pass's logits at every example's own position."""
  m, v, enc = adapted_model
  targets = jnp.array([[4, 5, 3, 2, 1], [2, 3, 5, 4, 4]], jnp.int32)
  dec_in = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), targets[:, :-1]], 1)
  ones = jnp.ones_like(dec_in)
  lengths = jnp.array([3, 1], jnp.int32)  # example 0 resumes at position 3, example 1 at 1
  # The full pass routes every position, as T5X.
  cache, _ = check_prefill_then_cached_steps(m, v, enc, dec_in, lengths)
  np.testing.assert_array_equal(cache['decoder']['layers_0']['self_attention']['cache_index'],
                                lengths)
  encoded = decoding.encode(m, v, enc)
  with pytest.raises(ValueError, match='exclusive'):
    m.apply({**v, 'cache': cache}, encoded, enc, dec_in[:, :1], ones[:, :1], enable_dropout=False,
            decode=True, prefill=True, prefill_lengths=lengths, mutable=['cache'],
            method=m.decode)


def test_beam_search_is_exact_against_brute_force_and_greedy(adapted_model):
  m, v, enc = adapted_model
  length, vocab = 3, 6
  seqs = np.array(list(itertools.product(range(vocab), repeat=length)))  # [216, 3]
  n = len(seqs)
  dec_in = np.concatenate([np.zeros((n, 1), int), seqs[:, :-1]], 1)
  # Score every sequence with one full pass per batch row (targets all "real", as in decoding).
  scores = {}
  apply = jax.jit(m.apply, static_argnames=('enable_dropout',))
  for bi in range(enc.shape[0]):
    logits = apply(v, jnp.repeat(enc[bi:bi + 1], n, 0), jnp.asarray(dec_in),
                     jnp.ones((n, length), jnp.int32), enable_dropout=False)
    lp = np.asarray(jax.nn.log_softmax(logits))
    tok_lp = np.take_along_axis(lp, seqs[:, :, None], -1)[..., 0]
    best = {}
    for s, l in zip(seqs, tok_lp):
      end = int(np.argmax(s == 1)) + 1 if (s == 1).any() else length
      key = tuple(s[:end]) + (0,) * (length - end)
      best[key] = float(l[:end].sum())
    scores[bi] = sorted(best.items(), key=lambda kv: -kv[1])
  beams, beam_scores = decoding.beam_search(m, v, enc, max_decode_length=length, num_beams=36,
                                            alpha=0.0)
  for bi in range(enc.shape[0]):
    table = dict(scores[bi])
    for j in range(5):
      # The j-th beam has the j-th best score, and it is that sequence's own score (robust to
      # near-ties, where the order of equal-scoring sequences is arbitrary).
      assert abs(float(beam_scores[bi, j]) - scores[bi][j][1]) < 1e-4
      assert abs(table[tuple(np.asarray(beams[bi, j]))] - float(beam_scores[bi, j])) < 1e-4
  # Greedy = the first-choice path; beam 1 = greedy; EOS then padding.
  greedy, glp = decoding.predict_batch(m, v, {'encoder_input_tokens': enc},
                                       max_decode_length=length, return_scores=True)
  b1, b1s = decoding.predict_batch(m, v, {'encoder_input_tokens': enc}, max_decode_length=length,
                                   method='beam', num_beams=1, alpha=0.0, return_scores=True)
  np.testing.assert_array_equal(greedy, b1)
  np.testing.assert_allclose(glp, b1s, atol=1e-5)
  for row in np.asarray(beams).reshape(-1, length):
    if (row == 1).any():
      assert not row[int(np.argmax(row == 1)) + 1:].any()


def test_temperature_sampling(adapted_model):
  m, v, enc = adapted_model
  batch = {'encoder_input_tokens': enc, 'decoder_target_tokens': jnp.zeros((2, 6), jnp.int32)}
  s1 = decoding.predict_batch(m, v, batch, method='sample', temperature=1.0,
                              rng=jax.random.PRNGKey(3))
  s2 = decoding.predict_batch(m, v, batch, method='sample', temperature=1.0,
                              rng=jax.random.PRNGKey(3))
  assert s1.shape == (2, 6) and s1.dtype == jnp.int32
  np.testing.assert_array_equal(s1, s2)
  draws = np.stack([np.asarray(decoding.predict_batch(
      m, v, batch, method='sample', temperature=2.0, rng=jax.random.PRNGKey(i))) for i in range(4)])
  assert (draws < 6).all() and (draws >= 0).all()
  assert len({d.tobytes() for d in draws}) > 1
  for row in draws.reshape(-1, 6):
    if (row == 1).any():
      assert not row[int(np.argmax(row == 1)) + 1:].any()
  # top_k = 1 is greedy whatever the temperature.
  np.testing.assert_array_equal(
      decoding.predict_batch(m, v, batch, method='sample', temperature=5.0, top_k=1,
                             rng=jax.random.PRNGKey(0)),
      decoding.predict_batch(m, v, batch))
  with pytest.raises(ValueError, match='temperature'):
    decoding.predict_batch(m, v, batch, method='sample', temperature=0.0)


# ----------------------------------------------------------------------------------------------
# Parity with transformers' PyTorch T5 (random small models)
# ----------------------------------------------------------------------------------------------
def _hf_model(kind):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(0)
  common = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=20,
                dropout_rate=0.0, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
  if kind == 't5_relu_tied':
    tm = transformers.T5ForConditionalGeneration(transformers.T5Config(
        num_decoder_layers=3, feed_forward_proj='relu', tie_word_embeddings=True, **common))
  else:  # mT5 style: gated-GELU, untied lm_head
    tm = transformers.MT5ForConditionalGeneration(transformers.MT5Config(
        feed_forward_proj='gated-gelu', tie_word_embeddings=False, **common))
    tm.lm_head.weight = torch.nn.Parameter(torch.empty(96, 32))
    tm.config.tie_word_embeddings = False
  with torch.no_grad():
    for p in tm.parameters():
      p.normal_(0.0, 0.4)
  return tm.eval()


@pytest.mark.parametrize('kind', ['t5_relu_tied', 'mt5_gated_untied'])
def test_parity_with_transformers(kind, tmp_path):
  import sira_jax
  tm = _hf_model(kind)
  import torch
  tm.save_pretrained(tmp_path)
  model, params = sira_jax.load_pretrained(tmp_path)
  cfg = model.config
  if kind == 't5_relu_tied':
    assert cfg.mlp_activations == ('relu',) and cfg.tie_word_embeddings and cfg.logits_scaled
    assert cfg.num_decoder_layers == 3
  else:
    assert cfg.mlp_activations == ('gelu', 'linear') and not cfg.tie_word_embeddings
  rs = np.random.RandomState(0)
  enc = rs.randint(2, 96, size=(3, 30))
  enc[1, 20:] = 0
  enc[2, 5:] = 0
  dec_t = rs.randint(2, 96, size=(3, 25))
  dec_i = np.concatenate([np.zeros((3, 1), int), dec_t[:, :-1]], 1)
  with torch.no_grad():
    ref = tm(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
             decoder_input_ids=torch.tensor(dec_i)).logits.numpy()
  out = np.asarray(model.apply({'params': params}, jnp.asarray(enc), jnp.asarray(dec_i),
                               jnp.asarray(dec_t), enable_dropout=False))
  diff = np.abs(out - ref).max()
  print(f'{kind}: max abs logit diff {diff:.3g} (max |logit| {np.abs(ref).max():.3g})')
  assert diff < 1e-4
  # Greedy decoding: same tokens as transformers' generate.
  length = 8
  with torch.no_grad():
    hf = tm.generate(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                     max_new_tokens=length, do_sample=False, num_beams=1, use_cache=False,
                     decoder_start_token_id=0, eos_token_id=1, pad_token_id=0).numpy()[:, 1:]
  ours = np.asarray(decoding.predict_batch(model, {'params': params},
                                           {'encoder_input_tokens': jnp.asarray(enc)},
                                           max_decode_length=length))
  np.testing.assert_array_equal(ours[:, :hf.shape[1]], hf)
  assert not ours[:, hf.shape[1]:].any()


# ----------------------------------------------------------------------------------------------
# Parameter accounting
# ----------------------------------------------------------------------------------------------
def test_parameter_counts_match_formulas():
  from sira_jax.t5.param_count import count_parameters
  base = small_test_config()  # vocab 64, d 16, ff 32, heads 2 x 8, 2+2 layers, gated, untied
  v, d, ff, inner, heads, buckets = 64, 16, 32, 16, 2, 8
  enc_layer = 4 * d * inner + 2 * d * ff + ff * d + 2 * d
  dec_layer = 8 * d * inner + 2 * d * ff + ff * d + 3 * d
  n_base = v * d + 2 * (enc_layer + dec_layer) + 2 * heads * buckets + 2 * d + d * v
  c = count_parameters(base)
  assert (c.total, c.trainable, c.active_per_token, c.adapter_total) == (n_base, 0, n_base, 0)
  tied = count_parameters(base.replace(tie_word_embeddings=True))
  assert tied.total == n_base - d * v

  r = 2
  lora = count_parameters(base.replace(adapter=AdapterConfig(kind='lora', rank=r),
                                       adapter_targets=('*/query', '*/value')))
  n_sites = 2 * (2 + 4)  # q, v per attention block: 2 enc + 4 dec per layer pair, x2 layers
  assert lora.trainable == n_sites * r * (d + inner) == lora.adapter_total
  assert lora.active_per_token == lora.total == n_base + lora.trainable

  e, k = 8, 2
  sira_cfg = AdapterConfig(kind='sira', rank=r, num_experts=e, top_k=k)
  sira = count_parameters(base.replace(adapter=sira_cfg, adapter_targets=('*/query', '*/value')))
  experts = n_sites * e * r * (d + inner)
  routers = n_sites * d * e
  assert sira.trainable == experts + routers
  assert sira.active_per_token == n_base + routers + experts * k // e
  molora = count_parameters(base.replace(adapter=AdapterConfig(kind='molora', rank=r, num_experts=e),
                                         adapter_targets=('*/query', '*/value')))
  assert molora.active_per_token == molora.total
  smoe = count_parameters(base.replace(
      adapter=AdapterConfig(kind='smoe_dropout', rank=r, num_experts=e, top_k=2),
      adapter_targets=('encoder/mlp/wo',)))
  assert smoe.trainable == 2 * e * r * (ff + d)  # its router is fixed
  assert smoe.frozen == n_base + 2 * ff * e
