"""Scanned layer stacks (`T5Config.scan_layers`) and rematerialisation (`remat_policy`): the same
function, loss, gradients, routing statistics and decodes as the unrolled stacks; the exact
layout conversion; checkpoints of one layout loaded into a model of the other."""
import functools
import json
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sira_jax import checkpoints as ckpt_lib
from sira_jax import losses
from sira_jax import partitioning
from sira_jax import base_checkpoint
from sira_jax import model_init
from sira_jax import run_dir
from sira_jax.adapters import AdapterConfig, trainable_mask, with_training_progress
from sira_jax.t5 import decoding, loading, saving, scan_layout
from sira_jax.t5.config import small_test_config
from sira_jax.t5.network import Transformer

from decoding_checks import check_prefill_then_cached_steps


def init_variables(model, rng):
  """The model's boxed variables from `rng` (the project's one init path)."""
  return model_init.init_fn(model)(rng)

# SiRA with a binding training capacity (drops) on a few sites of each side, LoRA on the attention
# outputs; encoder and decoder of different depths, so a layer mean that weighed stacks instead of
# layers would show.
SIRA = AdapterConfig(kind='sira', num_experts=4, top_k=2, capacity_factor=0.75,
                     expert_dropout_rate=0.0, router_jitter=0.0)
SITES = ('encoder/attention/query', 'encoder/mlp/wi', 'decoder/self_attention/value',
         'decoder/encoder_decoder_attention/key', 'decoder/mlp/wo')
CONFIGS = {
    'sira': small_test_config(num_encoder_layers=2, num_decoder_layers=3, adapter=SIRA,
                              adapter_targets=SITES,
                              adapter_overrides=(('*/out', AdapterConfig(kind='lora', rank=2)),)),
    'lora': small_test_config(num_encoder_layers=2, num_decoder_layers=3,
                              adapter=AdapterConfig(kind='lora', rank=2),
                              adapter_targets=('*/query', '*/value', '*/mlp/wo')),
}
ENC = jnp.array([[3, 4, 5, 6, 7, 2], [8, 9, 10, 1, 0, 0], [11, 3, 5, 7, 9, 1]], jnp.int32)
TARGETS = jnp.array([[4, 5, 6, 7, 1], [9, 10, 1, 0, 0], [3, 12, 13, 1, 0]], jnp.int32)
DEC_IN = jnp.concatenate([jnp.zeros((3, 1), jnp.int32), TARGETS[:, :-1]], 1)


def _perturb_lora_b(params, scale=0.3):
  """Nonzero lora_b (it inits at zero), so the adapters change every output."""
  def f(path, x):
    key = jax.tree_util.keystr(path)
    if 'lora_b' in key:
      return x + scale * jax.random.normal(jax.random.PRNGKey(zlib.crc32(key.encode())), x.shape)
    return x
  return jax.tree_util.tree_map_with_path(f, params)


@functools.lru_cache(maxsize=None)
def _unscanned_params(kind):
  """The reference params (unscanned layout), numpy."""
  model = Transformer(CONFIGS[kind])
  params = nn.unbox(init_variables(model, jax.random.PRNGKey(0)))['params']
  return jax.tree.map(np.asarray, _perturb_lora_b(params))


def _models(kind, **kw):
  cfg = CONFIGS[kind].replace(**kw)
  return Transformer(cfg.replace(scan_layers=False)), Transformer(cfg.replace(scan_layers=True))


