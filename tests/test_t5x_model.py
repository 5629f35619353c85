"""SiraEncoderDecoderModel under real T5X (skipped where t5x is not installed, as in CI): the same
loss as the project's trainer, routing losses in the loss, cached decoding, SMoE-Dropout's schedule,
freezing in the optimizer, and a partitioned train step with PjitPartitioner and
MoePjitPartitioner."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import seqio

pytest.importorskip('t5x')

from t5x import adafactor
from t5x import decoding
from t5x import partitioning as t5x_partitioning
from t5x import trainer as t5x_trainer
from t5x import utils as t5x_utils
from t5x.contrib.moe import partitioning as moe_partitioning

from sira_jax import losses
from sira_jax import trainer as trainer_lib
from sira_jax.adapters import AdapterConfig
from sira_jax.adapters import is_adapter_param
from sira_jax.adapters import trainable_mask
from sira_jax.t5 import network
from sira_jax.t5 import scan_layout
from sira_jax.t5.config import T5Config
from sira_jax.t5x import models
from sira_jax.t5x import optimizers
from sira_jax.t5x import partitioning

VOCAB = seqio.ByteVocabulary()
SHAPES = {'encoder_input_tokens': (8, 12), 'decoder_input_tokens': (8, 10)}


def _config(kind='sira', **adapter):
  ad = AdapterConfig(kind=kind, rank=2, num_experts=4, top_k=1 if kind == 'smoe_dropout' else 2,
                     **adapter) if kind != 'none' else AdapterConfig()
  return T5Config(vocab_size=384, d_model=32, d_ff=64, num_heads=8, d_kv=4,
                  num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0, adapter=ad,
                  adapter_targets=('*/query', '*/value', '*/mlp/wo'))


def _optimizer():
  return optimizers.adapter_only(
      adafactor.Adafactor(logical_factor_rules=partitioning.adafactor_factor_rules()))


def _model(kind='sira', loss_config=None, decode_fn=decoding.beam_search, **kw):
  return models.SiraEncoderDecoderModel(
      network.Transformer(_config(kind)), VOCAB, VOCAB, _optimizer(), decode_fn=decode_fn,
      loss_config=loss_config, **kw)


def _batch(seed=0):
  rng = np.random.RandomState(seed)
  b, li, lt = 8, 12, 10
  enc = rng.randint(3, VOCAB.vocab_size, (b, li))
  tgt = rng.randint(3, VOCAB.vocab_size, (b, lt))
  for i in range(b):  # ragged lengths, EOS then padding
    n_in, n_t = rng.randint(3, li), rng.randint(2, lt)
    enc[i, n_in - 1], enc[i, n_in:] = 1, 0
    tgt[i, n_t - 1], tgt[i, n_t:] = 1, 0
  dec_in = np.concatenate([np.zeros((b, 1), int), tgt[:, :-1]], 1)
  return {'encoder_input_tokens': jnp.asarray(enc, jnp.int32),
          'decoder_input_tokens': jnp.asarray(dec_in, jnp.int32),
          'decoder_target_tokens': jnp.asarray(tgt, jnp.int32),
          'decoder_loss_weights': jnp.asarray(tgt > 0, jnp.float32)}


def _with_nonzero_lora_b(params):
  """lora_b starts at zero; shifted, the adapters change the output."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if 'lora_b' in jax.tree_util.keystr(p) else x, params)


def _params(model, seed=0):
  variables = model.get_initial_variables(jax.random.PRNGKey(seed), SHAPES)
  return _with_nonzero_lora_b(variables['params']), variables


def test_variables_carry_params_axes_and_unboxed_params():
  model = _model()
  variables = model.get_initial_variables(jax.random.PRNGKey(0), SHAPES)
  assert set(variables) == {'params', 'params_axes'}
  axes = variables['params_axes']['encoder']['layers_0']['attention']['query']
  assert axes['lora_a_axes'].names == ('expert', 'rank', 'embed')
  assert axes['router_kernel_axes'].names == ('embed', 'unmodeled')
  assert isinstance(variables['params']['encoder']['layers_0']['attention']['query']['lora_a'],
                    jax.Array)


