"""AdaMix's consistency regularisation: two stochastic passes, their symmetric KL in the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sira_jax import losses
from sira_jax.adapters import AdapterConfig
from sira_jax import model_init
from sira_jax import trainer as trainer_lib
from tests.trainer_fixtures import tiny_config

CFG = losses.LossConfig(z_loss=0.0, aux_factor=0.0, router_z_factor=0.0, consistency_factor=1.0)
BATCH = {
    'encoder_input_tokens': jnp.array([[5, 6, 7, 1], [8, 9, 1, 0]], jnp.int32),
    'decoder_input_tokens': jnp.array([[0, 10, 11, 12], [0, 13, 14, 0]], jnp.int32),
    'decoder_target_tokens': jnp.array([[10, 11, 12, 1], [13, 14, 1, 0]], jnp.int32),
}
BATCH['decoder_loss_weights'] = (BATCH['decoder_target_tokens'] > 0).astype(jnp.float32)


def _model(num_experts):
  cfg = tiny_config('adamix', num_experts=num_experts).replace(
      adapter_targets=('*/query', '*/value', '*/mlp/wo'))
  model = model_init.build_model(cfg)
  variables = model_init.init_variables(model, cfg)
  # lora_b starts at zero (no delta, no gradient into lora_a): give every expert its own B.
  flat = traverse_util.flatten_dict(variables['params'])
  for i, k in enumerate(sorted(flat)):
    if k[-1] == 'lora_b':
      flat[k] = 0.3 * jax.random.normal(jax.random.PRNGKey(i), flat[k].shape)
  return model, dict(variables, params=traverse_util.unflatten_dict(flat))


def test_symmetric_kl():
  a = jnp.array([[[1.0, 0.0, -1.0]]])
  b = jnp.array([[[0.0, 2.0, 0.0]]])
  pa, pb = jax.nn.softmax(a), jax.nn.softmax(b)
  want = 0.5 * (jnp.sum(pa * jnp.log(pa / pb)) + jnp.sum(pb * jnp.log(pb / pa)))
  np.testing.assert_allclose(losses.symmetric_kl(a, b)[0, 0], want, rtol=1e-6)
  np.testing.assert_allclose(losses.symmetric_kl(a, a + 3.0), 0.0, atol=1e-7)


def _loss_fn(model, cfg=CFG):
  return jax.jit(lambda v, key_a, key_b: trainer_lib.training_loss(model, v, BATCH, key_a, cfg,
                                                                   rng_b=key_b))


@pytest.mark.slow
def test_consistency_is_zero_when_both_passes_pick_the_same_experts():
  key_a, key_b = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  # One expert per site: different rngs, necessarily the same experts in both passes.
  model, variables = _model(1)
  _, m = _loss_fn(model)(variables, key_a, key_b)
  assert float(m['consistency']) == 0.0
  # Four experts, the same rng: the same random experts in both passes.
  model, variables = _model(4)
  loss_fn = _loss_fn(model)
  _, m = loss_fn(variables, key_a, key_a)
  assert float(m['consistency']) == 0.0
  # Four experts, other rngs: other experts somewhere, a positive penalty added to the loss.
  loss, m = loss_fn(variables, key_a, key_b)
  assert float(m['consistency']) > 1e-6
  np.testing.assert_allclose(loss, m['cross_entropy'] + m['consistency'], rtol=1e-6)
  # Off (factor 0): one pass, no extra part.
  _, m0 = _loss_fn(model, losses.LossConfig(consistency_factor=0.0))(variables, key_a, key_b)
  assert 'consistency' not in m0


def test_consistency_gradient_flows_into_both_passes_experts():
  model, variables = _model(4)
  key_a, key_b = jax.random.PRNGKey(1), jax.random.PRNGKey(2)

  def a_grads(grad_fn, *args):
    g = grad_fn(variables['params'], *args)
    return {k: np.abs(np.asarray(v)).reshape(v.shape[0], -1).sum(1)
            for k, v in traverse_util.flatten_dict(g).items() if k[-1] == 'lora_a'}

  @jax.jit
  @jax.grad
  def pass_output(params, key):  # d(sum of one pass's logits) / d params
    return jnp.sum(model.apply(dict(variables, params=params), *trainer_lib.model_inputs(BATCH),
                               enable_dropout=True, rngs={'dropout': key},
                               mutable=['intermediates'])[0])

  @jax.jit
  @jax.grad
  def consistency(params):
    return trainer_lib.training_loss(model, dict(variables, params=params), BATCH, key_a, CFG,
                                     rng_b=key_b)[1]['consistency']

  used_a = {k: g > 0 for k, g in a_grads(pass_output, key_a).items()}   # experts pass 1 used
  used_b = {k: g > 0 for k, g in a_grads(pass_output, key_b).items()}   # experts pass 2 used
  cons = a_grads(consistency)
  differ = 0
  for k in cons:
    assert used_a[k].sum() == 1 and used_b[k].sum() == 1  # one random A expert per pass and site
    differ += int((used_a[k] != used_b[k]).any())
    # Every expert either pass used gets a consistency gradient; no other expert does.
    np.testing.assert_array_equal(cons[k] > 0, used_a[k] | used_b[k])
  assert differ > 0  # some site picked different experts in the two passes


def test_adamix_gin_turns_consistency_on():
  import gin
  from sira_jax import gin_utils
  gin.clear_config()
  try:
    gin_utils.parse_gin(['adapters/adamix.gin'], [], ('.', gin_utils.PROJECT_GIN_DIR))
    assert losses.LossConfig().consistency_factor == 1.0
    assert AdapterConfig(kind='adamix').identical_expert_init is False  # unscoped default
    with gin.config_scope('adapter'):
      assert AdapterConfig().kind == 'adamix'
      assert AdapterConfig().identical_expert_init is True  # as AdaMix's published code
  finally:
    gin.clear_config()
  assert losses.LossConfig().consistency_factor == 0.0
