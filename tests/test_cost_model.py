"""The cost model's collectives equal what XLA compiles for one SiRA projection on a CPU mesh."""
import flax.linen as nn
import jax
import jax.numpy as jnp
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
  big = cost_model.Site(tokens=8192, d_in=512, d_out=512, rank=4, num_experts=64)
  assert cost_model.choose_form(site) == 'dense'
  assert cost_model.choose_form(big) == 'gather'
  one = cost_model.MeshShape()
  # The gather form's FLOPs do not grow with E; the dense form's do, ~linearly.
  g8, g64 = (cost_model.form_cost('gather', s, one).flops for s in (site, big))
  d8, d64 = (cost_model.form_cost('dense', s, one).flops for s in (site, big))
  assert g64 < 1.2 * g8 and d64 > 6 * d8
  with pytest.raises(ValueError, match='unknown form'):
    cost_model.form_cost('ragged', site, one)
