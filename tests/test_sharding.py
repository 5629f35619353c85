"""Mesh, logical rules and shardings: a SiRA step on a (data 2, expert 2, model 2) mesh == 1 device."""
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sharded_step
from sira_jax import cost_model, model_init, partitioning


def test_mesh_and_rules():
  mesh = partitioning.make_mesh(data=2, expert=2, model=2)
  assert mesh.axis_names == ('data', 'expert', 'model') and mesh.devices.shape == (2, 2, 2)
  assert partitioning.make_mesh(model=2).devices.shape == (4, 1, 2)  # data = -1 fills
  with pytest.raises(ValueError, match='devices'):
    partitioning.make_mesh(data=3, expert=1, model=2)
  rules = partitioning.logical_axis_rules()
  spec = partitioning.logical_to_mesh_spec
  assert spec(('expert', 'rank', 'embed'), rules) == P('expert', None, None)
  assert spec(('expert', 'rank', 'joined_kv'), rules) == P('expert', None, 'model')
  assert spec(('vocab', 'embed'), rules) == P('model', None)
  assert spec(('batch', 'length'), rules) == P(('data', 'expert'), None)
  # Expert-major buffers: E takes the expert mesh axis, the groups keep 'data'.
  assert spec(('batch', 'expert', None, 'embed'), rules) == P('data', 'expert', None, None)
  override = partitioning.logical_axis_rules(additional_rules=(('rank', 'model'),))
  assert spec(('expert', 'rank', 'embed'), override) == P('expert', 'model', None)
  assert partitioning.batch_sharding(mesh, 2).spec == P(('data', 'expert'), None)


def test_sira_step_on_mesh_matches_single_device():
  loss1, grads1, new1 = sharded_step.run(None)
  mesh = partitioning.make_mesh(data=2, expert=2, model=2)
  loss8, grads8, new8 = sharded_step.run(mesh)
  assert abs(float(loss1) - float(loss8)) < 1e-5
  for tree1, tree8 in ((grads1, grads8), (new1, new8)):
    diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         tree1, tree8)
    assert max(jax.tree.leaves(diffs)) < 1e-5, diffs
  assert max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(grads1)) > 1e-4
  # Expert weights are really split over the 'expert' axis (and lora_b's output over 'model').
  q = grads8['encoder']['layers_0']['attention']['query']
  assert q['lora_a'].sharding.spec == P('expert', None, None)
  assert q['lora_b'].sharding.spec == P('expert', None, 'model')
  n_exp = sharded_step.CONFIG.adapter.num_experts
  assert q['lora_a'].addressable_shards[0].data.shape[0] == n_exp // 2
  assert new8['decoder']['layers_0']['mlp']['wo']['lora_a'].sharding.spec[0] == 'expert'
  shard_shapes = {s.data.shape for s in new8['decoder']['layers_0']['mlp']['wo']['lora_b']
                  .addressable_shards}
  full = new8['decoder']['layers_0']['mlp']['wo']['lora_b'].shape
  assert shard_shapes == {(full[0] // 2, full[1], full[2])}  # ('expert', 'rank', 'embed')


def test_einsum_form_is_expert_parallel():
  """data 2 x expert 4: all-to-alls move the expert buffers, expert weights are never gathered,
  and the step equals one device."""
  loss1, grads1, _ = sharded_step.run(None)
  mesh = partitioning.make_mesh(data=2, expert=4, model=1)
  hlo = []
  loss8, grads8, _ = sharded_step.run(mesh, hlo=hlo)
  ops = cost_model.hlo_collectives(hlo[0])
  sites = 8  # encoder query/value/wo, decoder self query/value, cross query/value, wo
  # Forward in + out at every site, the backward's out at every site (in, too, where the input
  # gradient is needed).
  assert 3 * sites <= ops['all-to-all'][0] <= 4 * sites, ops
  assert 'all-gather' not in ops, ops  # each device computes with its own E/4 experts only
  q = grads8['encoder']['layers_0']['attention']['query']['lora_a']
  assert q.sharding.spec == P('expert', None, None)
  assert q.addressable_shards[0].data.shape[0] == sharded_step.CONFIG.adapter.num_experts // 4
  assert abs(float(loss1) - float(loss8)) < 1e-5
  diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       grads1, grads8)
  assert max(jax.tree.leaves(diffs)) < 1e-5, diffs


def test_expert_buffers_take_the_expert_axis():
  """The constraint the einsum form puts on its [G, E, C, d] buffers: G on data, E on expert;
  a dimension the mesh axes do not divide stays whole."""
  mesh = partitioning.make_mesh(data=2, expert=4, model=1)
  seen = {}

  def f(buf, one_group):
    buf = partitioning.with_logical_constraint(buf, ('batch', 'expert', None, 'embed'))
    one_group = partitioning.with_logical_constraint(one_group, ('batch', 'expert', None, 'embed'))
    jax.debug.inspect_array_sharding(buf, callback=lambda s: seen.update(buf=s))
    jax.debug.inspect_array_sharding(one_group, callback=lambda s: seen.update(one=s))
    return buf.sum() + one_group.sum()

  with partitioning.activate(mesh):
    jax.jit(f).lower(jax.ShapeDtypeStruct((4, 8, 3, 5), np.float32),
                     jax.ShapeDtypeStruct((1, 8, 3, 5), np.float32)).compile()
  assert seen['buf'].is_equivalent_to(NamedSharding(mesh, P('data', 'expert')), 4)
  assert seen['one'].is_equivalent_to(NamedSharding(mesh, P(None, 'expert')), 4)
  assert not seen['one'].is_equivalent_to(NamedSharding(mesh, P('data', 'expert')), 4)
  # T5X's partitioners bind the mesh with `with mesh:` and the rules with flax's context.
  seen.clear()
  with mesh, nn.logical_axis_rules(partitioning.logical_axis_rules()):
    jax.jit(f).lower(jax.ShapeDtypeStruct((4, 8, 3, 5), np.float32),
                     jax.ShapeDtypeStruct((1, 8, 3, 5), np.float32)).compile()
  assert seen['buf'].is_equivalent_to(NamedSharding(mesh, P('data', 'expert')), 4)
  # Unbound (no mesh, no rules): the constraint is a no-op.
  x = np.ones((4, 8, 3, 5), np.float32)
  assert partitioning.with_logical_constraint(x, ('batch', 'expert', None, None)) is x


def test_opt_state_and_variable_shardings():
  mesh = partitioning.make_mesh(data=2, expert=2, model=2)
  from sira_jax.t5.network import Transformer
  model = Transformer(sharded_step.CONFIG)
  abstract = model_init.abstract_variables(model)
  sh = partitioning.variable_shardings(abstract, mesh)['params']
  assert sh['token_embedder']['embedding'].spec == P('model', None)
  assert sh['encoder']['layers_0']['mlp']['wi_0']['kernel'].spec == P(None, 'model')
  assert sh['encoder']['relpos_bias']['rel_embedding'].spec == P('model', None)
  tx = optax.adam(1e-3)
  params_shapes = jax.tree.map(lambda x: x, jax.eval_shape(lambda: abstract)['params'])
  params_shapes = nn.unbox(params_shapes)
  o_sh = partitioning.opt_state_shardings(jax.eval_shape(tx.init, params_shapes), sh, mesh)
  mu = o_sh[0].mu
  assert mu['encoder']['layers_0']['attention']['query']['lora_a'].spec == P('expert', None, None)
  assert o_sh[0].count.spec == P()