def test_loss_equals_project_trainer_loss_on_same_params_and_batch():
  cfg = losses.LossConfig(z_loss=1e-4, aux_factor=0.01, router_z_factor=0.001)
  model = _model(loss_config=cfg)
  params, _ = _params(model)
  batch, rng = _batch(), jax.random.PRNGKey(7)
  t5x_loss, t5x_metrics = model.loss_fn(params, batch, jax.random.fold_in(rng, 0))
  state = trainer_lib.create_state({'params': params}, optax.sgd(0.0),
                                   trainable_mask=trainable_mask(params), rng=rng)
  step = trainer_lib.make_train_step(model.module, optax.sgd(0.0), cfg)
  _, ours = jax.jit(step)(state, batch, jnp.asarray(10))
  np.testing.assert_allclose(t5x_loss, ours['loss'], rtol=1e-6)
  for name in ('cross_entropy', 'aux_loss', 'router_z_loss', 'dropped_fraction', 'gate_entropy'):
    np.testing.assert_allclose(t5x_metrics[name].compute(), ours[name], rtol=1e-5, atol=1e-7)
  assert float(ours['aux_loss']) > 0
  # Evaluation (no dropout rng) is the project trainer's eval step.
  eval_loss, _ = model.eval_fn(params, batch)
  ours_eval = trainer_lib.make_eval_step(model.module, cfg)({'params': params}, batch)
  np.testing.assert_allclose(eval_loss, ours_eval['loss'], rtol=1e-6)


def test_routing_losses_enter_the_loss_with_their_factors():
  params, _ = _params(_model())
  batch, rng = _batch(1), jax.random.PRNGKey(3)
  with_aux = _model(loss_config=losses.LossConfig(aux_factor=0.5, router_z_factor=0.25))
  without = _model(loss_config=losses.LossConfig(aux_factor=0.0, router_z_factor=0.0))
  loss_a, m = with_aux.loss_fn(params, batch, rng)
  loss_b, _ = without.loss_fn(params, batch, rng)
  aux, rz = m['aux_loss'].compute(), m['router_z_loss'].compute()
  np.testing.assert_allclose(loss_a - loss_b, 0.5 * aux + 0.25 * rz, rtol=1e-4)
  np.testing.assert_allclose(m['cross_ent_loss'].compute(), m['cross_entropy'].compute())
  # T5X's plain sum over tokens (loss_normalizing_factor=None): the cross-entropy scales with the
  # token count, the routing losses do not.
  summed = _model(loss_config=losses.LossConfig(aux_factor=0.5, router_z_factor=0.25),
                  loss_normalizing_factor=None)
  loss_s, ms = summed.loss_fn(params, batch, rng)
  tokens = float(jnp.sum(batch['decoder_loss_weights']))
  np.testing.assert_allclose(ms['cross_entropy'].compute(), tokens * m['cross_entropy'].compute(),
                             rtol=1e-5)
  np.testing.assert_allclose(loss_s - tokens * (m['cross_entropy'].compute() +
                                                m['z_loss'].compute()), 0.5 * aux + 0.25 * rz,
                             rtol=1e-3)


def test_cached_decoding_equals_full_recomputation():
  greedy = functools.partial(decoding.temperature_sample, temperature=1.0, topk=1)
  model = _model(decode_fn=greedy)
  params, _ = _params(model)
  batch = _batch(2)
  decodes = np.asarray(model.predict_batch(params, batch, rng=jax.random.PRNGKey(0)))
  # Greedy decoding by full recomputation: one teacher-forced pass per step over the prefix. Every
  # target position counts as a real token (as while decoding), so every token is routed.
  full = jax.jit(lambda dec_in: model._compute_logits(params, {
      'encoder_input_tokens': batch['encoder_input_tokens'], 'decoder_input_tokens': dec_in,
      'decoder_target_tokens': jnp.ones_like(dec_in)}))
  tokens = np.zeros_like(decodes)
  for t in range(tokens.shape[1]):
    dec_in = np.concatenate([np.zeros((8, 1), np.int32), tokens[:, :-1]], 1)
    tokens[:, t] = np.asarray(jnp.argmax(full(jnp.asarray(dec_in)), -1))[:, t]
  upto_eos = np.cumsum(np.cumsum(tokens == 1, 1), 1) <= 1  # through the first EOS
  assert np.array_equal(decodes * upto_eos, tokens * upto_eos)
  assert upto_eos.sum() > 8


