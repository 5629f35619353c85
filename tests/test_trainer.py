"""Training loop: a few steps on the bundled suite, eval metrics, mesh invariance (loss: test_losses)."""
import glob
import json
import os

import jax
import numpy as np
import pytest
import seqio
from flax import traverse_util

from sira_jax import eval as eval_lib
from sira_jax import infer as infer_lib
from sira_jax import optim
from sira_jax import lru
from sira_jax import model_init
from sira_jax import train as train_lib
from sira_jax import trainer as trainer_lib
from sira_jax.adapters import trainable_mask
from sira_jax.placement import Placement
from tests import trainer_fixtures as fx


@pytest.fixture(scope='module', autouse=True)
def _task():
  fx.register_fixture_task()


@pytest.mark.slow
def test_few_steps_on_bundled_suite(tmp_path):
  cfg = fx.tiny_config('sira', expert_dropout_rate=0.1)
  res = train_lib.train(
      model_dir=str(tmp_path / 'r'), mixture_or_task_name='offline_suite_mix',
      task_feature_lengths={'inputs': 32, 'targets': 32}, train_steps=3, batch_size=8,
      model_config=cfg, checkpoint_every=100, progress_bar=False, log_every=1,
      mesh_shape={'data': 1}, learning_rate=1e-2)
  assert res.step == 3 and res.stopped_by == 'done'
  m = res.last_metrics
  for k in ('loss', 'cross_entropy', 'z_loss', 'aux_loss', 'router_z_loss', 'dropped_fraction',
            'expert_usage_min', 'expert_usage_max', 'gate_entropy', 'grad_norm'):
    assert k in m and np.isfinite(m[k]), k
  np.testing.assert_allclose(
      m['loss'], m['cross_entropy'] + m['z_loss'] + 0.01 * m['aux_loss'] +
      0.001 * m['router_z_loss'], rtol=1e-5)
  # The first step (compile included) is reported apart and kept out of step_time.
  assert 'first_step_time' in res.history[0] and 'step_time' not in res.history[0]
  assert all('tokens_per_sec' in h and 'step_time' in h for h in res.history[1:])
  assert [h['step'] for h in res.history] == [1, 2, 3]
  assert glob.glob(str(tmp_path / 'r' / 'train' / 'events.out.tfevents.*'))
  # Only adapter/router params are trained and carry optimizer state; the base is untouched.
  names = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(res.state.params)[0]]
  assert names and all(any(n in k for n in ('lora_a', 'lora_b', 'router_kernel')) for k in names)
  assert optim.count_params(res.state.opt_state) <= 2 * optim.count_params(res.state.params)
  init = model_init.init_variables(model_init.build_model(cfg), cfg, 0)['params']
  _, frozen0 = optim.partition_params(init, trainable_mask(init))
  for a, b in zip(jax.tree_util.tree_leaves(frozen0), jax.tree_util.tree_leaves(res.state.frozen)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  trained0, _ = optim.partition_params(init, trainable_mask(init))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(trained0), jax.tree_util.tree_leaves(res.state.params)))


def test_eval_metrics_match_hand_computed_values(tmp_path):
  examples = fx.fixture_examples('validation')
  vocab = seqio.ByteVocabulary()
  lengths = fx.LENGTHS
  # (a) A predictor that answers correctly exactly when the input starts with 'a' or 'b': the
  # evaluator's ordering, EOS handling and metric must give exactly the hand-computed score.
  by_input = {tuple(vocab.encode(a) + [1]): b for a, b in examples}

  def predict(batch):
    out = np.zeros((len(batch['encoder_input_tokens']), lengths['targets']), np.int32)
    for i, row in enumerate(batch['encoder_input_tokens']):
      key = tuple(int(t) for t in row if t)
      if key not in by_input:
        continue  # padding row
      target = by_input[key]
      text = target if vocab.decode(list(key[:-1]))[0] in 'ab' else 'x'
      toks = vocab.encode(text) + [1]
      out[i, :len(toks)] = toks
    return out

  res = eval_lib.evaluate(model_dir=str(tmp_path / 'oracle'), mixture_or_task_name=fx.FIXTURE_TASK,
                          split='validation', task_feature_lengths=lengths, batch_size=5,
                          predict=predict, tensorboard=False)
  n_right = sum(1 for a, _ in examples if a[0] in 'ab')
  assert 0 < n_right < len(examples)
  assert res[fx.FIXTURE_TASK]['exact_match'] == pytest.approx(100.0 * n_right / len(examples))
  # (b) The real pipeline on a trained run: metrics JSON equals the metric recomputed by hand from
  # the predictions JSONL, whose inputs/targets are exactly the fixture's.
  run = str(tmp_path / 'run')
  train_lib.train(model_dir=run, mixture_or_task_name=fx.FIXTURE_TASK, task_feature_lengths=lengths,
                  train_steps=4, batch_size=8, model_config=fx.tiny_config('lora'),
                  progress_bar=False, tensorboard=False, mesh_shape={'data': 1},
                  learning_rate=3e-2)
  res = eval_lib.evaluate(model_dir=run, mixture_or_task_name=fx.FIXTURE_TASK, split='validation',
                          task_feature_lengths=lengths, batch_size=8)
  with open(os.path.join(run, 'eval', f'metrics_{fx.FIXTURE_TASK}_4_validation.json')) as f:
    saved = json.load(f)
  assert saved['metrics'] == res and saved['step'] == 4
  assert glob.glob(os.path.join(run, 'eval', 'events.out.tfevents.*'))
  [path] = infer_lib.infer(model_dir=run, mixture_or_task_name=fx.FIXTURE_TASK, split='validation',
                           task_feature_lengths=lengths, batch_size=8)
  rows = [json.loads(l) for l in open(path)]
  assert [(r['inputs'], r['targets']) for r in rows] == examples
  by_hand = 100.0 * np.mean([r['prediction'] == r['targets'] for r in rows])
  assert res[fx.FIXTURE_TASK]['exact_match'] == pytest.approx(by_hand)


