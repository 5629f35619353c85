"""The routing core: router probabilities -> `RoutingInstructions`.

Every mixture variant (SiRA's sparse top-k, MoLoRA's dense softmax mixture,
SMoE-Dropout's fixed random router with a growing number of active experts)
is one call of `top_k_routing` with different arguments, made by its router
module (`sira_jax.routers`), and every expert computation form in
`sira_jax.experts` consumes the same instructions without knowing which router
made them.

Shapes: G groups of T tokens, E experts, K choices per token, C capacity slots
per expert and group (the static buffer size), c_g <= C the slots group g may
fill.

Conventions (documented defaults, every one a config field in
`sira_jax.adapters.AdapterConfig`):
  * Gates are the softmax probabilities of the top-K experts, not renormalised
    unless asked (flaxformer and MoLoRA default).
  * Capacity (docs/capacity.md): buffers hold
    `C = min(T, max(min_capacity, ceil(K * capacity_factor * T / E)))` slots;
    group g fills at most `c_g = min(T, max(min_capacity,
    ceil(K * capacity_factor * n_g / E)))` of them, n_g its real (unpadded)
    tokens (`capacity_counts='real_tokens'`), or all C (`'positions'`, the
    padding-inclusive flaxformer rule). `capacity_factor=None` means no token
    is ever dropped (c_g = C = T).
  * Priority: all first choices outrank all second choices; within a choice,
    earlier tokens first, or, with batch-prioritised routing (encoder only),
    tokens with the larger top-1 probability first.
  * Padding tokens (token_mask == 0) are never routed, never take a slot and are
    never counted in any statistic.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

CAPACITY_COUNTS = ('real_tokens', 'positions')


@flax.struct.dataclass
class RoutingInstructions:
  """Index form of a routing decision; the mask form is derived from it.

  Attributes:
    expert_index: [G, T, K] int32, the expert of each choice.
    slot: [G, T, K] int32, the position of the token in that expert's buffer:
      -1 for an inactive choice (padding, removed by expert dropout, beyond the
      active number of experts); >= group_capacity[g] for a choice dropped by
      capacity.
    weight: [G, T, K] float32 gate of each choice; 0 wherever the choice is not
      dispatched (the expert forms mask it with `dispatched` as well).
    group_capacity: [G] int32, c_g <= C: the slots group g may fill (slots
      >= c_g are dropped; docs/capacity.md).
    capacity: C, slots per expert and group: the static buffer size.
    num_experts: E (static).

  Every expert form reads the decision through `dispatched` (or the masks
  derived from it), so a slot beyond c_g is dropped in every form alike.
  """
  expert_index: Array
  slot: Array
  weight: Array
  group_capacity: Array
  capacity: int = flax.struct.field(pytree_node=False)
  num_experts: int = flax.struct.field(pytree_node=False)

  @property
  def active(self) -> Array:
    """[G, T, K] bool: the choice asked for its expert (before capacity)."""
    return self.slot >= 0

  @property
  def dispatched(self) -> Array:
    """[G, T, K] bool: the choice is processed by its expert (slot < c_g)."""
    return (self.slot >= 0) & (self.slot < self.group_capacity[:, None, None])

  @property
  def dispatched_slot(self) -> Array:
    """[G, T, K] int32: the slot of each dispatched choice, -1 elsewhere."""
    return jnp.where(self.dispatched, self.slot, -1)

  @property
  def dispatched_weight(self) -> Array:
    """[G, T, K] float32: the gate of each dispatched choice, 0 elsewhere."""
    return jnp.where(self.dispatched, self.weight, 0.0)

  def dispatch_mask(self, dtype=jnp.float32) -> Array:
    """[G, T, E, C] one-hot dispatch mask (undispatched choices one-hot to zeros)."""
    experts = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=dtype)
    slots = jax.nn.one_hot(self.dispatched_slot, self.capacity, dtype=dtype)  # -1: 0
    return jnp.einsum('gtke,gtkc->gtec', experts, slots)

  def combine_array(self, dtype=jnp.float32) -> Array:
    """[G, T, E, C] combine weights: weight at each dispatched (expert, slot)."""
    experts = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=dtype)
    slots = jax.nn.one_hot(self.dispatched_slot, self.capacity, dtype=dtype)
    slots = slots * self.weight.astype(dtype)[..., None]
    return jnp.einsum('gtke,gtkc->gtec', experts, slots)

  def expert_gates(self, dtype=jnp.float32) -> Array:
    """[G, T, E] per-token weight of each expert (0 where not dispatched)."""
    experts = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=dtype)
    return jnp.einsum('gtke,gtk->gte', experts,
                      self.dispatched_weight.astype(dtype))


@flax.struct.dataclass
class AdapterChoice:
  """A routing decision made per forward pass, not per token (AdaMix).

  Attributes:
    a_index: int32 scalar, the expert whose A serves every token; None: the
      mean of the experts' A.
    b_index: likewise for B (chosen independently of A).
  """
  a_index: Optional[Array] = None
  b_index: Optional[Array] = None


def group_shards(num_tokens: int, batch_axis_sizes: Sequence[int]) -> int:
  """S, the batch shards the N tokens of a step split into: the product of the longest prefix of
  `batch_axis_sizes` (the sizes of the mesh axes the 'batch' axis maps to, in rule order, e.g.
  (data, expert)) that divides `num_tokens`, as `partitioning.with_logical_constraint` splits
  a dimension. () (no mesh bound): 1.
  """
  shards = 1
  for size in batch_axis_sizes:
    if num_tokens % (shards * size):
      break
    shards *= size
  return shards


def group_layout(num_tokens: int, max_group_size: int, shards: int = 1) -> tuple[int, int]:
  """(G, T): each of the S = `shards` batch shards' N/S tokens form ceil(N / S / max_group_size)
  groups, G = S * ceil(N / S / max_group_size) in all, of T = ceil(N / G) <= max_group_size
  tokens.

  G is a multiple of S (at least S), so the group axis splits over the batch shards and every
  group lies within one shard: routing is shard-local and the einsum form stays expert parallel
  (with fewer groups than shards XLA all-gathers the tokens instead of exchanging expert
  buffers with all-to-alls). S = 1 (one device, or no batch axes): G = ceil(N / max_group_size).
  `group_shards` gives S for a bound mesh; `AdaptedDense` and `cost_model.grouping` both call it.

  Each shard's G/S * T - N/S < G/S extra positions are padding (`to_groups` masks them), so T
  never collapses below max_group_size / 2 however N factors: 97 tokens with max_group_size 32
  give 4 groups of 25 (3 padding), not 97 groups of one token whose capacity could never bind.
  """
  if num_tokens <= 0:
    raise ValueError(f'num_tokens must be positive, got {num_tokens}.')
  if max_group_size <= 0:
    raise ValueError(f'max_group_size must be positive, got {max_group_size}.')
  if shards <= 0 or num_tokens % shards:
    raise ValueError(f'{num_tokens} tokens do not split into {shards} batch shards; use '
                     f'`group_shards` for the shard count.')
  g = shards * math.ceil(num_tokens // shards / max_group_size)
  return g, math.ceil(num_tokens / g)


def to_groups(x: Array, num_groups: int, group_size: int, shards: int = 1) -> Array:
  """[N, ...] -> [G, T, ...]: each of the `shards` contiguous blocks of N/S rows becomes G/S
  groups, its G/S * T - N/S padding rows (zero, False) appended to the block.

  Pass the token mask through it too: its padding rows are False, so padding is never routed,
  takes no capacity slot and is never counted. Padding within each shard's block keeps the
  reshape shard-local when N is split over the batch shards.
  """
  block = num_groups // shards * group_size
  x = x.reshape((shards, x.shape[0] // shards) + x.shape[1:])
  pad = block - x.shape[1]
  if pad:  # Static: no copy when G * T == N (the usual case).
    x = jnp.concatenate([x, jnp.zeros((shards, pad) + x.shape[2:], x.dtype)], axis=1)
  return x.reshape((num_groups, group_size) + x.shape[2:])


def from_groups(x: Array, num_tokens: int, shards: int = 1) -> Array:
  """[G, T, ...] -> [N, ...]: the inverse of `to_groups` (drops each shard's padding)."""
  x = x.reshape((shards, -1) + x.shape[2:])[:, :num_tokens // shards]
  return x.reshape((num_tokens,) + x.shape[2:])


def expert_capacity(group_size: int, num_experts: int, num_selected: int,
                    capacity_factor: Optional[float], min_capacity: int,
                    num_tokens: Optional[int] = None) -> int:
  """C = min(T, max(min_capacity, ceil(K * capacity_factor * n / E))).

  n = `num_tokens`, the tokens the capacity is counted over, default T =
  `group_size` (the static buffer size). `capacity_factor=None` gives C = T:
  every choice fits (no-drop routing). See docs/capacity.md.
  """
  if capacity_factor is None:
    return group_size
  if capacity_factor <= 0:
    raise ValueError(
        f'capacity_factor must be > 0 (or None for no-drop routing), got '
        f'{capacity_factor}.')
  n = group_size if num_tokens is None else num_tokens
  c = math.ceil(num_selected * capacity_factor * n / num_experts)
  return min(group_size, max(min_capacity, c))


def group_capacity(token_mask: Array, num_experts: int, num_selected: int,
                   capacity_factor: Optional[float], min_capacity: int,
                   counts: str = 'real_tokens') -> Array:
  """c_g, the slots each group may fill: [G] int32 (docs/capacity.md).

  Args:
    token_mask: [G, T] bool, False for padding.
    num_experts, num_selected, capacity_factor, min_capacity: as
      `expert_capacity`.
    counts: 'real_tokens' (default): c_g = `expert_capacity` counted over the
      n_g real tokens of group g, so the effective capacity factor does not
      depend on how much padding a batch has; 'positions': c_g = C for every
      group, counted over all T positions, padding included (flaxformer's
      rule).

  Returns:
    [G] int32, each <= C = `expert_capacity(T, ...)`; equal to C when a group
    has no padding. The value for each possible n_g is computed on the host
    with `expert_capacity`'s exact arithmetic and looked up, so c_g and C never
    differ by a rounding.
  """
  if counts not in CAPACITY_COUNTS:
    raise ValueError(f'capacity counts {counts!r} unknown; use one of '
                     f'{CAPACITY_COUNTS}.')
  g, t = token_mask.shape
  rule = lambda n: expert_capacity(t, num_experts, num_selected,
                                   capacity_factor, min_capacity, num_tokens=n)
  if counts == 'positions' or capacity_factor is None:
    return jnp.full((g,), rule(t), jnp.int32)
  by_count = jnp.asarray(np.array([rule(n) for n in range(t + 1)], np.int32))
  return by_count[jnp.sum(token_mask, axis=1, dtype=jnp.int32)]


def assign_slots(expert_index: Array, active: Array, num_experts: int,
                 capacity: int, priority_order: Optional[Array] = None
                 ) -> Array:
  """Positions of each choice in its expert's buffer, in priority order.

  All first choices outrank all second choices, and so on; within a choice
  level tokens are taken in `priority_order` (default: position order).

  Args:
    expert_index: [G, T, K] int.
    active: [G, T, K] bool; inactive choices take no slot.
    num_experts: E.
    capacity: C (slots beyond a group's capacity are dropped by the
      consumers of the instructions).
    priority_order: optional [G, T] permutation of token positions, most
      important first.

  Returns:
    [G, T, K] int32 slot; -1 for inactive choices, >= C when over capacity.
  """
  g, t, k = expert_index.shape
  if priority_order is not None:
    expert_index = jnp.take_along_axis(expert_index, priority_order[..., None], 1)
    active = jnp.take_along_axis(active, priority_order[..., None], 1)
  # Choice-major flattening: [G, K*T], first choices of every token first.
  flat_index = jnp.swapaxes(expert_index, 1, 2).reshape(g, k * t)
  flat_active = jnp.swapaxes(active, 1, 2).reshape(g, k * t)
  one_hot = jax.nn.one_hot(flat_index, num_experts, dtype=jnp.int32)
  one_hot = one_hot * flat_active[..., None].astype(jnp.int32)
  position = jnp.sum(jnp.cumsum(one_hot, axis=1) * one_hot, axis=-1) - 1
  slot = jnp.swapaxes(position.reshape(g, k, t), 1, 2)
  if priority_order is not None:
    inverse = jnp.argsort(priority_order, axis=1)
    slot = jnp.take_along_axis(slot, inverse[..., None], 1)
    active = jnp.take_along_axis(active, inverse[..., None], 1)
  return jnp.where(active, slot, -1).astype(jnp.int32)


def top_k(probs: Array, k: int) -> tuple[Array, Array]:
  """Top-k over the last axis: ([..., k] values, [..., k] int32 indices), as `lax.top_k` gives.

  Largest first, ties to the lower index. For k <= 4, k rounds of argmax (each masks the choice
  before): a reduce over E, about 4.6x faster than a sort forward+backward on CPU (2 of 8 experts,
  1,024 tokens: 93 vs 431 us); larger k a stable sort. Both partition along the token dimensions
  under XLA's SPMD partitioner, where XLA's TopK op is all-gathered (measured on a CPU mesh: every
  device would route the whole global batch).
  """
  if k > 4:
    index = jnp.argsort(-probs, axis=-1, stable=True)[..., :k].astype(jnp.int32)
    return jnp.take_along_axis(probs, index, axis=-1), index
  indices, remaining = [], probs
  for _ in range(k):
    i = jnp.argmax(remaining, axis=-1).astype(jnp.int32)  # the first maximum: lower index
    indices.append(i)
    remaining = jnp.where(jax.nn.one_hot(i, probs.shape[-1], dtype=jnp.bool_), -jnp.inf, remaining)
  index = jnp.stack(indices, axis=-1)
  return jnp.take_along_axis(probs, index, axis=-1), index


def top_k_routing(probs: Array, token_mask: Array, *, num_selected: int,
                  capacity: int, group_capacity: Optional[Array] = None,
                  renormalize: bool = False,
                  choice_keep: Optional[Array] = None,
                  num_active: Optional[Array] = None,
                  batch_prioritized: bool = False) -> RoutingInstructions:
  """Top-K routing with capacity: the one router every mixture variant uses.

  Args:
    probs: [G, T, E] float32 router probabilities.
    token_mask: [G, T] bool, False for padding.
    num_selected: K, choices per token (K = E gives a dense mixture).
    capacity: C slots per expert and group, the buffer size (see
      `expert_capacity`).
    group_capacity: optional [G] int, c_g <= C, the slots group g may fill
      (see `group_capacity`); None: C for every group.
    renormalize: rescale the active gates of each token to sum to 1.
    choice_keep: optional [G, T, K] bool; False removes that choice before
      slots are assigned (expert dropout on gate values).
    num_active: optional int scalar (may be traced); only choices ranked
      below it are active (SMoE-Dropout's growing number of experts).
    batch_prioritized: give slots to tokens with larger top-1 probability
      first (breaks autoregressive decoding: encoder only).

  Returns:
    RoutingInstructions; weights are the gates, 0 where not dispatched.
  """
  num_experts = probs.shape[-1]
  if not 1 <= num_selected <= num_experts:
    raise ValueError(
        f'num_selected (top_k) must be in [1, num_experts={num_experts}], got '
        f'{num_selected}.')
  gates, expert_index = top_k(probs, num_selected)
  top_probability = gates[..., 0]  # the priority score: before dropout and renormalisation
  active = jnp.broadcast_to(token_mask[..., None], gates.shape)
  if num_active is not None:
    active = active & (jnp.arange(num_selected) < num_active)
  if choice_keep is not None:
    active = active & choice_keep
  gates = jnp.where(active, gates, 0.0)
  if renormalize:
    gates = gates / jnp.maximum(jnp.sum(gates, -1, keepdims=True), 1e-9)
  order = None
  if batch_prioritized:
    score = jnp.where(token_mask, top_probability, -1.0)
    order = jnp.argsort(-score, axis=1, stable=True)
  slot = assign_slots(expert_index, active, num_experts, capacity, order)
  if group_capacity is None:
    group_capacity = jnp.full(probs.shape[:1], capacity, jnp.int32)
  instructions = RoutingInstructions(
      expert_index=expert_index.astype(jnp.int32), slot=slot,
      weight=gates.astype(jnp.float32),
      group_capacity=jnp.minimum(group_capacity, capacity).astype(jnp.int32),
      capacity=capacity, num_experts=num_experts)
  return instructions.replace(weight=instructions.dispatched_weight)


def routing_statistics(logits: Array, probs: Array,
                       instructions: RoutingInstructions,
                       token_mask: Array) -> dict[str, Array]:
  """Losses and statistics over real tokens only.

  Args:
    logits: [G, T, E] float32 router logits before any expert dropout.
    probs: [G, T, E] float32 probabilities the routing used.
    instructions: the routing decision.
    token_mask: [G, T] bool.

  Returns:
    aux_loss: load balancing, `E * sum_e f_e * P_e`, where f_e is the fraction
      of active choices sent to expert e (before capacity) and P_e the mean
      router probability of e. 1 at perfect balance; E when every token goes
      to one expert with probability 1 (K=1). Equals flaxformer's loss / K.
    router_z_loss: mean over tokens of logsumexp(logits)^2.
    dropped_fraction: active choices dropped by capacity (slot >= c_g) /
      active choices; both counted over real tokens only.
    expert_usage: [E] dispatched choices per expert / active choices.
    gate_entropy: mean entropy (nats) of the router distribution.
    router_confidence: mean total combine weight a token receives.
  """
  e = probs.shape[-1]
  m = token_mask.astype(jnp.float32)
  n_tokens = jnp.maximum(jnp.sum(m), 1.0)
  act = instructions.active.astype(jnp.float32)
  n_active = jnp.maximum(jnp.sum(act), 1.0)
  choice_onehot = jax.nn.one_hot(instructions.expert_index, e)  # [G,T,K,E]
  f = jnp.einsum('gtke,gtk->e', choice_onehot, act) / n_active
  p = jnp.einsum('gte,gt->e', probs, m) / n_tokens
  aux = e * jnp.sum(f * p)
  z = jnp.sum(jax.nn.logsumexp(logits, -1) ** 2 * m) / n_tokens
  dispatched = instructions.dispatched.astype(jnp.float32)
  dropped = jnp.sum(act - dispatched) / n_active
  usage = jnp.einsum('gtke,gtk->e', choice_onehot, dispatched) / n_active
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0), -1)
  entropy = jnp.sum(entropy * m) / n_tokens
  confidence = jnp.sum(jnp.sum(instructions.weight, -1) * m) / n_tokens
  return dict(aux_loss=aux, router_z_loss=z, dropped_fraction=dropped,
              expert_usage=usage, gate_entropy=entropy,
              router_confidence=confidence)
