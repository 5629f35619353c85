"""Mesh, logical rules and shardings: a SiRA step on a (data 2, expert 2, model 2) mesh == 1 device."""
import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import sharded_step
from sira_jax import partitioning


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


def test_opt_state_and_variable_shardings():
  mesh = partitioning.make_mesh(data=2, expert=2, model=2)
  from sira_jax.t5.network import Transformer
  model = Transformer(sharded_step.CONFIG)
  abstract = partitioning.abstract_variables(model)
  sh = partitioning.variable_shardings(abstract, mesh)['params']
  assert sh['token_embedder']['embedding'].spec == P('model', None)
  assert sh['encoder']['layers_0']['mlp']['wi_0']['kernel'].spec == P(None, 'model')
  assert sh['encoder']['relpos_bias']['rel_embedding'].spec == P('model', None)
  tx = optax.adam(1e-3)
  params_shapes = jax.tree.map(lambda x: x, jax.eval_shape(lambda: abstract)['params'])
  import flax.linen as nn
  params_shapes = nn.unbox(params_shapes)
  o_sh = partitioning.opt_state_shardings(jax.eval_shape(tx.init, params_shapes), sh, mesh)
  mu = o_sh[0].mu
  assert mu['encoder']['layers_0']['attention']['query']['lora_a'].spec == P('expert', None, None)
  assert o_sh[0].count.spec == P()