@pytest.mark.skipif(len(jax.devices()) < 8, reason='needs 8 (simulated) devices')
@pytest.mark.slow
def test_same_losses_on_one_device_and_on_a_mesh(tmp_path):
  # Routing groups of one example (16 positions): one device and each of the mesh's 4 batch shards
  # form the same groups (strict_group_size refuses any other layout); with larger groups each
  # shard would form its own (routing.group_layout), routing other tokens together than one device.
  cfg = fx.tiny_config('sira', max_group_size=16, strict_group_size=True)
  kw = dict(mixture_or_task_name=fx.FIXTURE_TASK, task_feature_lengths=fx.LENGTHS, train_steps=2,
            batch_size=8, model_config=cfg, progress_bar=False, tensorboard=False, log_every=1,
            learning_rate=1e-2)
  one = train_lib.train(model_dir=str(tmp_path / 'one'), mesh_shape={'data': 1}, **kw)
  mesh = {'data': 2, 'expert': 2, 'model': 2}
  many = train_lib.train(model_dir=str(tmp_path / 'many'), mesh_shape=mesh, **kw)
  for a, b in zip(one.history, many.history):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=2e-5)
    np.testing.assert_allclose(a['aux_loss'], b['aux_loss'], rtol=2e-5)
  flat = jax.tree_util.tree_flatten_with_path(many.state.params)[0]
  specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in flat}
  assert any('expert' in str(s) for k, s in specs.items() if 'lora' in k), specs


def test_compile_caches_are_bounded_and_keyed_by_devices():
  cache = lru.LRU(2)
  for i in range(5):
    assert cache.get(i, lambda i=i: i) == i
  assert cache.keys() == [3, 4]
  assert cache.get(3, lambda: 'rebuilt') == 3 and cache.keys() == [4, 3]  # a hit refreshes it
  cache.get(5, lambda: 5)
  assert cache.keys() == [3, 5]  # the least recently used went
  # The train-step cache: the same step for the same key and devices, another for another mesh,
  # and at most 4 kept.
  model = model_init.build_model(fx.tiny_config('lora'))
  tx = optim.make_optimizer('adamw', 1e-3)
  loss = trainer_lib.LossConfig()
  one, two = Placement({'data': 1}), Placement({'data': 2})

  def step(placement, key=('run',)):
    return train_lib.compiled_train_step(model, tx, {'name': 'adamw'}, loss, placement, None, key)
  assert step(one) is step(one)
  assert step(two) is not step(one)  # a step compiled for one mesh is never reused on another
  for i in range(6):
    step(one, ('run', i))
  assert len(train_lib._STEP_CACHE.keys()) == 4
  # Parameter init and the dropout stream draw from different keys.
  params_key, dropout_key = model_init.run_keys(0)
  assert not np.array_equal(np.asarray(params_key), np.asarray(dropout_key))


def test_adapter_param_predicate_matches_the_models_params():
  from sira_jax.adapters import is_adapter_param
  cfg = fx.tiny_config('smoe_dropout', num_experts=4, top_k=1)
  params = model_init.abstract_params(model_init.build_model(cfg))
  paths = list(traverse_util.flatten_dict(params))
  names = {p[-1] for p in paths if is_adapter_param(p)}
  assert names == {'lora_a', 'lora_b', 'smoe_router_kernel'}  # never in a base checkpoint
  assert {p[-1] for p in paths if is_adapter_param(p, trainable=True)} == {'lora_a', 'lora_b'}
  assert not is_adapter_param('/encoder/layers_0/attention/query/kernel')
  assert is_adapter_param('/encoder/layers_0/attention/query/router_kernel', trainable=True)
  # trainable_mask is the trainable predicate over a whole tree.
  mask = traverse_util.flatten_dict(trainable_mask(params))
  assert all(mask[p] == is_adapter_param(p, trainable=True) for p in paths)


def test_median_step_time_is_one_rule():
  history = [dict(step=1, first_step_time=9.0), dict(step=10, step_time=0.3),
             dict(step=20, step_time=0.1), dict(step=30, step_time=0.2)]
  assert trainer_lib.median_step_time(history) == pytest.approx(0.2)  # compile step never in it
  assert trainer_lib.median_step_time(history[:1]) is None
