"""Expert computations: LoRA experts applied under `RoutingInstructions`.

Low-rank weights are stored in PEFT's layout, the rank axis before the feature
axis: `a: [E, r, d_in]`, `b: [E, r, d_out]` (one expert: `a: [r, d_in]`).
XLA on CPU computes the weight gradient faster in this layout than with
`a: [d_in, r]` (a LoRA gradient step took 1.4x to 3.8x longer with `[d_in, r]`,
on a quiet and a loaded machine: `experiments/bench_routing.py`), and faster
again as a dot batched over the leading axis (`token_matmul`, used for every
low-rank and router contraction).

Three interchangeable forms compute the same output (tested equal, values and
gradients, drops included). Every form drops exactly the choices that
`RoutingInstructions.dispatched` rules out (inactive, or at a slot beyond its
group's capacity c_g, docs/capacity.md), through the masks derived from it:
  * `einsum_experts`: the flaxformer one-hot dispatch/combine einsums over
    [G, T, E, C] buffers. The reference, and the form whose expert buffers
    shard over an `expert` mesh axis (all-to-all on TPU/GPU).
  * `dense_in_rank_experts`: no dispatch. Every expert's rank-r projection is
    one matmul of width E*r (like a LoRA of rank E*r); each token's columns are
    scaled by its gate (0 for unselected, over-capacity or padding choices),
    then one [E*r, d_out] matmul. Exact SiRA output at ~LoRA cost for small E*r.
  * `gather_experts`: the index form: tokens gathered into the [G, E, C, d_in]
    buffers by index, per-expert matmuls, each token's K outputs gathered back.

`chosen_lora_delta` applies AdaMix's whole-adapter choice (`routing.AdapterChoice`)
instead: one LoRA for every token.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from sira_jax.partitioning import with_logical_constraint as constrain
from sira_jax.routing import AdapterChoice, RoutingInstructions

Array = jax.Array


def token_matmul(x: Array, w: Array, transpose_w: bool = False) -> Array:
  """x @ w (x @ w^T with `transpose_w`) for a small weight (rank- or expert-sized side), with
  its weight gradient computed per leading index and summed.

  Args:
    x: [B, ..., k] activations (B: the leading, batch or group, axis).
    w: [k, n], or [n, k] with `transpose_w`.

  Returns:
    [B, ..., n] in the dtype of x and w promoted.

  The weight gradient contracts over every token: as one dot over (B, T), XLA on CPU transposes
  the output cotangent to [n, B*T] and fuses whatever produced it (e.g. the gated-GELU backward)
  into that transposing copy, recomputed in strided order: 6 ms of a 120 ms bench train step per
  adapted `mlp/wi_0`. As a dot batched over B (then summed over B) it reads the cotangent in
  place: the LoRA r=4 bench train step took 82 instead of 122 ms. Values are the same sums.
  """
  return _token_matmul(x, w, transpose_w)


def _matmul(x, w, transpose_w):
  return jnp.einsum('...k,nk->...n' if transpose_w else '...k,kn->...n', x, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _token_matmul(x, w, transpose_w):
  return _matmul(x, w, transpose_w)


def _token_matmul_fwd(x, w, transpose_w):
  return _matmul(x, w, transpose_w), (x, w)


def _token_matmul_bwd(transpose_w, res, g):
  x, w = res
  dx = _matmul(g, w, not transpose_w).astype(x.dtype)
  x3 = x.reshape(x.shape[0] if x.ndim > 1 else 1, -1, x.shape[-1])
  g3 = g.reshape(x3.shape[0], -1, g.shape[-1])
  if transpose_w:
    dw = jnp.einsum('btn,btk->bnk', g3, x3).sum(0)
  else:
    dw = jnp.einsum('btk,btn->bkn', x3, g3).sum(0)
  return dx, dw.astype(w.dtype)


_token_matmul.defvjp(_token_matmul_fwd, _token_matmul_bwd)


def lora_delta(x: Array, a: Array, b: Array) -> Array:
  """One LoRA adapter, unscaled: (x a^T) b.

  Args:
    x: [..., d_in].
    a: [r, d_in].
    b: [r, d_out].

  Returns:
    [..., d_out].
  """
  return token_matmul(token_matmul(x, a, transpose_w=True), b)


def chosen_lora_delta(x: Array, a: Array, b: Array, choice: AdapterChoice) -> Array:
  """One LoRA made of the chosen experts' A and B (the mean where none is chosen), unscaled.

  Args:
    x: [..., d_in].
    a: [E, r, d_in].
    b: [E, r, d_out].
    choice: which expert's A and B (`routing.AdapterChoice`).

  Returns:
    [..., d_out].
  """
  pick = lambda w, index: w.mean(0) if index is None else w[index]
  return lora_delta(x, pick(a, choice.a_index), pick(b, choice.b_index))


def einsum_experts(x: Array, a: Array, b: Array,
                   instructions: RoutingInstructions,
                   input_axis: str = 'embed', output_axis: str = 'mlp') -> Array:
  """Mask form: dispatch to [G, E, C, d_in] buffers, run experts, combine.

  Expert parallel on a mesh with an 'expert' axis (under `partitioning.activate`): tokens and
  the freshly dispatched buffers are group-major, G split over the batch mesh axes ('data',
  'expert'); the buffers are then resharded expert-major, G over 'data' and E over 'expert'
  (logical ('expert_replicas', 'expert', ...), flaxformer's names, which T5X's MoE rules map the
  same way), which XLA implements as one all-to-all over the 'expert' axis; each device runs only its E/X experts, whose weights it holds; the outputs go back
  group-major with a second all-to-all before the combine (flaxformer's `_call_experts`
  layout). The backward pass mirrors both. Without a bound mesh the constraints do nothing.

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
  x = constrain(x, ('batch', None, input_axis))
  expert_in = jnp.einsum('gtd,gtec->gecd', x, dispatch)
  expert_in = constrain(expert_in, ('batch', None, None, input_axis))
  expert_in = constrain(expert_in, ('expert_replicas', 'expert', None, input_axis))  # all-to-all
  hidden = jnp.einsum('gecd,erd->gecr', expert_in, a)
  expert_out = jnp.einsum('gecr,ero->geco', hidden, b)
  expert_out = constrain(expert_out, ('expert_replicas', 'expert', None, output_axis))
  expert_out = constrain(expert_out, ('batch', None, None, output_axis))  # all-to-all
  y = jnp.einsum('geco,gtec->gto', expert_out, combine)
  return constrain(y, ('batch', None, output_axis))