def test_prompt_prefill_continues_decoder_prompts_like_full_recomputation():
  """T5X enables prompt prefilling for this network (module.decode takes `prefill`); prompts of
  different lengths (0 included) continue exactly as greedy decoding by full recomputation."""
  import inspect
  assert 'prefill' in inspect.signature(network.Transformer.decode).parameters
  greedy = functools.partial(decoding.temperature_sample, temperature=1.0, topk=1)
  model = _model(decode_fn=greedy)
  params, _ = _params(model)
  batch = dict(_batch(3))
  lengths = np.array([0, 1, 2, 3, 0, 4, 2, 1])  # prompt tokens after BOS, per example
  tgt = np.asarray(batch['decoder_target_tokens'])
  prompt = np.zeros_like(tgt)
  for i, n in enumerate(lengths):
    prompt[i, 1:n + 1] = np.where(tgt[i, :n] > 1, tgt[i, :n], 7)  # no EOS/pad inside a prompt
  batch['decoder_input_tokens'] = jnp.asarray(prompt, jnp.int32)
  decodes, _ = model.predict_batch_with_aux(params, batch, rng=jax.random.PRNGKey(0),
                                            prompt_with_targets=True)
  decodes = np.asarray(decodes)
  full = jax.jit(lambda dec_in: model._compute_logits(params, {
      'encoder_input_tokens': batch['encoder_input_tokens'], 'decoder_input_tokens': dec_in,
      'decoder_target_tokens': jnp.ones_like(dec_in)}))
  tokens = np.zeros_like(decodes)
  for i, n in enumerate(lengths):
    tokens[i, :n] = prompt[i, 1:n + 1]
  for t in range(tokens.shape[1]):
    dec_in = np.concatenate([np.zeros((8, 1), np.int32), tokens[:, :-1]], 1)
    nxt = np.asarray(jnp.argmax(full(jnp.asarray(dec_in)), -1))[:, t]
    tokens[:, t] = np.where(t >= lengths, nxt, tokens[:, t])
  after = np.arange(tokens.shape[1])[None] >= lengths[:, None]
  upto_eos = np.cumsum(np.cumsum((tokens == 1) & after, 1), 1) <= 1  # through the first new EOS
  assert np.array_equal(decodes * upto_eos, tokens * upto_eos)
  assert (upto_eos & after).sum() > 8


def test_beam_search_is_the_same_with_and_without_the_prefill_path():
  """With `prefill` in module.decode T5X starts beam search from a prefilled cache with a
  per-example cache index; the beams are those of the plain token-by-token path."""

  class NoPrefill(network.Transformer):

    def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None,
               enable_dropout=True, decode=False, max_decode_length=None):
      return super().decode(encoded, encoder_input_tokens, decoder_input_tokens,
                            decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                            decoder_positions, enable_dropout, decode, max_decode_length)

  model = _model()
  params, _ = _params(model)
  plain = models.SiraEncoderDecoderModel(NoPrefill(_config()), VOCAB, VOCAB, _optimizer(),
                                         decode_fn=decoding.beam_search)
  batch = _batch(4)
  kw = dict(rng=jax.random.PRNGKey(0), return_all_decodes=True, num_decodes=3)
  with_prefill, scores = model.predict_batch_with_aux(params, batch, **kw)
  without, scores_plain = plain.predict_batch_with_aux(params, batch, **kw)
  np.testing.assert_array_equal(np.asarray(with_prefill), np.asarray(without))
  np.testing.assert_allclose(scores['scores'], scores_plain['scores'], rtol=1e-5, atol=1e-5)


def test_smoe_dropout_schedule_grows_k_under_t5x():
  model = _model('smoe_dropout', smoe_schedule_steps=4)
  variables = model.get_initial_variables(jax.random.PRNGKey(0), SHAPES)
  mutables = {'schedule': variables['schedule']}
  assert set(variables) == {'params', 'params_axes', 'schedule', 'schedule_axes'}
  assert all(float(v) == 0.0 for v in jax.tree.leaves(mutables))
  params = _with_nonzero_lora_b(variables['params'])
  batch = _batch(3)
  aux, ce = [], []
  for step in range(5):
    _, (metrics, mutables) = model.loss_fn(params, batch, jax.random.PRNGKey(step), mutables)
    aux.append(float(metrics['aux_loss'].compute()))
    ce.append(float(metrics['cross_entropy'].compute()))
    assert all(abs(float(v) - min((step + 1) / 4, 1.0)) < 1e-6 for v in jax.tree.leaves(mutables))
  # aux = E * sum_e f_e P_e with f_e the share of active choices: exactly 1 once every token uses
  # all E experts (progress 1, step 4), not with k = 1 of 4 active (progress 0, step 0).
  assert aux[4] == pytest.approx(1.0, abs=1e-5) and abs(aux[0] - 1.0) > 1e-3
  assert len(set(ce)) > 1  # the number of active experts changes the output
  # Evaluation does not advance the schedule.
  _, (_, after_eval) = model.loss_fn(params, batch, None, mutables)
  assert jax.tree.leaves(after_eval) == jax.tree.leaves(mutables)
  with pytest.raises(ValueError, match='smoe_schedule_steps'):
    _model('smoe_dropout').loss_fn(params, batch, jax.random.PRNGKey(0), mutables)


