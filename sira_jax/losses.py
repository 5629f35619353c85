"""The training loss, in one place: cross-entropy + output z-loss + routing losses, and its metrics.

Both training paths call `compute_loss`: the project's own trainer (`sira_jax.trainer`) and the T5X
model class (`sira_jax.t5x.models`), so the two cannot drift.

    loss = (sum_t w_t * CE_t + sum_t w_t * z_loss * logsumexp(logits_t)^2) / N
         + aux_factor * aux_loss + router_z_factor * router_z_loss
         + sum over extra parts (factor * part)

  * `w_t` are the target weights (`decoder_loss_weights`; `targets > 0` when absent), CE_t the
    (optionally label-smoothed) cross-entropy of target token t, in nats.
  * `N` is the normaliser. Default (`normalizer=None`): N = sum_t w_t, the number of real target
    tokens in the batch, so the cross-entropy is a *mean per target token*. This is what the
    project's trainer uses and what the T5X class uses by default; it equals T5X's
    `loss_normalizing_factor='NUM_REAL_TARGET_TOKENS'`. A caller may pass another N (e.g. T5X's
    full-batch token count when a batch is split into microbatches, or 1.0 for T5X's plain sum).
  * `aux_loss` and `router_z_loss` are the means over adapted layers of what each layer sows into
    'intermediates' (`sira_jax.routing.routing_statistics`): per layer already a mean over that
    layer's real tokens, so they are per-token-normalised quantities independent of batch size.
    `aux_loss` is 1 when the load is balanced and E at total collapse; `router_z_loss` is
    mean(logsumexp(router_logits)^2).

What the aux factor means: with the mean-per-token cross-entropy above, `aux_factor=0.01` adds 1% of
the balance loss against a per-token cross-entropy (a few nats), the convention of Switch/ST-MoE.
Under T5X's default normalisation (`loss_normalizing_factor=None`: the cross-entropy is *summed*
over the batch's N target tokens), the same factor weighs the balance loss about N times less
relative to the data term (N ~ 10^4-10^6 tokens on a pod batch): to get the same trade-off there
one would have to scale the factor by N. The T5X class (`sira_jax.t5x.models.SiraEncoderDecoderModel`)
avoids this by normalising the cross-entropy by the real target tokens (this function with
`normalizer=None`), so one `aux_factor` means the same in both paths, and one batch's loss under T5X
equals the project trainer's loss on the same params and batch.

Extra loss parts (e.g. a consistency term between two stochastic forward passes) go through the same
call: `extra={'name': (factor, value)}` with `value` either per target token [B, L] (weighted by `w`
and normalised by N exactly like the cross-entropy) or an already-normalised scalar. Each part is
added as `factor * part` and reported, unweighted, under its own name.

Metric names (all scalars): loss, cross_entropy, z_loss, aux_loss, router_z_loss, accuracy,
target_tokens, and, for routed adapters, the layer means of the sown statistics dropped_fraction,
gate_entropy, router_confidence, expert_usage_min, expert_usage_max.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import gin
import jax
import jax.numpy as jnp

ROUTING_STATS = ('aux_loss', 'router_z_loss', 'dropped_fraction', 'expert_usage', 'gate_entropy',
                 'router_confidence')
LOSS_METRICS = ('loss', 'cross_entropy', 'z_loss', 'aux_loss', 'router_z_loss', 'accuracy',
                'target_tokens')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Coefficients of the loss parts.

  z_loss: coefficient of the output z-loss `logsumexp(logits)^2` per target token (T5X uses 1e-4;
    0 disables).
  aux_factor: coefficient of the routers' load-balancing loss (layer mean, 1 at balance).
  router_z_factor: coefficient of the routers' z-loss (layer mean).
  label_smoothing: T5X-style label smoothing of the targets (the smoothed target's entropy is
    subtracted, so a perfect model scores 0).
  consistency_factor: AdaMix's consistency regularisation (Wang et al., 2022): > 0 makes the
    trainer run a second stochastic forward pass (another 'dropout' rng, so other random experts)
    and add `consistency_factor * symmetric_kl(pass 1, pass 2)` per target token (extra part
    'consistency'); 0 (default) runs one pass. adapters/adamix.gin turns it on.
  """
  z_loss: float = 1e-4
  aux_factor: float = 0.01
  router_z_factor: float = 0.001
  label_smoothing: float = 0.0
  consistency_factor: float = 0.0


