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

The sparse and dense mixtures all go through `sira_jax.routing.top_k_routing`
and one of the expert forms of `sira_jax.experts`.

Documented defaults (each a field below):
  * gate normalisation: top-k softmax probabilities, not renormalised
    (`renormalize_gates=False`, the flaxformer convention).
  * capacity: C = min(T, max(min_expert_capacity, ceil(k * cf * T / E))) per
    group of T <= max_group_size tokens; cf = 1.25 in training; evaluation is
    no-drop (`eval_capacity_factor=None`), which makes one example's eval output
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
from sira_jax import routing

Array = jax.Array
Initializer = Callable[..., Array]

ADAPTER_KINDS = ('none', 'lora', 'sira', 'molora', 'adamix', 'smoe_dropout')
ROUTED_KINDS = ('sira', 'molora', 'smoe_dropout')
TRAINABLE_PARAM_NAMES = ('lora_a', 'lora_b', 'router_kernel')
SCHEDULE_COLLECTION = 'schedule'


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
    min_expert_capacity: lower bound on C.
    max_group_size: tokens per routing group T (capacity is per group).
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
  min_expert_capacity: int = 4
  max_group_size: int = 1024
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
    if self.kind not in ADAPTER_KINDS:
      fail('kind', f'unknown adapter kind {self.kind!r}',
           f'Use one of {ADAPTER_KINDS}.')
    if self.rank < 1:
      fail('rank', f'must be >= 1, got {self.rank}', 'Set rank to e.g. 4.')
    if self.kind in ('sira', 'molora', 'adamix', 'smoe_dropout'):
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
  fixed: smoe_dropout).

  Sown into 'intermediates' (routed kinds): aux_loss, router_z_loss,
  dropped_fraction, expert_usage [E], gate_entropy, router_confidence.
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
    elif cfg.kind == 'adamix':
      delta = experts_lib.lora_delta(adapter_in,
                                     *self._adamix_weights(a, b, enable_dropout))
    else:
      delta = self._mixture_delta(x, adapter_in, token_mask, a, b,
                                  enable_dropout)
    return y + (cfg.scale * delta).astype(y.dtype)

  def _adamix_weights(self, a: Array, b: Array,
                      enable_dropout: bool) -> tuple[Array, Array]:
    """One random expert for A and one for B in training; the mean at eval."""
    if not enable_dropout:
      return a.mean(0), b.mean(0)
    key_a, key_b = jax.random.split(self.make_rng('dropout'))
    e = self.adapter.num_experts
    return (a[jax.random.randint(key_a, (), 0, e)],
            b[jax.random.randint(key_b, (), 0, e)])

  def _mixture_delta(self, x: Array, adapter_in: Array, token_mask: Array,
                     a: Array, b: Array, enable_dropout: bool) -> Array:
    """Route the tokens of x and apply the E experts: [..., features]."""
    cfg = self.adapter
    e = cfg.num_experts
    lead_shape, d_in = x.shape[:-1], x.shape[-1]
    n = math.prod(lead_shape)
    g, t = routing.group_layout(n, cfg.max_group_size)
    mask = routing.to_groups(token_mask.reshape(n), g, t)

    train_cf = cfg.capacity_factor if enable_dropout else cfg.eval_capacity_factor
    if cfg.kind == 'sira':
      num_selected, num_active, cf = cfg.top_k, None, train_cf
    elif cfg.kind == 'molora':
      num_selected, num_active, cf = e, None, None
    else:  # smoe_dropout
      num_selected, cf = e, None
      progress = self._smoe_progress()  # Created at init even in eval mode.
      num_active = (cfg.top_k + jnp.round(progress * (e - cfg.top_k)).astype(
          jnp.int32) if enable_dropout else (cfg.smoe_eval_num_experts or e))
    capacity = routing.expert_capacity(t, e, num_selected, cf,
                                       cfg.min_expert_capacity)
    form = self._expert_form(g, t, d_in, num_selected, cf)

    router_in = routing.to_groups(x.reshape(n, d_in), g, t).astype(jnp.float32)
    jitter = enable_dropout and cfg.router_jitter > 0
    if jitter:
      router_in = router_in * jax.random.uniform(
          self.make_rng('dropout'), router_in.shape, jnp.float32,
          1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
    if cfg.kind == 'smoe_dropout':
      router_kernel = jax.lax.stop_gradient(self.param(
          'smoe_router_kernel', nn.with_logical_partitioning(
              nn.initializers.variance_scaling(1.0, 'fan_in', 'normal'),
              (self.kernel_axes[0], 'unmodeled')), (d_in, e), jnp.float32))
    else:
      router_kernel = self.param(
          'router_kernel', nn.with_logical_partitioning(
              nn.initializers.normal(cfg.router_init_stddev),
              (self.kernel_axes[0], 'unmodeled')), (d_in, e), jnp.float32)
    expert_kwargs = {}
    if (form == 'dense' and a.dtype == jnp.float32 and not jitter and
        not (enable_dropout and cfg.dropout_rate > 0)):
      # The router and every expert's A read the same float32 tokens: one matmul of width
      # E*(1+r) instead of a separate narrow float32 router matmul (REFERENCE.md 6b).
      # A used whole (replicated) like the dense form's weights: one all-gather on a mesh.
      a_all = partitioning.with_logical_constraint(a.reshape(e * cfg.rank, d_in),
                                                   ('unmodeled', self.kernel_axes[0]))
      fused = experts_lib.token_matmul(
          router_in, jnp.concatenate([router_kernel.T, a_all], axis=0), transpose_w=True)
      logits, expert_kwargs['hidden'] = fused[..., :e], fused[..., e:]
    else:
      logits = experts_lib.token_matmul(router_in, router_kernel)
    logits = partitioning.with_logical_constraint(logits, ('batch', None, 'unmodeled'))

    routing_logits = logits
    drop_experts = (enable_dropout and cfg.expert_dropout_rate > 0 and
                    cfg.kind != 'smoe_dropout')
    if drop_experts and cfg.expert_dropout_placement == 'logits':
      dropped = jax.random.bernoulli(self.make_rng('dropout'),
                                     cfg.expert_dropout_rate, logits.shape)
      # A large negative offset, not -inf: order and finiteness survive even
      # when every expert of a token is dropped.
      routing_logits = logits - 1e9 * dropped
    probs = jax.nn.softmax(routing_logits, axis=-1)

    choice_keep = None
    if drop_experts and cfg.expert_dropout_placement == 'gate':
      choice_keep = jax.random.bernoulli(
          self.make_rng('dropout'), 1.0 - cfg.expert_dropout_rate,
          (g, t, num_selected))
    instructions = routing.top_k_routing(
        probs, mask, num_selected=num_selected, capacity=capacity,
        renormalize=cfg.renormalize_gates or cfg.kind == 'smoe_dropout',
        choice_keep=choice_keep, num_active=num_active,
        batch_prioritized=(cfg.batch_prioritized_routing and
                           self.allow_batch_priority))
    if choice_keep is not None and cfg.expert_dropout_rescale:
      instructions = instructions.replace(
          weight=instructions.weight / (1.0 - cfg.expert_dropout_rate))

    for name, value in routing.routing_statistics(
        logits, probs, instructions, mask).items():
      self.sow('intermediates', name, value)

    compute = experts_lib.EXPERT_FORMS[form]
    delta = compute(routing.to_groups(adapter_in.reshape(n, d_in), g, t), a, b, instructions,
                    input_axis=self.kernel_axes[0],
                    output_axis=self.kernel_axes[1], **expert_kwargs)
    return routing.from_groups(delta, n).reshape(lead_shape + (self.features,))

  def _expert_form(self, g: int, t: int, d_in: int, num_selected: int,
                   capacity_factor: Optional[float]) -> str:
    """`expert_compute`, with 'auto' resolved by `cost_model.choose_form` for this layer's
    shapes, the bound mesh (`partitioning.activate`; none: one device) and the backend."""
    cfg = self.adapter
    if cfg.expert_compute != 'auto':
      return cfg.expert_compute
    mesh = jax.sharding.get_abstract_mesh()
    sizes = {} if mesh.empty else dict(mesh.shape)
    shape = cost_model.MeshShape(**{a: sizes.get(a, 1) for a in ('data', 'expert', 'model')})
    site = cost_model.Site(
        tokens=g * t, d_in=d_in, d_out=self.features, rank=cfg.rank,
        num_experts=cfg.num_experts, top_k=num_selected, capacity_factor=capacity_factor,
        group_size=t, min_capacity=cfg.min_expert_capacity,
        dtype_bytes=jnp.dtype(self.dtype).itemsize)
    return cost_model.choose_form(site, shape, jax.default_backend())

  def _smoe_progress(self) -> Array:
    """Training progress in [0, 1] for SMoE-Dropout's schedule.

    The schedule: k + round(progress * (E - k)) active experts, k = top_k.
    `progress` is read from the 'schedule' collection, which the trainer sets
    each step (`with_training_progress`); when the collection is absent (a
    caller that does not know it), progress is 1: all E experts.
    """
    if self.is_initializing() or self.has_variable(SCHEDULE_COLLECTION,
                                                   'progress'):
      progress = self.variable(SCHEDULE_COLLECTION, 'progress',
                               lambda: jnp.ones((), jnp.float32)).value
    else:
      progress = jnp.ones((), jnp.float32)
    return jnp.clip(progress, 0.0, 1.0)


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
  """Sets every 'schedule/.../progress' (SMoE-Dropout) to `progress` in [0, 1]."""
  if SCHEDULE_COLLECTION not in variables:
    return variables
  variables = dict(variables)
  variables[SCHEDULE_COLLECTION] = jax.tree_util.tree_map(
      lambda v: jnp.asarray(progress, jnp.float32).reshape(jnp.shape(v)),
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
