"""One SiRA training step on a tiny T5, unsharded or on a (data, expert, model) mesh.

Shared by tests/test_sharding.py and the multi-process worker (tests/multiprocess_worker.py).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from sira_jax import model_init
from sira_jax import partitioning
from sira_jax.adapters import AdapterConfig, trainable_mask
from sira_jax.optim import merge_params, partition_params
from sira_jax.t5.config import small_test_config
from sira_jax.t5.network import Transformer

CONFIG = small_test_config(
    vocab_size=64, num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0,
    adapter=AdapterConfig(kind='sira', num_experts=4, top_k=2, expert_compute='einsum',
                          capacity_factor=1.0, expert_dropout_rate=0.1, max_group_size=6),
    adapter_targets=('*/query', '*/value', '*/mlp/wo'))
AUX_FACTOR = 0.01
_SINGLE = []


def batch(batch_size=8, inp=6, tgt=6):
  rs = np.random.RandomState(0)
  enc = rs.randint(2, 64, (batch_size, inp)).astype(np.int32)
  enc[1, 4:] = 0
  targets = rs.randint(2, 64, (batch_size, tgt)).astype(np.int32)
  targets[2, 3:] = 0
  dec_in = np.concatenate([np.zeros((batch_size, 1), np.int32), targets[:, :-1]], 1)
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec_in,
          'decoder_target_tokens': targets}


@functools.lru_cache(maxsize=None)
def host_params(model):
  """Deterministic params (numpy), with nonzero lora_b so adapters matter."""
  v = nn.unbox(jax.jit(model_init.init_fn(model))(jax.random.PRNGKey(0)))
  def bump(path, x):
    if 'lora_b' in jax.tree_util.keystr(path):
      return x + 0.1 * jax.random.normal(jax.random.PRNGKey(7), x.shape, x.dtype)
    return x
  return jax.tree.map(np.asarray, jax.tree_util.tree_map_with_path(bump, v['params']))


def make_step(model, tx):
  def loss_fn(trainable, frozen, b, rng):
    params = merge_params(trainable, frozen)
    logits, mods = model.apply(
        {'params': params}, b['encoder_input_tokens'], b['decoder_input_tokens'],
        b['decoder_target_tokens'], enable_dropout=True, rngs={'dropout': rng},
        mutable=['intermediates'])
    targets = b['decoder_target_tokens']
    weights = (targets > 0).astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    loss = jnp.sum(ce * weights) / jnp.sum(weights)
    aux = [x for p, x in jax.tree_util.tree_flatten_with_path(mods['intermediates'])[0]
           if 'aux_loss' in jax.tree_util.keystr(p)]
    return loss + AUX_FACTOR * jnp.mean(jnp.stack(aux))

  def step(trainable, frozen, opt_state, b, rng):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, b, rng)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return loss, grads, optax.apply_updates(trainable, updates), opt_state
  return step


def save_params(path):
  """Writes host_params to an .npz (workers load it instead of compiling the init again)."""
  flat = traverse_util.flatten_dict(host_params(Transformer(CONFIG)), sep='/')
  np.savez(path, **flat)


def load_params(path):
  with np.load(path) as z:
    return traverse_util.unflatten_dict({k: z[k] for k in z.files}, sep='/')


def run(mesh=None, process_local_batch=False, params=None, hlo=None):
  """-> (loss, grads, new_trainable) for one step; mesh None = 1 device.

  Routing groups are one example each (max_group_size=6 = the input and target lengths), so the
  8 groups of a batch split over any batch mesh axes. hlo: an optional list that receives the
  compiled step's HLO text (mesh runs).
  """
  model = Transformer(CONFIG)
  # SGD with momentum: a params-shaped optimizer state, and an update linear in the grads (Adam's
  # first step, ~lr * sign(g), would amplify float noise on near-zero grads).
  tx = optax.sgd(0.1, momentum=0.9)
  params = host_params(model) if params is None else params
  trainable, frozen = partition_params(params, trainable_mask(params))
  b = batch()
  rng = jax.random.PRNGKey(42)
  step = make_step(model, tx)
  if mesh is None and _SINGLE:
    return _SINGLE[0]
  if mesh is None:
    dev = jax.devices()[0]
    trainable, frozen, b = jax.device_put((trainable, frozen, b), dev)
    opt_state = tx.init(trainable)
    loss, grads, new, _ = jax.jit(step)(trainable, frozen, opt_state, b, rng)
    _SINGLE.append((loss, grads, new))  # the reference is reused within one pytest session
    return loss, grads, new
  rules = partitioning.logical_axis_rules()
  abstract = model_init.abstract_variables(model)
  shardings = partitioning.variable_shardings(abstract, mesh, rules)['params']
  t_sh, f_sh = partition_params(shardings, trainable_mask(shardings))
  trainable = partitioning.place(trainable, t_sh)
  frozen = partitioning.place(frozen, f_sh)
  o_sh = partitioning.opt_state_shardings(jax.eval_shape(tx.init, trainable), t_sh, mesh)
  opt_state = jax.jit(tx.init, out_shardings=o_sh)(trainable)
  if process_local_batch:
    n, i = jax.process_count(), jax.process_index()
    local = {k: v[i * len(v) // n:(i + 1) * len(v) // n] for k, v in b.items()}
    gb = partitioning.shard_batch(local, mesh, rules, process_local=True)
  else:
    gb = partitioning.shard_batch(b, mesh, rules)
  b_sh = jax.tree.map(lambda x: x.sharding, gb)
  rep = partitioning.replicated(mesh)
  jstep = jax.jit(step, in_shardings=(t_sh, f_sh, o_sh, b_sh, rep),
                  out_shardings=(rep, t_sh, t_sh, o_sh))
  with partitioning.activate(mesh, rules):
    compiled = jstep.lower(trainable, frozen, opt_state, gb, rng).compile()
  if hlo is not None:
    hlo.append(compiled.as_text())
  loss, grads, new, _ = compiled(trainable, frozen, opt_state, gb, rng)
  return loss, grads, new


def summary(loss, grads):
  """Replicated scalars that every process can read: loss and per-leaf grad sums / norms."""
  leaves = jax.tree.leaves(grads)
  s = jax.jit(lambda ls: jnp.stack([jnp.sum(l) for l in ls] + [jnp.sqrt(jnp.sum(l * l)) for l in ls]),
              out_shardings=None)(leaves)
  return float(np.asarray(loss.addressable_data(0))), np.asarray(s.addressable_data(0))