def test_freezing_is_the_optimizers_job():
  with pytest.raises(ValueError, match='freeze_base=True'):
    models.SiraEncoderDecoderModel(network.Transformer(_config()), VOCAB, VOCAB,
                                   adafactor.Adafactor())
  no_adapters = models.SiraEncoderDecoderModel(network.Transformer(_config('none')), VOCAB, VOCAB,
                                               _optimizer())
  with pytest.raises(ValueError, match='no adapter params'):
    no_adapters.get_initial_variables(jax.random.PRNGKey(0), SHAPES)
  assert is_adapter_param('/decoder/layers_0/mlp/wo/lora_b', trainable=True)
  assert not is_adapter_param('/decoder/layers_0/mlp/wo/kernel', trainable=True)
  assert not is_adapter_param('/encoder/layers_0/attention/query/smoe_router_kernel',
                              trainable=True)
  assert is_adapter_param('/encoder/layers_0/attention/query/smoe_router_kernel')


@pytest.mark.parametrize('partitioner', ['pjit', 'moe'])
def test_partitioned_train_step_trains_adapters_only(partitioner):
  assert jax.device_count() == 8  # tests/conftest.py
  if partitioner == 'pjit':
    # On CPU, T5X's mesh puts every device on 'model' (8-way model parallel here).
    part = t5x_partitioning.PjitPartitioner(
        num_partitions=1, logical_axis_rules=partitioning.logical_axis_rules())
  else:
    part = moe_partitioning.MoePjitPartitioner(
        num_expert_partitions=4, num_partitions=1,
        logical_axis_rules=partitioning.moe_logical_axis_rules())
  expert_compute = 'einsum' if partitioner == 'moe' else 'dense'
  model = models.SiraEncoderDecoderModel(
      network.Transformer(_config('sira', expert_compute=expert_compute)), VOCAB, VOCAB,
      _optimizer())
  init = t5x_utils.TrainStateInitializer(
      optimizer_def=model.optimizer_def, init_fn=model.get_initial_variables,
      input_shapes=SHAPES, partitioner=part)
  state = init.from_scratch(jax.random.PRNGKey(0))
  axes = init.train_state_axes
  if partitioner == 'moe':
    lora_a = axes.params['encoder']['layers_0']['attention']['query']['lora_a']
    assert lora_a == jax.sharding.PartitionSpec('expert', None, None)
  before = jax.device_get(state.params)
  trainer = t5x_trainer.Trainer(
      model=model, train_state=state, partitioner=part, eval_names=[], summary_dir=None,
      train_state_axes=axes, rng=jax.random.PRNGKey(1),
      learning_rate_fn=lambda step: 1e-2, num_microbatches=None)
  batches = iter([jax.tree.map(np.asarray, _batch(s)) for s in range(2)])
  metrics = trainer.train(batches, num_steps=2).result()
  assert {'aux_loss', 'dropped_fraction', 'cross_entropy'} <= set(metrics)
  after = jax.device_get(trainer.train_state.params)
  flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_a = jax.tree.leaves(after)
  changed = {'/'.join(str(k.key) for k in p) for (p, x), y in zip(flat_b, flat_a)
             if not np.array_equal(x, y)}
  assert changed and all(is_adapter_param(c, trainable=True) for c in changed), changed


def test_router_lr_multiplier_scales_the_router_updates_only():
  rng = np.random.RandomState(0)
  params = {'encoder': {'layers_0': {'attention': {'query': {
      'kernel': jnp.asarray(rng.randn(16, 16), jnp.float32),
      'lora_a': jnp.asarray(rng.randn(4, 2, 16), jnp.float32),
      'router_kernel': jnp.asarray(rng.randn(16, 4), jnp.float32)}}}}}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.randn(*p.shape), jnp.float32), params)

  def deltas(multiplier):
    opt_def = optimizers.adapter_only(
        adafactor.Adafactor(factored=False, multiply_by_parameter_scale=False),
        router_lr_multiplier=multiplier)
    new = opt_def.create(params).apply_gradient(grads, learning_rate=1e-2).target
    return jax.tree.map(lambda a, b: np.asarray(a - b),
                        new, params)['encoder']['layers_0']['attention']['query']

  one, tenth = deltas(1.0), deltas(0.1)
  assert not one['kernel'].any() and not tenth['kernel'].any()   # the base stays frozen
  np.testing.assert_array_equal(tenth['lora_a'], one['lora_a'])
  assert one['router_kernel'].any()
  np.testing.assert_allclose(tenth['router_kernel'], 0.1 * one['router_kernel'], rtol=1e-4,
                             atol=1e-7)
  with pytest.raises(ValueError, match='router_lr_multiplier must be > 0'):
    optimizers.adapter_only(adafactor.Adafactor(), router_lr_multiplier=-1.0)


