"""Adapted projections: a frozen base kernel plus an adapter delta.

`AdaptedDense` computes `y = x W0 + delta(x)` for one of the adapter kinds:

  none          no adapter: y = x W0.
  lora          delta = (alpha/r) * B A x (Hu et al., 2021).
  sira          sparse mixture of E LoRA experts: a float32 router picks the
                top-k experts per token, each expert takes at most C tokens per
                group, a dropped choice contributes nothing (the token keeps
                the base path). delta = (alpha/r) sum_{i in TopK} g_i B_i A_i x.
  molora        dense soft mixture: every expert for every token, weighted by
                the router softmax (k = E, no capacity).
  adamix        training: one random expert per forward pass, chosen separately
                for the A and the B side (Wang et al., 2022); inference: the
                experts' A and B averaged into one LoRA (mergeable).
  smoe_dropout  a fixed random router (never trained) and a number of active
                experts that grows linearly over training from `top_k` to E
                (Chen et al., 2023); gates are the softmax over the active
                experts; evaluation uses `smoe_eval_num_experts` (default E).

Each mixture kind has a router module (`sira_jax.routers`): the layer calls it,
then hands its decision to an expert form of `sira_jax.experts` (or, for
AdaMix, to `experts.chosen_lora_delta`), then scales the delta. The per-token
routers all go through `sira_jax.routing.top_k_routing`.

Documented defaults (each a field below):
  * gate normalisation: top-k softmax probabilities, not renormalised
    (`renormalize_gates=False`, the flaxformer convention).
  * capacity (docs/capacity.md): group g of T <= max_group_size positions with
    n_g real tokens fills at most c_g = min(T, max(min_expert_capacity,
    ceil(k * cf * n_g / E))) slots per expert (`capacity_counts=
    'real_tokens'`), so the effective capacity factor does not depend on how
    much padding a batch has; buffers keep the static size C (c_g with n_g = T).
    `capacity_counts='positions'` counts all T positions, padding included
    (c_g = C, flaxformer's rule). cf = 1.25 in training; evaluation is no-drop
    (`eval_capacity_factor=None`), which makes one example's eval output
    independent of the other examples in its batch and keeps cached decoding
    equal to full recomputation.
  * aux loss: E * sum_e f_e P_e over real tokens (1 at balance), see
    `sira_jax.routing.routing_statistics`.
  * expert dropout: on the gate values after top-k (`expert_dropout_placement=
    'gate'`), a dropped choice is not dispatched; kept gates are rescaled by
    1/(1-rate) like inverted dropout. Alternative 'logits': whole experts are
    masked per token before softmax/top-k, so the token picks others.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from sira_jax import cost_model
from sira_jax import experts as experts_lib
from sira_jax import partitioning
from sira_jax import routers
from sira_jax import routing

Array = jax.Array
Initializer = Callable[..., Array]

# 'none', 'lora', then one kind per router class (`routers.ROUTERS`): sira, molora, adamix,
# smoe_dropout.
ADAPTER_KINDS = ('none', 'lora') + tuple(routers.ROUTERS)
# The kinds routed per token (their router emits `routing.RoutingInstructions`).
ROUTED_KINDS = tuple(kind for kind, router in routers.ROUTERS.items()
                     if issubclass(router, routers.TokenRouter))
TRAINABLE_PARAM_NAMES = ('lora_a', 'lora_b', 'router_kernel')
SCHEDULE_COLLECTION = routers.SCHEDULE_COLLECTION


@gin.configurable
@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Every knob of an adapted projection.

  Attributes:
    kind: one of ADAPTER_KINDS.
    rank: r, rank of each LoRA adapter / expert.
    alpha: LoRA scale numerator; delta is scaled by alpha / r. None: alpha = r.
    dropout_rate: dropout on the adapter's input (LoRA dropout), training only.
    num_experts: E (mixture kinds).
    top_k: k, experts per token (sira); starting number of active experts
      (smoe_dropout).
    renormalize_gates: rescale each token's kept top-k gates to sum to 1.
    capacity_factor: training capacity factor cf (sira).
    eval_capacity_factor: evaluation capacity factor; None = no drop.
    capacity_counts: what a group's capacity is counted over (docs/capacity.md):
      'real_tokens' (default), its n_g real tokens: c_g = min(T,
      max(min_expert_capacity, ceil(k * cf * n_g / E))); 'positions', all T
      positions, padding included (flaxformer's rule, for parity): c_g = C.
    min_expert_capacity: lower bound on the capacity.
    max_group_size: the most tokens per routing group T (capacity is per group). On a mesh
      each batch shard's tokens form their own groups, so the group count G is a multiple of
      the batch shards (data x expert) and T may be smaller (`routing.group_layout`): 256
      tokens on data 4 x expert 2 with max_group_size 64 route in 8 groups of 32.
    strict_group_size: refuse a mesh on which the groups would differ from one device's
      (G = ceil(N / max_group_size) groups of T positions, padding at the end) instead of letting
      each batch shard form its own groups, so a run routes the same tokens together on any mesh;
      the error names the max_group_size that fits (flaxformer's option of the same name).
    batch_prioritized_routing: slots go to tokens with larger top-1 gate
      first (encoder only; decoder layers disable it).
    router_jitter: eps of the multiplicative U(1-eps, 1+eps) noise on the
      router input in training.
    expert_dropout_rate: SiRA's expert dropout rate (training only).
    expert_dropout_placement: 'gate' (after top-k, per choice) or 'logits'
      (before top-k, whole experts per token).
    expert_dropout_rescale: divide kept gates by (1 - rate) ('gate' only).
    expert_compute: 'auto' (default: `cost_model.choose_form` picks per layer
      from its shapes, the bound mesh and the backend), 'dense' (dense-in-rank,
      a LoRA of rank E*r), 'gather' (index form, flat in E) or 'einsum'
      (one-hot dispatch/combine, expert parallel over the 'expert' mesh axis).
    smoe_eval_num_experts: active experts at evaluation (smoe_dropout);
      None = E.
    router_init_stddev: stddev of the normal init of the trained router.
    identical_expert_init: every expert's A starts from one draw (B starts
      at zero for all kinds), as in AdaMix's published code, which deep-copies
      one LoRA into its experts; only then does AdaMix's inference adapter (the
      mean of the A's times the mean of the B's) equal every expert at the
      start. adapters/adamix.gin turns it on. False: one independent draw per
      expert.
  """
  kind: str = 'none'
  rank: int = 4
  alpha: Optional[float] = None
  dropout_rate: float = 0.0
  num_experts: int = 4
  top_k: int = 2
  renormalize_gates: bool = False
  capacity_factor: float = 1.25
  eval_capacity_factor: Optional[float] = None
  capacity_counts: str = 'real_tokens'
  min_expert_capacity: int = 4
  max_group_size: int = 1024
  strict_group_size: bool = False
  batch_prioritized_routing: bool = False
  router_jitter: float = 0.0
  expert_dropout_rate: float = 0.0
  expert_dropout_placement: str = 'gate'
  expert_dropout_rescale: bool = True
  expert_compute: str = 'auto'
  smoe_eval_num_experts: Optional[int] = None
  router_init_stddev: float = 0.02
  identical_expert_init: bool = False

  def __post_init__(self):
    def fail(field, problem, fix):
      raise ValueError(f'AdapterConfig.{field}: {problem}. {fix}')
    kinds = ('none', 'lora') + tuple(routers.ROUTERS)  # Read now: a router registered later counts.
    if self.kind not in kinds:
      fail('kind', f'unknown adapter kind {self.kind!r}', f'Use one of {kinds}.')
    if self.rank < 1:
      fail('rank', f'must be >= 1, got {self.rank}', 'Set rank to e.g. 4.')
    if self.kind in routers.ROUTERS:
      if self.num_experts < 1:
        fail('num_experts', f'must be >= 1, got {self.num_experts}',
             'Set num_experts to e.g. 4.')
    if self.kind in ('sira', 'smoe_dropout') and not (
        1 <= self.top_k <= self.num_experts):
      fail('top_k', f'k={self.top_k} must be in [1, num_experts='
           f'{self.num_experts}]', 'Lower top_k or raise num_experts.')
    for name in ('capacity_factor', 'eval_capacity_factor'):
      value = getattr(self, name)
      if value is not None and value <= 0:
        fail(name, f'must be > 0, got {value}',
             'Use e.g. 1.25 (or None at evaluation for no-drop routing).')
    for name in ('dropout_rate', 'expert_dropout_rate'):
      if not 0.0 <= getattr(self, name) < 1.0:
        fail(name, f'must be in [0, 1), got {getattr(self, name)}',
             'Use e.g. 0.1.')
    if not 0.0 <= self.router_jitter < 1.0:
      fail('router_jitter', f'must be in [0, 1), got {self.router_jitter}',
           'Use 0 (off) or e.g. 0.01.')
    if self.capacity_counts not in routing.CAPACITY_COUNTS:
      fail('capacity_counts', f'unknown rule {self.capacity_counts!r}',
           f'Use one of {routing.CAPACITY_COUNTS} (docs/capacity.md).')
    if self.expert_dropout_placement not in ('gate', 'logits'):
      fail('expert_dropout_placement',
           f'unknown placement {self.expert_dropout_placement!r}',
           "Use 'gate' or 'logits'.")
    if self.expert_compute not in ('auto',) + tuple(experts_lib.EXPERT_FORMS):
      fail('expert_compute', f'unknown form {self.expert_compute!r}',
           f"Use 'auto' or one of {tuple(experts_lib.EXPERT_FORMS)}.")
    if self.min_expert_capacity < 1 or self.max_group_size < 1:
      fail('min_expert_capacity/max_group_size', 'must be >= 1',
           'Use e.g. 4 and 1024.')
    if self.smoe_eval_num_experts is not None and not (
        1 <= self.smoe_eval_num_experts <= self.num_experts):
      fail('smoe_eval_num_experts', f'must be in [1, {self.num_experts}]',
           'Use None for all experts.')

  @property
  def scale(self) -> float:
    """alpha / r."""
    return (self.rank if self.alpha is None else self.alpha) / self.rank

  @property
  def num_expert_weights(self) -> int:
    """How many LoRA weight pairs the adapter stores (0 for 'none')."""
    if self.kind == 'none':
      return 0
    return 1 if self.kind == 'lora' else self.num_experts