def _loss_and_grads(model, params, enable_dropout=True):
  """(loss, metrics, logits, grads of every param) of one teacher-forced batch, jitted."""
  def loss_fn(p):
    logits, mods = model.apply({'params': p}, ENC, DEC_IN, TARGETS, enable_dropout=enable_dropout,
                               rngs={'dropout': jax.random.PRNGKey(1)}, mutable=['intermediates'])
    loss, metrics = losses.compute_loss(logits, TARGETS, None, mods.get('intermediates'),
                                        losses.LossConfig(aux_factor=0.1, router_z_factor=0.01))
    return loss, (metrics, logits)
  (loss, (metrics, logits)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return loss, metrics, logits, grads


@functools.lru_cache(maxsize=None)
def _unscanned_loss_and_grads(kind):
  """`_loss_and_grads` of the unrolled model (no remat) on the reference params, numpy: the one
  reference the scan and remat tests compare with, compiled once per kind."""
  return jax.tree.map(np.asarray, _loss_and_grads(_models(kind)[0], _unscanned_params(kind)))


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


# ----------------------------------------------------------------------------------------------
# Structure and layout
# ----------------------------------------------------------------------------------------------
def test_scanned_params_carry_the_layers_axis_left_unsharded():
  _, scanned = _models('sira')
  boxed = jax.eval_shape(lambda r: init_variables(scanned, r), jax.random.PRNGKey(0))
  q = boxed['params']['encoder']['layers']['attention']['query']
  assert q['kernel'].names == ('layers', 'embed', 'joined_kv')
  assert q['lora_a'].names == ('layers', 'expert', 'rank', 'embed')
  assert q['router_kernel'].names == ('layers', 'embed', 'unmodeled')
  assert nn.unbox(q)['lora_a'].shape == (2, 4, 4, 16)  # [layers, E, r, d_model]
  assert nn.unbox(boxed['params']['decoder']['layers']['mlp']['wo'])['kernel'].shape == (3, 32, 16)
  # Shared across layers, outside the stack, as in T5.
  assert boxed['params']['encoder']['relpos_bias']['rel_embedding'].names == (
      'heads', 'relpos_buckets')
  assert not any(k.startswith('layers_') for k in boxed['params']['encoder'])
  spec = partitioning.logical_to_mesh_spec(q['lora_b'].names, partitioning.logical_axis_rules())
  assert spec == P(None, 'expert', None, 'model')  # the layer axis is never sharded
  # The unscanned reference converts to exactly these shapes.
  shapes = jax.tree.map(np.shape, scan_layout.to_layout(_unscanned_params('sira'), scanned=True))
  assert shapes == jax.tree.map(np.shape, nn.unbox(boxed['params']))


def test_layout_round_trip_is_exact_and_refuses_bad_trees():
  params = _unscanned_params('sira')
  scanned = scan_layout.to_layout(params, scanned=True)
  assert scan_layout.layout_of(params) == 'unscanned'
  assert scan_layout.layout_of(scanned) == 'scanned'
  np.testing.assert_array_equal(
      scanned['decoder']['layers']['mlp']['wo']['lora_a'][2],
      params['decoder']['layers_2']['mlp']['wo']['lora_a'])
  back = scan_layout.to_layout(scanned, scanned=False)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # Converting to the layout a tree already has changes nothing.
  jax.tree.map(np.testing.assert_array_equal, scan_layout.to_layout(scanned, scanned=True),
               scanned)
  # Abstract trees (ShapeDtypeStructs) convert too.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert jax.tree.map(lambda s: s.shape, scan_layout.to_layout(abstract, True)) == jax.tree.map(
      np.shape, scanned)
  missing = {**params, 'encoder': {k: v for k, v in params['encoder'].items() if k != 'layers_0'}}
  with pytest.raises(scan_layout.LayoutError, match='missing layers'):
    scan_layout.to_layout(missing, scanned=True)
  mixed = {**params, 'encoder': scanned['encoder']}
  with pytest.raises(scan_layout.LayoutError, match='different layouts'):
    scan_layout.to_layout(mixed, scanned=False)


