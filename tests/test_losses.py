"""The shared loss (sira_jax.losses): parts, normalisation, extra parts, routing metrics."""
import jax.numpy as jnp
import numpy as np
import pytest

from sira_jax import losses

# One sequence, vocab 3, two target tokens (the second is padding, weight 0).
LOGITS = jnp.array([[[2.0, 0.0, -1.0], [0.0, 5.0, 0.0]]])
TARGETS = jnp.array([[1, 0]])
WEIGHTS = jnp.array([[1, 0]])
LSE0 = np.log(np.exp(2.0) + 1.0 + np.exp(-1.0))
INTER = {'encoder': {'layers_0': {'attention': {'query': {
    'aux_loss': (jnp.array(1.5),), 'router_z_loss': (jnp.array(4.0),),
    'expert_usage': (jnp.array([0.5, 0.25, 0.25, 0.0]),)}}}},
    'decoder': {'layers_0': {'mlp': {'wi': {
        'aux_loss': (jnp.array(2.5),), 'router_z_loss': (jnp.array(2.0),),
        'expert_usage': (jnp.array([0.25, 0.25, 0.25, 0.25]),)}}}}}


def test_compute_loss_matches_hand_computation():
  cfg = losses.LossConfig(z_loss=0.1, aux_factor=0.01, router_z_factor=0.001)
  loss, m = losses.compute_loss(LOGITS, TARGETS, WEIGHTS, INTER, cfg)
  ce = LSE0 - 0.0                      # target 1 has logit 0
  z = 0.1 * LSE0 ** 2
  aux, rz = (1.5 + 2.5) / 2, (4.0 + 2.0) / 2
  np.testing.assert_allclose(m['cross_entropy'], ce, rtol=1e-6)
  np.testing.assert_allclose(m['z_loss'], z, rtol=1e-6)
  np.testing.assert_allclose(m['aux_loss'], aux, rtol=1e-6)
  np.testing.assert_allclose(m['router_z_loss'], rz, rtol=1e-6)
  np.testing.assert_allclose(loss, ce + z + 0.01 * aux + 0.001 * rz, rtol=1e-6)
  np.testing.assert_allclose(m['loss'], loss)
  np.testing.assert_allclose(m['expert_usage_max'], (0.5 + 0.25) / 2, rtol=1e-6)
  np.testing.assert_allclose(m['expert_usage_min'], (0.0 + 0.25) / 2, rtol=1e-6)
  assert float(m['accuracy']) == 0.0 and float(m['target_tokens']) == 1.0
  # A batch dict goes through the same computation; weights default to targets > 0.
  loss_b, _ = losses.batch_loss(LOGITS, {'decoder_target_tokens': TARGETS}, INTER, cfg)
  np.testing.assert_allclose(loss_b, loss, rtol=1e-6)


def test_normalisation_mean_per_token_vs_given_normalizer():
  cfg = losses.LossConfig(z_loss=0.0, aux_factor=0.5, router_z_factor=0.0)
  logits = jnp.tile(LOGITS, (3, 1, 1))
  targets = jnp.array([[1, 0], [1, 2], [0, 0]])
  weights = jnp.array([[1, 0], [1, 1], [0, 0]])
  mean_loss, m = losses.compute_loss(logits, targets, weights, INTER, cfg)
  ce_tok = np.array([LSE0 - 0.0, LSE0 - 0.0, np.log(2 + np.exp(5.0))])  # the three real tokens
  np.testing.assert_allclose(m['cross_entropy'], ce_tok.mean(), rtol=1e-6)
  np.testing.assert_allclose(mean_loss, ce_tok.mean() + 0.5 * 2.0, rtol=1e-6)
  # T5X's plain sum (normalizer 1): the cross-entropy is summed, the routing losses are not.
  sum_loss, _ = losses.compute_loss(logits, targets, weights, INTER, cfg, normalizer=1.0)
  np.testing.assert_allclose(sum_loss, ce_tok.sum() + 0.5 * 2.0, rtol=1e-6)


def test_extra_parts_per_token_and_scalar():
  cfg = losses.LossConfig(z_loss=0.0, aux_factor=0.0, router_z_factor=0.0)
  base, _ = losses.compute_loss(LOGITS, TARGETS, WEIGHTS, None, cfg)
  per_token = jnp.array([[3.0, 100.0]])  # the padding token's value is ignored
  loss, m = losses.compute_loss(LOGITS, TARGETS, WEIGHTS, None, cfg,
                                extra={'consistency': (0.5, per_token), 'other': (2.0, 0.25)})
  np.testing.assert_allclose(m['consistency'], 3.0)
  np.testing.assert_allclose(m['other'], 0.25)
  np.testing.assert_allclose(loss, base + 0.5 * 3.0 + 2.0 * 0.25, rtol=1e-6)
  with pytest.raises(ValueError, match='clashes'):
    losses.compute_loss(LOGITS, TARGETS, WEIGHTS, None, cfg, extra={'aux_loss': (1.0, 0.0)})


def test_no_routers_no_routing_metrics_and_label_smoothing_floor():
  cfg = losses.LossConfig(z_loss=0.0, label_smoothing=0.1)
  # A model whose probabilities equal the smoothed target scores 0.
  vocab, conf = 3, 0.9
  probs = np.array([0.05, conf, 0.05])
  logits = jnp.log(jnp.asarray(probs))[None, None, :]
  loss, m = losses.compute_loss(logits, jnp.array([[1]]), None, {}, cfg)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  assert 'dropped_fraction' not in m and float(m['aux_loss']) == 0.0 and vocab == logits.shape[-1]
