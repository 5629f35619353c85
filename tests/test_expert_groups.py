"""Routing groups follow the bound mesh: every batch shard has its own groups, so the einsum form
keeps its expert parallelism whatever max_group_size is (issue 31, part 2b)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sira_jax import cost_model, partitioning, routing
from sira_jax.adapters import AdaptedDense, AdapterConfig

BATCH, LENGTH, D_IN, D_OUT, E = 32, 8, 24, 32, 8  # 256 tokens


def test_group_count_is_a_multiple_of_the_batch_shards():
  assert routing.group_shards(256, ()) == 1
  assert routing.group_shards(256, (4, 2)) == 8
  assert routing.group_shards(4, (4, 2)) == 4     # 4 tokens split over 'data' only
  assert routing.group_shards(6, (4, 2)) == 1
  assert routing.group_layout(256, 64) == (4, 64)  # one device: ceil(N / max_group_size)
  assert routing.group_layout(256, 64, 8) == (8, 32)
  assert routing.group_layout(256, 32, 8) == (8, 32)
  assert routing.group_layout(256, 16, 8) == (16, 16)
  assert routing.group_layout(200, 16, 8) == (16, 13)  # 25 tokens a shard: 2 groups of 13
  with pytest.raises(ValueError, match='do not split into 8 batch shards'):
    routing.group_layout(12, 16, 8)


def test_groups_stay_within_their_shard():
  """Each shard's padding sits at the end of its own block, and from_groups undoes to_groups."""
  x = np.arange(10, dtype=np.int32)
  grouped = routing.to_groups(x, 4, 3, shards=2)  # 5 tokens a shard: 2 groups of 3
  np.testing.assert_array_equal(grouped, [[0, 1, 2], [3, 4, 0], [5, 6, 7], [8, 9, 0]])
  np.testing.assert_array_equal(routing.from_groups(grouped, 10, shards=2), x)
  mask = routing.to_groups(np.ones(10, bool), 4, 3, shards=2)
  assert mask.sum() == 10 and not mask[1, 2] and not mask[3, 2]
  # One shard: the layout of one device (padding at the end).
  np.testing.assert_array_equal(routing.to_groups(x[:5], 2, 3), [[0, 1, 2], [3, 4, 0]])


def _layer(max_group_size):
  cfg = AdapterConfig(kind='sira', num_experts=E, top_k=2, expert_compute='einsum',
                      max_group_size=max_group_size)
  return AdaptedDense(D_OUT, adapter=cfg)


def _grads(layer):
  """Training step of the layer alone (training capacity, as the cost model's Site)."""
  def loss(params, x):
    y = layer.apply({'params': params}, x, enable_dropout=True,
                    rngs={'dropout': jax.random.PRNGKey(2)})
    return jnp.sum(jnp.sin(y))
  return jax.grad(loss, argnums=(0, 1))


@pytest.mark.parametrize('max_group_size', [64, 32])
def test_einsum_form_stays_expert_parallel(max_group_size):
  """256 tokens on data 4 x expert 2: max_group_size 64 gives 4 groups on one device but 8 on
  the mesh (before: 4 groups for 8 shards, all-gathers and no all-to-all). Both sizes compile to
  all-to-alls of the expert buffers and no all-gather, the cost model predicts the compiled
  collectives, and the values equal one device routing the same 8 groups of 32."""
  mesh = partitioning.make_mesh(data=4, expert=2, model=1)
  rules = partitioning.logical_axis_rules()
  layer = _layer(max_group_size)
  x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, LENGTH, D_IN))
  boxed = layer.init(jax.random.PRNGKey(1), x)['params']
  params = jax.tree.map(lambda p: p + 0.05, nn.unbox(boxed))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  batch = NamedSharding(mesh, P(('data', 'expert')))
  with partitioning.activate(mesh, rules):
    compiled = jax.jit(_grads(layer), in_shardings=(shardings, batch)).lower(params, x).compile()
    sharded = compiled(jax.device_put(params, shardings), jax.device_put(x, batch))
  ops = cost_model.hlo_collectives(compiled.as_text())
  assert ops['all-to-all'][0] == 4 and 'all-gather' not in ops, ops

  site = cost_model.Site(tokens=BATCH * LENGTH, d_in=D_IN, d_out=D_OUT, rank=4, num_experts=E,
                         top_k=2, group_size=max_group_size)
  shape = cost_model.MeshShape(data=4, expert=2)
  assert cost_model.grouping(site, shape)[:2] == (8, 32)
  assert dict(cost_model.form_cost('einsum', site, shape).collectives) == ops

  single = jax.jit(_grads(_layer(32)))(params, x)  # one device, the mesh's 8 groups of 32
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_cost_model_counts_the_groups_of_the_mesh():
  """The estimate uses the mesh's group count: on one device max_group_size 64 is 4 groups of
  64, on 8 batch shards 8 groups of 32, whose smaller capacity buffers the FLOPs follow."""
  site = cost_model.Site(tokens=256, d_in=D_IN, d_out=D_OUT, rank=4, num_experts=E, top_k=2,
                         group_size=64)
  one, mesh = cost_model.MeshShape(), cost_model.MeshShape(data=4, expert=2)
  assert cost_model.grouping(site, one) == (4, 64, 20)
  assert cost_model.grouping(site, mesh) == (8, 32, 10)
  same_groups = cost_model.Site(**{**site.__dict__, 'group_size': 32})
  assert cost_model.form_cost('einsum', site, mesh) == cost_model.form_cost(
      'einsum', same_groups, mesh)
  # Per device the einsum form's dispatch work halves with T (its masks are [G, T, E, C]).
  assert (cost_model.form_cost('einsum', site, mesh).flops <
          cost_model.form_cost('einsum', site, one).flops / 8)


def test_strict_group_size_refuses_a_layout_unlike_one_device():
  """strict_group_size keeps one device's groups: 64 (4 groups for 8 shards) is refused with the
  fix named; 32 (8 groups of 32 on one device as on the mesh) traces; one device never refuses."""
  mesh = partitioning.make_mesh(data=4, expert=2, model=1)
  x = jax.ShapeDtypeStruct((BATCH, LENGTH, D_IN), jnp.float32)

  def trace(max_group_size, bound=True):
    cfg = AdapterConfig(kind='sira', num_experts=E, top_k=2, expert_compute='einsum',
                        max_group_size=max_group_size, strict_group_size=True)
    layer = AdaptedDense(D_OUT, adapter=cfg)
    if not bound:
      return jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
    with partitioning.activate(mesh):
      return jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)

  with pytest.raises(ValueError, match=r'max_group_size=64 gives 4 groups of 64 for 256 tokens.*'
                     r'8 batch shards.*divisor of 32.*e\.g\. 32.*strict_group_size=False.*'
                     r'8 groups of 32'):
    trace(64)
  assert nn.unbox(trace(32))['params']['lora_a'].shape == (E, 4, D_IN)
  assert nn.unbox(trace(64, bound=False))['params']['lora_a'].shape == (E, 4, D_IN)