def _lora_a_init(key, shape, dtype=jnp.float32):
  """PEFT/kaiming-uniform init of A ([..., r, d_in]): U(+-1/sqrt(d_in))."""
  bound = 1.0 / jnp.sqrt(shape[-1])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _identical_over_experts(init: Initializer) -> Initializer:
  """`init` drawn once for [r, d] and copied to every expert: [E, r, d]."""
  def copied(key, shape, dtype=jnp.float32):
    return jnp.broadcast_to(init(key, shape[1:], dtype), shape)
  return copied


class AdaptedDense(nn.Module):
  """y = x @ kernel + adapter delta.  x: [..., d_in] -> [..., features].

  Params (in this module's scope): `kernel` [d_in, features] (the base, frozen
  by stop_gradient unless freeze_base=False); `lora_a` [E, r, d_in] and
  `lora_b` [E, r, features] (E omitted for 'lora'); `router_kernel` [d_in, E]
  (float32, trained: sira, molora); `smoe_router_kernel` [d_in, E] (float32,
  fixed: smoe_dropout). The router params and smoe_dropout's
  'schedule/progress' belong to the kind's router (`routers.ROUTERS`), which
  shares this module's scope.

  Sown into 'intermediates' (routed kinds, by the router): aux_loss,
  router_z_loss, dropped_fraction, expert_usage [E], gate_entropy,
  router_confidence, over real tokens only.
  """
  features: int
  adapter: AdapterConfig = AdapterConfig()
  kernel_axes: tuple[str, str] = ('embed', 'mlp')
  kernel_init: Initializer = nn.initializers.variance_scaling(
      1.0, 'fan_in', 'truncated_normal')
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  freeze_base: bool = True
  allow_batch_priority: bool = True

  @nn.compact
  def __call__(self, x: Array, token_mask: Optional[Array] = None, *,
               enable_dropout: bool = False) -> Array:
    cfg = self.adapter
    d_in = x.shape[-1]
    in_axis, out_axis = self.kernel_axes
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(self.kernel_init,
                                               self.kernel_axes),
        (d_in, self.features), self.param_dtype)
    if self.freeze_base:
      kernel = jax.lax.stop_gradient(kernel)
    x = x.astype(self.dtype)
    y = jnp.einsum('...d,df->...f', x, kernel.astype(self.dtype))
    if cfg.kind == 'none':
      return y

    if token_mask is None:
      token_mask = jnp.ones(x.shape[:-1], jnp.bool_)
    token_mask = token_mask.astype(jnp.bool_)
    adapter_in = nn.Dropout(cfg.dropout_rate, name='lora_dropout')(
        x, deterministic=not enable_dropout)

    expert_axes = () if cfg.kind == 'lora' else ('expert',)
    weight_shape = () if cfg.kind == 'lora' else (cfg.num_experts,)
    a_init = (_identical_over_experts(_lora_a_init)
              if cfg.identical_expert_init and cfg.kind != 'lora' else _lora_a_init)
    a = self.param('lora_a', nn.with_logical_partitioning(
        a_init, expert_axes + ('rank', in_axis)),
                   weight_shape + (cfg.rank, d_in), self.param_dtype)
    b = self.param('lora_b', nn.with_logical_partitioning(
        nn.initializers.zeros, expert_axes + ('rank', out_axis)),
                   weight_shape + (cfg.rank, self.features), self.param_dtype)
    a, b = a.astype(self.dtype), b.astype(self.dtype)

    if cfg.kind == 'lora':
      delta = experts_lib.lora_delta(adapter_in, a, b)
    else:
      # Router, then expert form. The router shares this scope: its params, schedule variable
      # and statistics keep their paths here (see sira_jax.routers).
      router = routers.ROUTERS[cfg.kind](config=cfg, input_axis=in_axis,
                                         allow_batch_priority=self.allow_batch_priority,
                                         name='router')
      nn.share_scope(self, router)
      if isinstance(router, routers.TokenRouter):
        delta = self._token_routed_delta(router, x, adapter_in, token_mask, a, b,
                                         enable_dropout)
      else:
        delta = experts_lib.chosen_lora_delta(adapter_in, a, b,
                                              router(enable_dropout=enable_dropout))
    return y + (cfg.scale * delta).astype(y.dtype)

  def _token_routed_delta(self, router: routers.TokenRouter, x: Array, adapter_in: Array,
                          token_mask: Array, a: Array, b: Array,
                          enable_dropout: bool) -> Array:
    """Route the tokens of x with `router` and apply the E experts: [..., features]."""
    cfg = self.adapter
    lead_shape, d_in = x.shape[:-1], x.shape[-1]
    n = math.prod(lead_shape)
    g, t, shards = self._group_layout(n)
    mask = routing.to_groups(token_mask.reshape(n), g, t, shards)
    form = self._expert_form(n, d_in, router.num_selected,
                             router.capacity_factor(enable_dropout))
    router_in = routing.to_groups(x.reshape(n, d_in), g, t, shards).astype(jnp.float32)
    fused_weight = None
    if (form == 'dense' and a.dtype == jnp.float32 and
        not (enable_dropout and cfg.dropout_rate > 0)):
      # The router and every expert's A read the same float32 tokens: the router computes x A^T
      # in its own matmul, one matmul of width E*(1+r) that reads the tokens once, instead of a
      # separate narrow float32 router matmul. A is used whole (replicated) like the dense
      # form's weights: one all-gather on a mesh.
      fused_weight = partitioning.with_logical_constraint(
          a.reshape(cfg.num_experts * cfg.rank, d_in), ('unmodeled', self.kernel_axes[0]))
    instructions, hidden = router(router_in, mask, enable_dropout=enable_dropout,
                                  fused_weight=fused_weight)
    compute = experts_lib.EXPERT_FORMS[form]
    delta = compute(routing.to_groups(adapter_in.reshape(n, d_in), g, t, shards), a, b,
                    instructions, input_axis=self.kernel_axes[0],
                    output_axis=self.kernel_axes[1],
                    **({} if hidden is None else {'hidden': hidden}))
    return routing.from_groups(delta, n, shards).reshape(lead_shape + (self.features,))

  def _group_layout(self, num_tokens: int) -> tuple[int, int, int]:
    """(G, T, S): groups never span batch shards, and each of the S batch shards of the bound
    mesh has its own (`routing.group_layout`); `strict_group_size` refuses a layout that differs
    from one device's."""
    cfg = self.adapter
    shards = routing.group_shards(num_tokens, partitioning.batch_axis_sizes())
    g, t = routing.group_layout(num_tokens, cfg.max_group_size, shards)
    if cfg.strict_group_size and shards > 1:
      g1, t1 = routing.group_layout(num_tokens, cfg.max_group_size)
      if (g1, t1) != (g, t) or g * t != num_tokens:
        raise ValueError(
            f'AdapterConfig.max_group_size={cfg.max_group_size} gives {g1} groups of {t1} for '
            f'{num_tokens} tokens, which do not split over the {shards} batch shards of the mesh '
            f'(data x expert) as whole groups, and strict_group_size=True keeps the groups of one '
            f'device. Set max_group_size to a divisor of {num_tokens // shards} (the tokens of '
            f'one shard), e.g. {math.gcd(num_tokens // shards, cfg.max_group_size)}, or '
            f'strict_group_size=False to let each shard form its own groups (here {g} groups '
            f'of {t}).')
    return g, t, shards

  def _expert_form(self, num_tokens: int, d_in: int, num_selected: int,
                   capacity_factor: Optional[float]) -> str:
    """`expert_compute`, with 'auto' resolved by `cost_model.choose_form` for this layer's
    shapes (`num_tokens` N per step, grouped as `cost_model.grouping` does), the bound mesh
    (`partitioning.activate`; none: one device) and the backend."""
    cfg = self.adapter
    if cfg.expert_compute != 'auto':
      return cfg.expert_compute
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(mesh.shape)
    shape = cost_model.MeshShape(**{a: sizes.get(a, 1) for a in ('data', 'expert', 'model')})
    site = cost_model.Site(
        tokens=num_tokens, d_in=d_in, d_out=self.features, rank=cfg.rank,
        num_experts=cfg.num_experts, top_k=num_selected, capacity_factor=capacity_factor,
        group_size=cfg.max_group_size, min_capacity=cfg.min_expert_capacity,
        dtype_bytes=jnp.dtype(self.dtype).itemsize)
    return cost_model.choose_form(site, shape, jax.default_backend())