# ----------------------------------------------------------------------------------------------
# Same numbers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kind', ['sira', 'lora'])
@pytest.mark.slow
def test_scanned_equals_unscanned_logits_loss_grads_and_routing_statistics(kind):
  _, scanned = _models(kind)
  params = _unscanned_params(kind)
  loss0, metrics0, logits0, grads0 = _unscanned_loss_and_grads(kind)
  loss1, metrics1, logits1, grads1 = _loss_and_grads(
      scanned, scan_layout.to_layout(params, scanned=True))
  np.testing.assert_allclose(logits1, logits0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  assert set(metrics1) == set(metrics0)
  if kind == 'sira':  # routing statistics, per layer through the scan, averaged over layers
    assert float(metrics0['dropped_fraction']) > 0  # the training capacity binds
    for name in ('aux_loss', 'router_z_loss', 'dropped_fraction', 'expert_usage_min',
                 'expert_usage_max', 'gate_entropy', 'router_confidence'):
      np.testing.assert_allclose(metrics1[name], metrics0[name], rtol=1e-5, err_msg=name)
  for name in metrics0:
    np.testing.assert_allclose(metrics1[name], metrics0[name], rtol=1e-5, atol=1e-7,
                               err_msg=name)
  grads1 = scan_layout.to_layout(grads1, scanned=False)
  _assert_trees_close(grads1, grads0)
  trained = jax.tree.leaves(jax.tree.map(lambda g, m: float(np.abs(g).max()) if m else 0.0,
                                         grads0, trainable_mask(grads0)))
  assert max(trained) > 1e-3  # the gradients compared are real


def test_scanned_routing_statistics_come_out_per_layer():
  _, scanned = _models('sira')
  params = scan_layout.to_layout(_unscanned_params('sira'), scanned=True)
  _, mods = scanned.apply({'params': params}, ENC, DEC_IN, TARGETS, enable_dropout=False,
                          mutable=['intermediates'])
  wo = mods['intermediates']['decoder']['layers']['mlp']['wo']
  assert wo['aux_loss'][0].shape == (3,)  # one value per decoder layer
  assert wo['expert_usage'][0].shape == (3, 4)  # [layers, E]
  per_layer = losses.collect_intermediates(mods['intermediates'])
  # 3 routed encoder projections (query, wi_0, wi_1) x 2 layers + 3 decoder ones x 3 layers
  assert len(per_layer['aux_loss']) == 3 * 2 + 3 * 3
  assert all(u.shape == (4,) for u in per_layer['expert_usage'])


@pytest.mark.parametrize('policy,scan', [('minimal', True), ('full', True), ('full', False)])
def test_remat_policies_leave_loss_and_gradients_unchanged(policy, scan):
  params = _unscanned_params('sira')
  loss0, _, _, grads0 = _unscanned_loss_and_grads('sira')
  model = _models('sira', remat_policy=policy)[int(scan)]
  loss1, _, _, grads1 = _loss_and_grads(model, scan_layout.to_layout(params, scan))
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  _assert_trees_close(scan_layout.to_layout(grads1, scanned=False), grads0)


def test_unknown_remat_policy_is_refused():
  with pytest.raises(ValueError, match='remat_policy'):
    small_test_config(remat_policy='some')


@pytest.mark.slow
def test_smoe_dropout_schedule_is_scanned_per_layer():
  cfg = small_test_config(num_encoder_layers=2, num_decoder_layers=3,
                          adapter=AdapterConfig(kind='smoe_dropout', num_experts=4, top_k=1),
                          adapter_targets=('encoder/attention/query', 'decoder/mlp/wo'))
  unrolled, scanned = Transformer(cfg), Transformer(cfg.replace(scan_layers=True))
  v0 = nn.unbox(init_variables(unrolled, jax.random.PRNGKey(0)))
  v1 = scan_layout.variables_to_layout(v0, scanned=True)
  assert v1['schedule']['decoder']['layers']['mlp']['wo']['progress'].shape == (3,)
  outs = []
  for model, v in ((unrolled, v0), (scanned, v1)):
    v = with_training_progress(v, 0.0)  # k = top_k = 1 of 4 experts active
    outs.append(model.apply(v, ENC, DEC_IN, TARGETS, enable_dropout=True,
                            rngs={'dropout': jax.random.PRNGKey(1)}))
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kind', ['sira', 'lora'])
def test_scanned_decodes_equal_unscanned(kind):
  # Eval capacity: none (SiRA's default), so routing is per token and cached decoding is exact.
  unrolled, scanned = _models(kind)
  params = _unscanned_params(kind)
  v0, v1 = {'params': params}, {'params': scan_layout.to_layout(params, scanned=True)}
  batch = {'encoder_input_tokens': ENC}
  g0, s0 = decoding.predict_batch(unrolled, v0, batch, max_decode_length=5, return_scores=True)
  g1, s1 = decoding.predict_batch(scanned, v1, batch, max_decode_length=5, return_scores=True)
  np.testing.assert_array_equal(g1, g0)
  np.testing.assert_allclose(s1, s0, rtol=1e-5)
  if kind == 'sira':  # beam search reorders the cache along its batch axis (1 when scanned)
    b0, bs0 = decoding.beam_search(unrolled, v0, ENC, max_decode_length=4, num_beams=3)
    b1, bs1 = decoding.beam_search(scanned, v1, ENC, max_decode_length=4, num_beams=3)
    np.testing.assert_array_equal(b1, b0)
    np.testing.assert_allclose(bs1, bs0, rtol=1e-5)


def test_scanned_prefill_and_cached_steps_equal_the_full_pass():
  _, scanned = _models('sira')
  v = {'params': scan_layout.to_layout(_unscanned_params('sira'), scanned=True)}
  length = DEC_IN.shape[1]
  encoded = decoding.encode(scanned, v, ENC)
  cache = decoding.init_cache(scanned, v, encoded, ENC, length)
  attn = cache['decoder']['layers']['self_attention']
  assert attn['cached_key'].shape == (3, 3, 2, 8, length)  # [layers, batch, heads, d_kv, L]
  assert attn['cache_index'].shape == (3,)
  lengths = jnp.array([3, 1, 2], jnp.int32)
  cache, _ = check_prefill_then_cached_steps(scanned, v, ENC, DEC_IN, lengths)
  np.testing.assert_array_equal(cache['decoder']['layers']['self_attention']['cache_index'],
                                np.tile(lengths, (3, 1)))


# ----------------------------------------------------------------------------------------------
# Expert parallelism on a mesh
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_scanned_einsum_form_on_an_expert_mesh_matches_one_device(monkeypatch):
  """The step of tests/test_sharding.py (SiRA, einsum form, expert dropout) with scanned stacks:
  data 2 x expert 4 equals one device. (Its expert dropout draws from the 'dropout' stream split
  per layer, so the comparison is scanned against scanned.)"""
  import sharded_step
  params = scan_layout.to_layout(sharded_step.host_params(Transformer(sharded_step.CONFIG)), True)
  monkeypatch.setattr(sharded_step, 'CONFIG', sharded_step.CONFIG.replace(scan_layers=True))
  monkeypatch.setattr(sharded_step, '_SINGLE', [])  # not the unscanned reference
  loss1, grads1, _ = sharded_step.run(None, params=params)
  mesh = partitioning.make_mesh(data=2, expert=4, model=1)
  loss8, grads8, _ = sharded_step.run(mesh, params=params)
  q = grads8['encoder']['layers']['attention']['query']['lora_a']
  assert q.sharding.spec == P(None, 'expert', None, None)
  assert q.addressable_shards[0].data.shape[1] == sharded_step.CONFIG.adapter.num_experts // 4
  np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
  _assert_trees_close(jax.tree.map(np.asarray, grads8), jax.tree.map(np.asarray, grads1),
                      atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Checkpoints of one layout into a model of the other
# ----------------------------------------------------------------------------------------------
def test_hf_and_t5x_checkpoints_load_into_either_layout(tmp_path):
  cfg = CONFIGS['lora'].replace(adapter=AdapterConfig(), adapter_targets=())
  base = jax.tree.map(np.asarray, nn.unbox(init_variables(  # the base only: what files hold
      Transformer(cfg), jax.random.PRNGKey(3)))['params'])
  saving.save_hf_safetensors(str(tmp_path / 'hf'), base, cfg)
  # A T5X checkpoint written from scanned params: stored unscanned (T5X's names).
  saving.save_t5x_orbax(str(tmp_path / 't5x'), scan_layout.to_layout(base, True), config=cfg)
  for path in (tmp_path / 'hf', tmp_path / 't5x'):
    for scan in (False, True):
      model, params = loading.load_pretrained(path, SIRA, adapter_targets=SITES,
                                              scan_layers=scan)
      assert model.config.scan_layers == scan
      assert scan_layout.layout_of(params) == ('scanned' if scan else 'unscanned')
      got = scan_layout.to_layout(params, scanned=False)
      np.testing.assert_array_equal(got['encoder']['layers_1']['mlp']['wo']['kernel'],
                                    base['encoder']['layers_1']['mlp']['wo']['kernel'])
      np.testing.assert_array_equal(got['decoder']['layers_2']['self_attention']['out']['kernel'],
                                    base['decoder']['layers_2']['self_attention']['out']['kernel'])
      assert 'router_kernel' in got['encoder']['layers_0']['attention']['query']  # fresh adapters


@pytest.mark.slow
def test_project_base_checkpoint_of_one_layout_loads_into_the_other(tmp_path):
  cfg = CONFIGS['sira']
  base_cfg = cfg.replace(adapter=AdapterConfig(), adapter_targets=())
  base = jax.tree.map(np.asarray, nn.unbox(init_variables(
      Transformer(base_cfg), jax.random.PRNGKey(5)))['params'])
  ckpt_lib.save_base_params(str(tmp_path / 'base'), base, model_init.config_to_dict(base_cfg))
  scanned_cfg = cfg.replace(scan_layers=True)
  abstract = model_init.abstract_params(model_init.build_model(scanned_cfg))
  read = base_checkpoint.read_base_params(str(tmp_path / 'base'), scanned_cfg, abstract)
  stacked = scan_layout.to_layout(base, scanned=True)
  np.testing.assert_array_equal(read[('decoder', 'layers', 'mlp', 'wo', 'kernel')],
                                stacked['decoder']['layers']['mlp']['wo']['kernel'])
  # And the scanned model computes what the unscanned one computes on that base.
  v1 = base_checkpoint.with_base(nn.unbox(init_variables(Transformer(scanned_cfg),
                                                   jax.random.PRNGKey(0))), read)
  v0 = scan_layout.variables_to_layout(v1, scanned=False)
  out0 = Transformer(cfg).apply(v0, ENC, DEC_IN, TARGETS, enable_dropout=False)
  out1 = Transformer(scanned_cfg).apply(v1, ENC, DEC_IN, TARGETS, enable_dropout=False)
  np.testing.assert_allclose(out1, out0, rtol=1e-5, atol=1e-5)
  # The scanned run records its layout with its config.
  assert model_init.config_from_dict(model_init.config_to_dict(scanned_cfg)).scan_layers


def test_a_run_recorded_before_the_layout_fields_resumes_and_a_layout_change_is_named(tmp_path):
  fingerprint = {'seed': 0, 'model_config': model_init.config_to_dict(CONFIGS['lora'])}
  older = json.loads(json.dumps(fingerprint))
  del older['model_config']['scan_layers'], older['model_config']['remat_policy']
  (tmp_path / run_dir.RUN_CONFIG).write_text(json.dumps(older))
  assert run_dir.check_model_dir(str(tmp_path), fingerprint, overwrite=False)  # resumes
  scanned = {'seed': 0, 'model_config': model_init.config_to_dict(
      CONFIGS['lora'].replace(scan_layers=True))}
  with pytest.raises(run_dir.ConfigError, match='scan_layers: False -> True'):
    run_dir.check_model_dir(str(tmp_path), scanned, overwrite=False)
