"""The router learning-rate multiplier (optim.make_optimizer's router_lr_multiplier) and the router
init option (AdapterConfig.router_init_stddev)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sira_jax import optim
from sira_jax import routers
from sira_jax.adapters import AdaptedDense
from sira_jax.adapters import AdapterConfig


def _params_and_grads():
  """Trainable params at the paths an adapted layer has, and gradients for them."""
  rng = np.random.RandomState(0)
  shapes = {('encoder', 'layers_0', 'attention', 'query', 'lora_a'): (4, 2, 16),
            ('encoder', 'layers_0', 'attention', 'query', 'lora_b'): (4, 2, 16),
            ('encoder', 'layers_0', 'attention', 'query', 'router_kernel'): (16, 4),
            ('decoder', 'layers_0', 'mlp', 'wo', 'router_kernel'): (16, 4)}
  from flax import traverse_util
  params = traverse_util.unflatten_dict(
      {k: jnp.asarray(rng.randn(*s), jnp.float32) for k, s in shapes.items()})
  grads = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.randn(*p.shape), jnp.float32), params)
  return params, grads


def _update(tx, params, grads):
  """The first update of `tx` from `params`."""
  return tx.update(grads, tx.init(params), params)[0]


def _is_router(path):
  return routers.is_router_param([getattr(k, 'key', k) for k in path])


@pytest.mark.parametrize('name', ['sgd', 'adamw', 'adafactor'])
@pytest.mark.parametrize('multiplier', [0.1, 10.0])
def test_router_multiplier_scales_exactly_the_router_updates(name, multiplier):
  params, grads = _params_and_grads()
  kw = dict(learning_rate=1e-2, weight_decay=0.01 if name == 'adamw' else 0.0)
  base = _update(optim.make_optimizer(name, **kw), params, grads)
  scaled = _update(optim.make_optimizer(name, router_lr_multiplier=multiplier, **kw),
                   params, grads)
  # From the same params: the router's update is multiplier x the update at multiplier 1 (the
  # same float32 product), every other update is unchanged, bit for bit.
  leaves = jax.tree_util.tree_leaves_with_path(base)
  assert len(leaves) == 4 and sum(_is_router(p) for p, _ in leaves) == 2
  jax.tree_util.tree_map_with_path(
      lambda path, u1, um: np.testing.assert_array_equal(
          np.asarray(um), np.asarray(u1 * multiplier) if _is_router(path) else np.asarray(u1)),
      base, scaled)


def test_router_multiplier_under_sgd_is_the_router_learning_rate():
  params, grads = _params_and_grads()
  m, lr = 0.1, 3e-2
  u = _update(optim.make_optimizer('sgd', learning_rate=lr, router_lr_multiplier=m),
              params, grads)
  jax.tree_util.tree_map_with_path(
      lambda path, upd, g: np.testing.assert_allclose(
          np.asarray(upd), -(lr * m if _is_router(path) else lr) * np.asarray(g), rtol=1e-6),
      u, grads)
  # A schedule is scaled alike.
  u = _update(optim.make_optimizer('sgd', learning_rate=optax.constant_schedule(lr),
                                   router_lr_multiplier=m), params, grads)
  r = u['decoder']['layers_0']['mlp']['wo']['router_kernel']
  np.testing.assert_allclose(
      np.asarray(r), -lr * m * np.asarray(grads['decoder']['layers_0']['mlp']['wo'][
          'router_kernel']), rtol=1e-6)


def test_router_multiplier_one_is_the_plain_optimizer_and_bad_values_are_refused():
  params, _ = _params_and_grads()
  plain = optim.make_optimizer('adamw', learning_rate=1e-3)
  same = optim.make_optimizer('adamw', learning_rate=1e-3, router_lr_multiplier=1.0)
  assert (jax.tree_util.tree_structure(plain.init(params)) ==
          jax.tree_util.tree_structure(same.init(params)))  # old checkpoints restore
  with pytest.raises(ValueError, match='router_lr_multiplier must be > 0'):
    optim.make_optimizer('adamw', learning_rate=1e-3, router_lr_multiplier=0.0)
  labels = optim.param_labels(params)
  assert labels['encoder']['layers_0']['attention']['query'] == {
      'lora_a': 'default', 'lora_b': 'default', 'router_kernel': 'router'}


def test_router_param_names_live_in_one_place():
  assert routers.is_router_param(('a', 'query', routers.ROUTER_PARAM))
  assert routers.is_router_param('encoder/layers_0/query/router_kernel')
  assert not routers.is_router_param('encoder/layers_0/query/smoe_router_kernel')
  assert not routers.is_router_param(('a', 'query', 'lora_a'))


@pytest.mark.parametrize('stddev', [0.0, 0.02, 0.5])
def test_router_init_stddev_sets_the_router_init(stddev):
  cfg = AdapterConfig(kind='sira', rank=2, num_experts=8, top_k=2, router_init_stddev=stddev)
  x = jnp.ones((2, 3, 512), jnp.float32)
  params = nn.unbox(AdaptedDense(16, adapter=cfg).init(jax.random.PRNGKey(0), x)['params'])
  kernel = np.asarray(params[routers.ROUTER_PARAM])
  assert kernel.shape == (512, 8) and kernel.dtype == np.float32
  if stddev == 0.0:
    assert not kernel.any()  # uniform routing at the start
  else:
    assert np.std(kernel) == pytest.approx(stddev, rel=0.05)
    assert abs(np.mean(kernel)) < 0.1 * stddev


def test_train_applies_and_records_the_router_multiplier(tmp_path):
  import json
  import os
  from flax import traverse_util
  from sira_jax import model_init
  from sira_jax import train as train_lib
  from tests import trainer_fixtures as fx
  task = fx.register_fixture_task()
  cfg = fx.tiny_config('sira')

  def one_step(multiplier):
    run = str(tmp_path / f'run_{multiplier}')
    r = train_lib.train(model_dir=run, mixture_or_task_name=task, task_feature_lengths=fx.LENGTHS,
                        train_steps=1, batch_size=8, model_config=cfg, optimizer_name='sgd',
                        learning_rate=0.5, router_lr_multiplier=multiplier, progress_bar=False,
                        tensorboard=False, mesh_shape={'data': 1})
    with open(os.path.join(run, 'run_config.json')) as f:
      recorded = json.load(f)['optimizer']
    return traverse_util.flatten_dict(optim.to_plain_dict(jax.device_get(r.state.params))), recorded

  init = traverse_util.flatten_dict(optim.to_plain_dict(nn.unbox(
      model_init.init_variables(model_init.build_model(cfg), cfg, 0)['params'])))
  (one, rec_one), (tenth, rec_tenth) = one_step(1.0), one_step(0.1)
  # Runs without the option keep their fingerprint; a set multiplier is part of it.
  assert 'router_lr_multiplier' not in rec_one and rec_tenth['router_lr_multiplier'] == 0.1
  routers_seen = 0
  for k, p1 in one.items():
    d1, d10 = np.asarray(p1) - np.asarray(init[k]), np.asarray(tenth[k]) - np.asarray(init[k])
    if routers.is_router_param(k):
      routers_seen += 1
      assert np.abs(d1).max() > 0
      np.testing.assert_allclose(d10, 0.1 * d1, rtol=1e-3, atol=1e-7)
    else:
      np.testing.assert_allclose(d10, d1, rtol=1e-5, atol=1e-7)
  assert routers_seen == len(cfg.adapted_sites())
