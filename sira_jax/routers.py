"""Router modules: each mixture kind's routing rule, as a decision the expert forms consume.

Each adapter kind with experts has one router class here (the flaxformer shape: one class per
routing rule over a shared `Router` base). `AdaptedDense` calls its kind's router, hands the
decision to an expert form of `sira_jax.experts`, and scales the delta; the forms never know
which router decided. A new routing rule is a new class registered in `ROUTERS` (its key is the
new `AdapterConfig.kind`); the expert forms and the layer stay as they are.

  Router                 base: the config and the layer's facts a router may need.
    TokenRouter          a float32 router over grouped tokens [G, T, d_in] that emits
                         `routing.RoutingInstructions`: router-input jitter, logits (optionally
                         fused with the dense form's A matmul), expert dropout, softmax,
                         `routing.top_k_routing` with per-group capacity (docs/capacity.md), the
                         routing statistics sown. Subclasses say which weights, how many choices,
                         which capacity factor and which choices are active.
      SiraRouter         SiRA: trained `router_kernel`, top-k with capacity, expert dropout.
      MoLoRARouter       MoLoRA: trained `router_kernel`, every expert weighted by the softmax
                         (K = E, no capacity).
      SMoEDropoutRouter  SMoE-Dropout: fixed random `smoe_router_kernel`, K = E choices of which
                         the k_t best are active, k_t growing from top_k to E over training;
                         the active gates renormalised.
    AdaMixRouter         AdaMix: no per-token routing; one random expert for A and one for B per
                         training forward pass, the experts' mean at inference
                         (`routing.AdapterChoice`).

Routers share their layer's variable scope (`AdaptedDense` calls `nn.share_scope`): their params,
the 'schedule' variable and the sown statistics live in the layer's own scope, at the paths
checkpoints, partitioning rules and loaders use: `router_kernel`, `smoe_router_kernel`,
`schedule/progress`, `intermediates/<statistic>`. The router's random draws come from the layer's
'dropout' stream.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sira_jax import experts as experts_lib
from sira_jax import partitioning
from sira_jax import routing

Array = jax.Array

SCHEDULE_COLLECTION = 'schedule'
# The trained router's param name: the one place that knows it (`is_router_param`; the optimizers'
# router learning-rate multiplier finds router params through it).
ROUTER_PARAM = 'router_kernel'


def is_router_param(path) -> bool:
  """True for a trained router's weights (`ROUTER_PARAM`). path: a sequence of names (e.g. a
  `flax.traverse_util.flatten_dict` key) or a '/'-joined string (a T5X traversal's path)."""
  names = path.strip('/').split('/') if isinstance(path, str) else [str(n) for n in path]
  return ROUTER_PARAM in names


class Router(nn.Module):
  """Base of every router.

  Attributes:
    config: the layer's `sira_jax.adapters.AdapterConfig` (untyped here: adapters imports this
      module).
    input_axis: logical name of the layer's input feature axis (router weight sharding).
    allow_batch_priority: False in decoder layers, where batch-prioritised routing would let a
      later token take an earlier token's slot.
  """
  config: Any
  input_axis: str = 'embed'
  allow_batch_priority: bool = True


class TokenRouter(Router):
  """Routes each token to K of E experts: [G, T, d_in] -> `RoutingInstructions`."""

  @property
  def num_selected(self) -> int:
    """K, choices per token."""
    raise NotImplementedError

  def capacity_factor(self, enable_dropout: bool) -> Optional[float]:
    """cf of this mode; None: no drops (c_g = C = T)."""
    del enable_dropout
    return None

  def router_kernel(self, d_in: int) -> Array:
    """The router weights, [d_in, E] float32 (a param of the layer's scope)."""
    raise NotImplementedError

  def num_active(self, enable_dropout: bool) -> Optional[Array]:
    """How many of the K ranked choices are active (int scalar, may be traced); None: all."""
    del enable_dropout
    return None

  def expert_dropout_rate(self, enable_dropout: bool) -> float:
    """Rate of expert dropout in this mode (`AdapterConfig.expert_dropout_placement`)."""
    del enable_dropout
    return 0.0

  @property
  def renormalize(self) -> bool:
    """Rescale each token's active gates to sum to 1."""
    return self.config.renormalize_gates

  @nn.compact
  def __call__(self, router_in: Array, token_mask: Array, *, enable_dropout: bool,
               fused_weight: Optional[Array] = None) -> tuple[routing.RoutingInstructions,
                                                              Optional[Array]]:
    """Routes G groups of T tokens.

    Args:
      router_in: [G, T, d_in] float32 router input.
      token_mask: [G, T] bool, False for padding (never routed, takes no slot, never counted).
      enable_dropout: training mode (jitter, expert dropout, the training capacity factor).
      fused_weight: optional [n, d_in] float32 weight the caller wants applied to the same
        tokens: computed in the router's matmul (one matmul of width E + n instead of a narrow
        float32 router matmul and a second one) unless jitter changes the router input.

    Returns:
      (instructions, fused): the routing decision, and router_in @ fused_weight^T [G, T, n]
      when it was fused (None otherwise).
    """
    cfg = self.config
    e, k = cfg.num_experts, self.num_selected
    num_active = self.num_active(enable_dropout)
    jitter = enable_dropout and cfg.router_jitter > 0
    if jitter:
      router_in = router_in * jax.random.uniform(
          self.make_rng('dropout'), router_in.shape, jnp.float32,
          1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
    kernel = self.router_kernel(router_in.shape[-1])
    fused = None
    if fused_weight is not None and not jitter:
      both = experts_lib.token_matmul(
          router_in, jnp.concatenate([kernel.T, fused_weight], axis=0), transpose_w=True)
      logits, fused = both[..., :e], both[..., e:]
    else:
      logits = experts_lib.token_matmul(router_in, kernel)
    logits = partitioning.with_logical_constraint(logits, ('batch', None, 'unmodeled'))

    rate = self.expert_dropout_rate(enable_dropout)
    routing_logits, choice_keep = logits, None
    if rate > 0 and cfg.expert_dropout_placement == 'logits':
      dropped = jax.random.bernoulli(self.make_rng('dropout'), rate, logits.shape)
      # A large negative offset, not -inf: order and finiteness survive even when every expert
      # of a token is dropped.
      routing_logits = logits - 1e9 * dropped
    probs = jax.nn.softmax(routing_logits, axis=-1)
    if rate > 0 and cfg.expert_dropout_placement == 'gate':
      choice_keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - rate,
                                         probs.shape[:2] + (k,))

    cf = self.capacity_factor(enable_dropout)
    instructions = routing.top_k_routing(
        probs, token_mask, num_selected=k,
        capacity=routing.expert_capacity(token_mask.shape[1], e, k, cf, cfg.min_expert_capacity),
        group_capacity=routing.group_capacity(token_mask, e, k, cf, cfg.min_expert_capacity,
                                              cfg.capacity_counts),
        renormalize=self.renormalize, choice_keep=choice_keep, num_active=num_active,
        batch_prioritized=cfg.batch_prioritized_routing and self.allow_batch_priority)
    if choice_keep is not None and cfg.expert_dropout_rescale:
      instructions = instructions.replace(weight=instructions.weight / (1.0 - rate))

    for name, value in routing.routing_statistics(logits, probs, instructions,
                                                  token_mask).items():
      self.sow('intermediates', name, value)
    return instructions, fused


class _TrainedRouter(TokenRouter):
  """A trained float32 `router_kernel` (normal init, `router_init_stddev`) with expert dropout."""

  def router_kernel(self, d_in: int) -> Array:
    return self.param(ROUTER_PARAM, nn.with_logical_partitioning(
        nn.initializers.normal(self.config.router_init_stddev), (self.input_axis, 'unmodeled')),
                      (d_in, self.config.num_experts), jnp.float32)

  def expert_dropout_rate(self, enable_dropout: bool) -> float:
    return self.config.expert_dropout_rate if enable_dropout else 0.0


class SiraRouter(_TrainedRouter):
  """SiRA: the top-k experts of a trained router, at most c_g tokens per expert and group."""

  @property
  def num_selected(self) -> int:
    return self.config.top_k

  def capacity_factor(self, enable_dropout: bool) -> Optional[float]:
    cfg = self.config
    return cfg.capacity_factor if enable_dropout else cfg.eval_capacity_factor


class MoLoRARouter(_TrainedRouter):
  """MoLoRA: every expert for every token, weighted by the router softmax (no capacity)."""

  @property
  def num_selected(self) -> int:
    return self.config.num_experts


class SMoEDropoutRouter(TokenRouter):
  """SMoE-Dropout: a fixed random router and k_t = top_k + round(progress * (E - top_k)) active
  experts in training (`smoe_eval_num_experts`, default E, at evaluation); the gates are the
  softmax renormalised over the active experts."""

  @property
  def num_selected(self) -> int:
    return self.config.num_experts

  @property
  def renormalize(self) -> bool:
    return True

  def router_kernel(self, d_in: int) -> Array:
    return jax.lax.stop_gradient(self.param(
        'smoe_router_kernel', nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, 'fan_in', 'normal'),
            (self.input_axis, 'unmodeled')), (d_in, self.config.num_experts), jnp.float32))

  def num_active(self, enable_dropout: bool) -> Array | int:
    cfg = self.config
    progress = self.progress()  # Created at init even in eval mode.
    if not enable_dropout:
      return cfg.smoe_eval_num_experts or cfg.num_experts
    return cfg.top_k + jnp.round(progress * (cfg.num_experts - cfg.top_k)).astype(jnp.int32)

  def progress(self) -> Array:
    """Training progress in [0, 1], read from the 'schedule' collection.

    The trainer sets it each step (`adapters.with_training_progress`); when the collection is
    absent (a caller that does not know it), progress is 1: all E experts.
    """
    if self.is_initializing() or self.has_variable(SCHEDULE_COLLECTION, 'progress'):
      progress = self.variable(SCHEDULE_COLLECTION, 'progress',
                               lambda: jnp.ones((), jnp.float32)).value
    else:
      progress = jnp.ones((), jnp.float32)
    return jnp.clip(progress, 0.0, 1.0)


class AdaMixRouter(Router):
  """AdaMix: in training one random expert for A and, drawn separately, one for B, the same for
  every token of the forward pass; at inference the experts' mean (a mergeable LoRA)."""

  @nn.compact
  def __call__(self, *, enable_dropout: bool) -> routing.AdapterChoice:
    if not enable_dropout:
      return routing.AdapterChoice()
    key_a, key_b = jax.random.split(self.make_rng('dropout'))
    e = self.config.num_experts
    return routing.AdapterChoice(a_index=jax.random.randint(key_a, (), 0, e),
                                 b_index=jax.random.randint(key_b, (), 0, e))


# Adapter kind -> router class. Its order fixes `adapters.ADAPTER_KINDS` after 'none' and 'lora'.
ROUTERS: dict[str, type[Router]] = {
    'sira': SiraRouter,
    'molora': MoLoRARouter,
    'adamix': AdaMixRouter,
    'smoe_dropout': SMoEDropoutRouter,
}