def dense_in_rank_experts(x: Array, a: Array, b: Array,
                          instructions: RoutingInstructions,
                          input_axis: str = 'embed',
                          output_axis: str = 'mlp',
                          hidden: Optional[Array] = None) -> Array:
  """Dense-in-rank form: gate the E*r low-rank columns, no dispatch tensors.

  Args and returns as `einsum_experts`; `hidden` optionally gives x @ A^T, [G, T, E*r], when the
  caller computed it already (`AdaptedDense` fuses it with the router matmul).
  """
  del input_axis, output_axis  # Nothing to shard: no expert buffers.
  e, r, d_in = a.shape
  gates = instructions.expert_gates(x.dtype)               # [G, T, E]
  if hidden is None:
    hidden = token_matmul(x, a.reshape(e * r, d_in), transpose_w=True)
  hidden = hidden * jnp.repeat(gates, r, axis=-1)           # [G, T, E*r]
  return token_matmul(hidden, b.reshape(e * r, b.shape[-1]))


@jax.custom_vjp
def _gather_rows(x: Array, index: Array, inverse: Array, inverse_valid: Array) -> Array:
  """out[g, p] = x[g, index[g, p]], with a backward pass that gathers instead of scattering.

  Args:
    x: [G, M, d].
    index: [G, P] int, rows of x.
    inverse: [G, M, J] int: the (at most J) positions p with index[g, p] == m whose cotangent
      reaches x[g, m]; `inverse_valid` [G, M, J] bool marks the real ones.

  Returns:
    [G, P, d]. The cotangent of x is sum_j valid * d_out[g, inverse[g, m, j]]: a row gather,
    which XLA on CPU runs several times faster than the scatter-add `take_along_axis` would
    differentiate to. Positions p missing from `inverse` must receive zero cotangent.
  """
  return jnp.take_along_axis(x, index[..., None], axis=1)


def _gather_rows_fwd(x, index, inverse, inverse_valid):
  return _gather_rows(x, index, inverse, inverse_valid), (inverse, inverse_valid)


def _gather_rows_bwd(residual, d_out):
  inverse, valid = residual
  g, m, j = inverse.shape
  rows = jnp.take_along_axis(d_out, inverse.reshape(g, m * j)[..., None], axis=1)
  d_x = jnp.sum(rows.reshape(g, m, j, -1) * valid[..., None].astype(d_out.dtype), axis=2)
  return d_x, None, None, None


_gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def gather_experts(x: Array, a: Array, b: Array,
                   instructions: RoutingInstructions,
                   input_axis: str = 'embed', output_axis: str = 'mlp') -> Array:
  """Index form, flat in E: gather tokens into [G, E, C, d_in] buffers, per-expert matmuls,
  gather each token's k outputs back.

  The matmuls cost 2*E*C*r*(d_in + d_out) per group (E*C ~ k*cf*T rows: flat in E); the gathers
  move E*C rows of x in and T*k rows of output out, and the backward pass gathers again (each
  map's inverse is known: `_gather_rows`). Slots no token fills read row 0 and are never
  combined (zero weight, zero gradient).

  Args and returns as `einsum_experts`.
  """
  del input_axis, output_axis  # Token-major throughout: data parallel.
  g, t, d_in = x.shape
  e, c = instructions.num_experts, instructions.capacity
  k = instructions.expert_index.shape[-1]
  dispatched = instructions.dispatched                                   # [G, T, K]
  # Buffer row of each choice; E*C (out of range, dropped by the scatter) when not dispatched.
  row = jnp.where(dispatched, instructions.expert_index * c + instructions.slot, e * c)
  row = row.reshape(g, t * k)
  # Per group (vmap: a scatter with a batch dimension, which partitions over G under SPMD):
  # the choice (t * K + j) that fills each buffer row, -1 for none.
  choice = jax.vmap(lambda r: jnp.full((e * c,), -1, jnp.int32).at[r].set(
      jnp.arange(t * k, dtype=jnp.int32), mode='drop'))(row)
  filled = choice >= 0
  choice = jnp.maximum(choice, 0)
  row = jnp.minimum(row, e * c - 1)
  expert_in = _gather_rows(x, choice // k, row.reshape(g, t, k), dispatched)
  hidden = jnp.einsum('gecd,erd->gecr', expert_in.reshape(g, e, c, d_in), a)
  expert_out = jnp.einsum('gecr,ero->geco', hidden, b).reshape(g, e * c, -1)
  picked = _gather_rows(expert_out, row, choice[..., None], filled[..., None])
  weight = instructions.dispatched_weight.astype(x.dtype).reshape(g, t, k, 1)
  return jnp.sum(picked.reshape(g, t, k, -1) * weight, axis=2)


EXPERT_FORMS = {
    'einsum': einsum_experts,
    'dense': dense_in_rank_experts,
    'gather': gather_experts,
}
