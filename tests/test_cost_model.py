"""The cost model's collectives equal what XLA compiles for one SiRA projection on a CPU mesh."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sira_jax import cost_model, partitioning
from sira_jax.adapters import AdaptedDense, AdapterConfig

TOKENS, D_IN, D_OUT, E, GROUP = 256, 24, 32, 8, 16


def compiled_collectives(form, mesh):
  cfg = AdapterConfig(kind='sira', num_experts=E, top_k=2, expert_compute=form,
                      max_group_size=GROUP)
  layer = AdaptedDense(D_OUT, adapter=cfg)
  x = jax.ShapeDtypeStruct((TOKENS // GROUP, GROUP, D_IN), jnp.float32)
  abstract = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
  rules = partitioning.logical_axis_rules()
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract['params']), mesh, rules)

  def grads(params, x):
    def loss(params, x):
      y = layer.apply({'params': params}, x, enable_dropout=True,
                      rngs={'dropout': jax.random.PRNGKey(2)})
      return jnp.sum(y ** 2)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        nn.unbox(abstract['params']), shardings)
  x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P(('data', 'expert'))))
  with partitioning.activate(mesh, rules):
    text = jax.jit(grads).lower(params, x).compile().as_text()
  return cost_model.hlo_collectives(text)


@pytest.mark.parametrize('form', ['einsum', 'dense', 'gather'])
def test_collectives_match_compiled_hlo(form):
  mesh = partitioning.make_mesh(data=2, expert=4, model=1)
  site = cost_model.Site(tokens=TOKENS, d_in=D_IN, d_out=D_OUT, rank=4, num_experts=E, top_k=2,
                         group_size=GROUP)
  predicted = cost_model.form_cost(form, site, cost_model.MeshShape(data=2, expert=4))
  assert compiled_collectives(form, mesh) == dict(predicted.collectives)


def test_choice_and_flat_gather_cost():
  site = cost_model.Site(tokens=8192, d_in=512, d_out=512, rank=4, num_experts=8)
  big = cost_model.Site(tokens=8192, d_in=512, d_out=512, rank=4, num_experts=256)
  assert cost_model.choose_form(site) == 'dense'
  assert cost_model.choose_form(big) == 'gather'
  one = cost_model.MeshShape()

  def expert_flops(form, s):  # without the router's d x E matmul, which every form pays
    return cost_model.form_cost(form, s, one).flops - 6 * s.tokens * s.d_in * s.num_experts

  # The gather form's expert FLOPs do not grow with E; the dense form's grow linearly.
  assert expert_flops('gather', big) < 1.1 * expert_flops('gather', site)
  assert expert_flops('dense', big) == 32 * expert_flops('dense', site)
  # On an expert-sharded accelerator mesh, replicated LoRA experts beat the all-to-all.
  mesh = cost_model.MeshShape(data=4, expert=8)
  assert cost_model.choose_form(site, mesh, backend='tpu') in ('dense', 'gather')
  with pytest.raises(ValueError, match='unknown form'):
    cost_model.form_cost('ragged', site, one)


def t5x_moe_rules():
  """T5X's MoE rules when t5x is installed (sira_jax.t5x.partitioning), else the same ordering
  written out: batch -> ('expert', 'data') first, 'expert' and 'expert_replicas' after."""
  try:
    from sira_jax.t5x import partitioning as t5x_rules
    return tuple(t5x_rules.moe_logical_axis_rules())
  except ImportError:
    own = [r for r in partitioning.logical_axis_rules()
           if r[0] not in ('batch', 'cache_batch', 'expert', 'expert_replicas')]
    return tuple([('batch', ('expert', 'data'))] + own +
                 [('expert', 'expert'), ('expert_replicas', 'data')])


@pytest.mark.parametrize('rules', ['project', 't5x_moe'])
def test_einsum_form_is_expert_parallel_under_both_rule_sets(rules):
  """One SiRA projection, einsum form, data 2 x expert 4: all-to-alls, expert weights never
  gathered, and values and gradients equal to one device."""
  rules = partitioning.logical_axis_rules() if rules == 'project' else t5x_moe_rules()
  mesh = partitioning.make_mesh(data=2, expert=4, model=1)
  cfg = AdapterConfig(kind='sira', num_experts=E, top_k=2, expert_compute='einsum',
                      max_group_size=GROUP, expert_dropout_rate=0.1)
  layer = AdaptedDense(D_OUT, adapter=cfg)
  x = jax.random.normal(jax.random.PRNGKey(0), (TOKENS // GROUP, GROUP, D_IN))
  params = jax.tree.map(lambda p: p + 0.05, nn.unbox(layer.init(jax.random.PRNGKey(1), x))['params'])

  def grads(params, x):
    def loss(params, x):
      y = layer.apply({'params': params}, x, enable_dropout=True,
                      rngs={'dropout': jax.random.PRNGKey(2)})
      return jnp.sum(jnp.sin(y))
    return jax.value_and_grad(loss, argnums=(0, 1))(params, x)

  single = jax.jit(grads)(params, x)
  specs = nn.get_partition_spec(layer.init(jax.random.PRNGKey(1), x)['params'])
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  batch = nn.logical_to_mesh_sharding(P('batch'), mesh, rules)
  with partitioning.activate(mesh, rules):
    step = jax.jit(grads, in_shardings=(shardings, batch))
    compiled = step.lower(params, x).compile()
    sharded = compiled(jax.device_put(params, shardings), jax.device_put(x, batch))
  ops = cost_model.hlo_collectives(compiled.as_text())
  assert ops['all-to-all'][0] == 4 and 'all-gather' not in ops, ops
  assert shardings['lora_a'].spec[0] == 'expert'
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