def cross_entropy_with_z(logits, targets, weights, *, z_loss=0.0, label_smoothing=0.0):
  """Weighted sums of the token cross-entropy and the output z-loss.

  logits [B, L, V] (any float dtype; computed in float32), targets [B, L] int, weights [B, L].
  Returns (ce_sum, z_sum, weight_sum), scalars: sum_t w_t CE_t (nats), sum_t w_t z_loss lse_t^2,
  sum_t w_t.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  lse = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - lse[..., None]
  conf = 1.0 - label_smoothing
  low = label_smoothing / max(vocab - 1, 1)
  soft = jax.nn.one_hot(targets, vocab) * (conf - low) + low
  ce = -jnp.sum(soft * log_probs, axis=-1)
  if label_smoothing:  # subtract the entropy of the smoothed target, so a perfect model scores 0
    ce = ce + (conf * jnp.log(conf) + (vocab - 1) * low * jnp.log(low + 1e-20))
  w = weights.astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(z_loss * jnp.square(lse) * w), jnp.sum(w)


def symmetric_kl(logits_a, logits_b):
  """Per-token symmetric KL divergence between two predictive distributions, in nats.

  logits_a, logits_b: [B, L, V] (computed in float32). Returns [B, L]:
  (KL(p_a || p_b) + KL(p_b || p_a)) / 2 with p = softmax(logits). Zero iff the two distributions
  are equal; gradients flow into both arguments (neither pass is treated as a fixed target).
  """
  la = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
  lb = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
  return 0.5 * jnp.sum((jnp.exp(la) - jnp.exp(lb)) * (la - lb), axis=-1)


# Rank of one layer's value of each statistic (`routing.routing_statistics`): expert_usage is a
# vector over experts, the others scalars. A scanned layer stack sows them with a leading layer
# axis ([num_layers] or [num_layers, E]).
_STAT_RANK = {'expert_usage': 1}


def _per_layer(name: str, value) -> list:
  """One sown value -> a list of per-layer values (a scanned stack's leading axes unstacked)."""
  value = jnp.asarray(value)
  rank = _STAT_RANK.get(name, 0)
  if value.ndim <= rank:
    return [value]
  return list(value.reshape((-1,) + value.shape[value.ndim - rank:]))


def collect_intermediates(intermediates: Mapping[str, Any] | None) -> dict[str, list]:
  """Gathers every sown routing statistic (`ROUTING_STATS`) by name over all layers.

  intermediates: the 'intermediates' collection (nested dicts whose leaves are the tuples that
  `Module.sow` appends to), or None. Returns name -> list of arrays, one per layer and sow: a
  scanned stack's [num_layers, ...] value counts as its num_layers layers, so every layer weighs
  the same in the means whichever layout the model has (`T5Config.scan_layers`).
  """
  found: dict[str, list] = {}

  def visit(tree):
    if isinstance(tree, Mapping):
      for k, v in tree.items():
        if k in ROUTING_STATS and isinstance(v, (tuple, list)):
          found.setdefault(k, []).extend(x for value in v for x in _per_layer(k, value))
        else:
          visit(v)

  visit(flax.core.unfreeze(intermediates) if intermediates is not None else {})
  return found


def routing_metrics(intermediates) -> dict[str, jax.Array]:
  """Layer means of the sown routing statistics (empty for models without routers).

  expert_usage (per layer a vector over experts: the fraction of routed tokens per expert) is
  summarised by the layer means of its smallest and largest share (1/E each at balance).
  """
  out = {}
  for name, vals in collect_intermediates(intermediates).items():
    if not vals:
      continue
    if name == 'expert_usage':
      usage = [v.reshape(-1, v.shape[-1]).mean(0) if v.ndim else v[None] for v in vals]
      shares = [u / jnp.maximum(jnp.sum(u), 1e-9) for u in usage]
      out['expert_usage_min'] = jnp.mean(jnp.stack([s.min() for s in shares]))
      out['expert_usage_max'] = jnp.mean(jnp.stack([s.max() for s in shares]))
      continue
    out[name] = jnp.mean(jnp.stack([jnp.mean(v.astype(jnp.float32)) for v in vals]))
  return out


def compute_loss(logits, targets, weights, intermediates, cfg: LossConfig, *,
                 normalizer=None, extra: Mapping[str, tuple[float, Any]] | None = None):
  """The total loss and its parts (see the module docstring for the formula and normalisation).

  logits [B, L, V]; targets [B, L] int; weights [B, L] or None (then `targets > 0`);
  intermediates: the model's 'intermediates' collection or None; normalizer: N, scalar or None
  (None: the weight sum, i.e. the mean per real target token); extra: name -> (factor, value),
  value [B, L] per target token or a scalar.
  Returns (loss, metrics): a float32 scalar and a dict of float32 scalars named as in
  `LOSS_METRICS` plus the routing metrics and one entry per extra part.
  """
  if weights is None:
    weights = targets > 0
  ce_sum, z_sum, wsum = cross_entropy_with_z(
      logits, targets, weights, z_loss=cfg.z_loss, label_smoothing=cfg.label_smoothing)
  denom = jnp.maximum(wsum, 1.0) if normalizer is None else jnp.asarray(normalizer, jnp.float32)
  ce = ce_sum / denom
  z = z_sum / denom
  rm = routing_metrics(intermediates)
  aux = rm.get('aux_loss', jnp.zeros(()))
  rz = rm.get('router_z_loss', jnp.zeros(()))
  loss = ce + z + cfg.aux_factor * aux + cfg.router_z_factor * rz
  parts = {}
  for name, (factor, value) in (extra or {}).items():
    if name in LOSS_METRICS or name in rm:
      raise ValueError(f'extra loss part {name!r} clashes with a built-in metric name; rename it.')
    value = jnp.asarray(value, jnp.float32)
    if value.ndim:
      value = jnp.sum(value * weights.astype(jnp.float32)) / denom
    parts[name] = value
    loss = loss + factor * value
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * weights
  metrics = dict(rm, **parts, loss=loss, cross_entropy=ce, z_loss=z, aux_loss=aux,
                 router_z_loss=rz, accuracy=jnp.sum(correct) / jnp.maximum(wsum, 1.0),
                 target_tokens=wsum)
  return loss, metrics


def batch_loss(logits, batch: Mapping[str, Any], intermediates, cfg: LossConfig, **kwargs):
  """`compute_loss` on a T5X-style batch ('decoder_target_tokens', optional
  'decoder_loss_weights'); kwargs go to `compute_loss`."""
  return compute_loss(logits, batch['decoder_target_tokens'], batch.get('decoder_loss_weights'),
                      intermediates, cfg, **kwargs)
