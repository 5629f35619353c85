"""Expert computations: LoRA experts applied under `RoutingInstructions`.

Low-rank weights are stored in PEFT's layout, the rank axis before the feature
axis: `a: [E, r, d_in]`, `b: [E, r, d_out]` (one expert: `a: [r, d_in]`).
XLA on CPU computes the weight gradient several times faster in this layout
than with `a: [d_in, r]` (REFERENCE.md section 6; `experiments/bench_routing.py`).

Two interchangeable forms compute the same output (tested equal, values and
gradients, drops included):
  * `einsum_experts`: the flaxformer one-hot dispatch/combine einsums over
    [G, T, E, C] buffers. The reference, and the form whose expert buffers
    shard over an `expert` mesh axis (all-to-all on TPU/GPU).
  * `dense_in_rank_experts`: no dispatch. Every expert's rank-r projection is
    one matmul of width E*r (like a LoRA of rank E*r); each token's columns are
    scaled by its gate (0 for unselected, over-capacity or padding choices),
    then one [E*r, d_out] matmul. Exact SiRA output at ~LoRA cost for small E*r.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sira_jax.routing import RoutingInstructions

Array = jax.Array


def lora_delta(x: Array, a: Array, b: Array) -> Array:
  """One LoRA adapter, unscaled: (x a^T) b.

  Args:
    x: [..., d_in].
    a: [r, d_in].
    b: [r, d_out].

  Returns:
    [..., d_out].
  """
  return jnp.einsum('...r,ro->...o', jnp.einsum('...d,rd->...r', x, a), b)


def einsum_experts(x: Array, a: Array, b: Array,
                   instructions: RoutingInstructions,
                   input_axis: str = 'embed', output_axis: str = 'mlp') -> Array:
  """Mask form: dispatch to [G, E, C, d_in] buffers, run experts, combine.

  Args:
    x: [G, T, d_in] grouped tokens.
    a: [E, r, d_in].
    b: [E, r, d_out].
    instructions: routing decision for the G groups.
    input_axis, output_axis: logical names of the feature axes (sharding).

  Returns:
    [G, T, d_out], sum over dispatched choices of weight * expert output.
  """
  dispatch = instructions.dispatch_mask(x.dtype)  # [G, T, E, C]
  combine = instructions.combine_array(x.dtype)   # [G, T, E, C]
  expert_in = jnp.einsum('gtd,gtec->gecd', x, dispatch)
  expert_in = nn.with_logical_constraint(
      expert_in, ('batch', 'expert', None, input_axis))
  hidden = jnp.einsum('gecd,erd->gecr', expert_in, a)
  expert_out = jnp.einsum('gecr,ero->geco', hidden, b)
  expert_out = nn.with_logical_constraint(
      expert_out, ('batch', 'expert', None, output_axis))
  return jnp.einsum('geco,gtec->gto', expert_out, combine)


def dense_in_rank_experts(x: Array, a: Array, b: Array,
                          instructions: RoutingInstructions,
                          input_axis: str = 'embed',
                          output_axis: str = 'mlp') -> Array:
  """Dense-in-rank form: gate the E*r low-rank columns, no dispatch tensors.

  Args and returns as `einsum_experts`.
  """
  del input_axis, output_axis  # Nothing to shard: no expert buffers.
  e, r, d_in = a.shape
  gates = instructions.expert_gates(x.dtype)               # [G, T, E]
  hidden = jnp.einsum('gtd,kd->gtk', x, a.reshape(e * r, d_in))
  hidden = hidden * jnp.repeat(gates, r, axis=-1)           # [G, T, E*r]
  return jnp.einsum('gtk,ko->gto', hidden, b.reshape(e * r, b.shape[-1]))


EXPERT_FORMS = {
    'einsum': einsum_experts,
    'dense': dense_in_rank_experts,
}