def _path_names(path) -> list[str]:
  return [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]


def is_adapter_param(path: Any, *, trainable: bool = False) -> bool:
  """True for a param an adapter adds to the base model: LoRA A/B (`lora_a`, `lora_b`), the
  learned router (`router_kernel`) and SMoE-Dropout's fixed random router (`smoe_router_kernel`).
  None of them is in a base checkpoint; every other param (kernels, embeddings, norms) is.

  trainable=True: only those fine-tuning updates (TRAINABLE_PARAM_NAMES; the fixed router stays
  frozen). path: a tuple of names or jax key-path entries, or a '/'-joined string.
  """
  names = path.strip('/').split('/') if isinstance(path, str) else _path_names(path)
  wanted = TRAINABLE_PARAM_NAMES if trainable else (*TRAINABLE_PARAM_NAMES, 'smoe_router_kernel')
  return any(n in wanted for n in names)


def trainable_mask(params: Any) -> Any:
  """Bool pytree like `params`: True exactly for trainable adapter params
  (`is_adapter_param(path, trainable=True)`: `lora_a`, `lora_b`, `router_kernel`). Everything else
  (the base and SMoE-Dropout's fixed router) is frozen. Works on boxed (nn.LogicallyPartitioned)
  and plain trees.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: is_adapter_param(path, trainable=True), params)


def with_training_progress(variables: Any, progress: Any) -> Any:
  """Sets every 'schedule/.../progress' (SMoE-Dropout) to `progress`, a scalar in [0, 1] (every
  layer of a scanned stack, whose progress is a [num_layers] vector, gets it)."""
  if SCHEDULE_COLLECTION not in variables:
    return variables
  variables = dict(variables)
  variables[SCHEDULE_COLLECTION] = jax.tree_util.tree_map(
      lambda v: jnp.broadcast_to(jnp.asarray(progress, jnp.float32), jnp.shape(v)),
      variables[SCHEDULE_COLLECTION])
  return variables


def merged_kernel(kernel: Array, adapter_params: dict[str, Array],
                  config: AdapterConfig) -> Array:
  """Folds a token-independent adapter into the base kernel: [d_in, d_out].

  Serving a merged LoRA (or AdaMix, whose inference adapter is the experts'
  mean) costs nothing over the base model. Routed mixtures depend on the
  token, so they cannot be merged.
  """
  if config.kind == 'none':
    return kernel
  a, b = adapter_params['lora_a'], adapter_params['lora_b']
  if config.kind == 'adamix':
    a, b = a.mean(0), b.mean(0)
  elif config.kind != 'lora':
    raise ValueError(
        f'Adapter kind {config.kind!r} routes per token and cannot be merged '
        "into the base kernel; only 'lora' and 'adamix' can.")
  return kernel + config.scale * jnp.einsum('rd,ro->do', a, b).astype(
      kernel.dtype)