def test_scanned_model_trains_evaluates_and_infers_like_the_unscanned_one():
  """scan_layers=True under T5X: params axes with 'layers', the same loss, eval loss and beam
  search (T5X reads `module.scan_layers`: the cache's batch axis is then 1), and a partitioned
  train step with the expert-parallel einsum form that trains the adapters only."""
  unrolled = _model()
  scanned = models.SiraEncoderDecoderModel(
      network.Transformer(_config().replace(scan_layers=True)), VOCAB, VOCAB, _optimizer(),
      decode_fn=decoding.beam_search)
  variables = scanned.get_initial_variables(jax.random.PRNGKey(0), SHAPES)
  axes = variables['params_axes']['encoder']['layers']['attention']['query']
  assert axes['lora_a_axes'].names == ('layers', 'expert', 'rank', 'embed')
  params, _ = _params(unrolled)
  scanned_params = scan_layout.to_layout(params, scanned=True)
  batch, rng = _batch(), jax.random.PRNGKey(7)
  loss0, m0 = unrolled.loss_fn(params, batch, rng)
  loss1, m1 = scanned.loss_fn(scanned_params, batch, rng)
  np.testing.assert_allclose(loss1, loss0, rtol=1e-5)
  for name in ('aux_loss', 'router_z_loss', 'dropped_fraction', 'expert_usage_max'):
    np.testing.assert_allclose(m1[name].compute(), m0[name].compute(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(scanned.eval_fn(scanned_params, batch)[0],
                             unrolled.eval_fn(params, batch)[0], rtol=1e-5)
  kw = dict(rng=jax.random.PRNGKey(0), return_all_decodes=True, num_decodes=3)
  beams0, scores0 = unrolled.predict_batch_with_aux(params, _batch(4), **kw)
  beams1, scores1 = scanned.predict_batch_with_aux(scanned_params, _batch(4), **kw)
  np.testing.assert_array_equal(np.asarray(beams1), np.asarray(beams0))
  np.testing.assert_allclose(scores1['scores'], scores0['scores'], rtol=1e-5, atol=1e-5)

  part = moe_partitioning.MoePjitPartitioner(
      num_expert_partitions=4, num_partitions=1,
      logical_axis_rules=partitioning.moe_logical_axis_rules())
  model = models.SiraEncoderDecoderModel(
      network.Transformer(_config('sira', expert_compute='einsum').replace(scan_layers=True,
                                                                          remat_policy='minimal')),
      VOCAB, VOCAB, _optimizer())
  init = t5x_utils.TrainStateInitializer(
      optimizer_def=model.optimizer_def, init_fn=model.get_initial_variables,
      input_shapes=SHAPES, partitioner=part)
  state = init.from_scratch(jax.random.PRNGKey(0))
  lora_a = init.train_state_axes.params['encoder']['layers']['attention']['query']['lora_a']
  assert lora_a == jax.sharding.PartitionSpec(None, 'expert', None, None)
  before = jax.device_get(state.params)
  trainer = t5x_trainer.Trainer(
      model=model, train_state=state, partitioner=part, eval_names=[], summary_dir=None,
      train_state_axes=init.train_state_axes, rng=jax.random.PRNGKey(1),
      learning_rate_fn=lambda step: 1e-2, num_microbatches=None)
  metrics = trainer.train(iter([jax.tree.map(np.asarray, _batch(s)) for s in range(2)]),
                          num_steps=2).result()
  assert {'aux_loss', 'dropped_fraction', 'cross_entropy'} <= set(metrics)
  after = jax.device_get(trainer.train_state.params)
  changed = {'/'.join(str(k.key) for k in p) for (p, x), y in zip(
      jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after))
             if not np.array_equal(x, y)}
  assert changed and all(is_adapter_param(c, trainable=True) for c in changed), changed
