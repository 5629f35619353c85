r"""Routing cost benchmark: one adapted projection, forward + backward.

Times LoRA and each mixture variant in each expert-computation form on the
same input, and reports medians and ratios to LoRA measured within one run
(machines are noisy: compare ratios, not seconds). Also compares the storage
layout of the low-rank weight ([r, d_in], used by sira_jax, vs [d_in, r]).

  python -m experiments.bench_routing --tokens=8192 --d_model=512 \
      --num_experts=8,32 --out=experiments/results/bench_routing.json
"""

import json
import os
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from sira_jax.adapters import AdaptedDense, AdapterConfig, trainable_mask

FLAGS = flags.FLAGS
flags.DEFINE_integer('tokens', 8192, 'Tokens per step (batch * length).')
flags.DEFINE_integer('d_model', 512, 'Input and output width.')
flags.DEFINE_integer('rank', 4, 'LoRA rank r.')
flags.DEFINE_integer('top_k', 2, 'Experts per token (sira).')
flags.DEFINE_list('num_experts', ['8', '32'], 'Expert counts E to time.')
flags.DEFINE_integer('group_size', 256, 'max_group_size T.')
flags.DEFINE_integer('repeats', 15, 'Timed repeats per variant (median).')
flags.DEFINE_string('out', '', 'Optional JSON output path (never overwritten).')


def time_fn(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def layer_step(cfg, d, x):
  """jit(grad) of a squared-output loss w.r.t. trainable params and x."""
  layer = AdaptedDense(d, adapter=cfg)
  variables = layer.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: p + 0.01, jax.tree.map(
      np.asarray, __import__('flax').linen.meta.unbox(variables['params'])))
  mask = trainable_mask(params)
  trainable = {k: v for k, v in params.items() if mask[k]}
  frozen = {k: v for k, v in params.items() if not mask[k]}

  @jax.jit
  def step(trainable, x):
    def loss(trainable, x):
      y = layer.apply({'params': {**frozen, **trainable}}, x,
                      enable_dropout=True,
                      rngs={'dropout': jax.random.PRNGKey(1)})
      return jnp.mean(y ** 2)
    return jax.grad(loss, argnums=(0, 1))(trainable, x)

  return step, trainable


def layout_step(d, r, n, rank_first):
  """Plain LoRA grad with A stored [r, d] (rank_first) or [d, r]."""
  shape = (r, d) if rank_first else (d, r)
  a = jnp.full(shape, 0.01)
  b = jnp.full((r, d), 0.01)
  x = jnp.ones((n, d))
  eq = 'nd,rd->nr' if rank_first else 'nd,dr->nr'

  @jax.jit
  def step(a, b, x):
    return jax.grad(lambda a, b: jnp.mean(
        (jnp.einsum(eq, x, a) @ b) ** 2), argnums=(0, 1))(a, b)

  return step, (a, b, x)


def main(argv):
  del argv
  if FLAGS.out and os.path.exists(FLAGS.out):
    raise SystemExit(f'--out {FLAGS.out} exists; choose a new path '
                     '(results are never overwritten).')
  d, n = FLAGS.d_model, FLAGS.tokens
  x = jax.random.normal(jax.random.PRNGKey(2), (n // 128, 128, d))
  variants = [('lora', None, AdapterConfig(kind='lora', rank=FLAGS.rank))]
  for e in map(int, FLAGS.num_experts):
    common = dict(rank=FLAGS.rank, num_experts=e, max_group_size=FLAGS.group_size)
    for form in ('dense', 'einsum'):
      variants.append((f'sira E={e}', form, AdapterConfig(
          kind='sira', top_k=FLAGS.top_k, expert_compute=form, **common)))
    variants.append((f'molora E={e}', 'dense', AdapterConfig(
        kind='molora', expert_compute='dense', **common)))
    variants.append((f'smoe_dropout E={e}', 'dense', AdapterConfig(
        kind='smoe_dropout', top_k=FLAGS.top_k, expert_compute='dense',
        **common)))
    variants.append((f'adamix E={e}', None, AdapterConfig(kind='adamix',
                                                         **common)))
  rows = []
  for name, form, cfg in tqdm.tqdm(variants, desc='variants'):
    step, trainable = layer_step(cfg, d, x)
    rows.append(dict(variant=name, form=form or '-',
                     seconds=time_fn(step, trainable, x,
                                     repeats=FLAGS.repeats)))
  lora_s = rows[0]['seconds']
  for row in rows:
    row['vs_lora'] = row['seconds'] / lora_s
  layouts = {}
  for rank_first in (True, False):
    step, args = layout_step(d, FLAGS.rank, n, rank_first)
    layouts['[r, d_in]' if rank_first else '[d_in, r]'] = time_fn(
        step, *args, repeats=FLAGS.repeats)

  print(f'\nOne {d}x{d} projection, {n} tokens, r={FLAGS.rank}, '
        f'k={FLAGS.top_k}, T={FLAGS.group_size}, grads of adapters and x; '
        f'backend={jax.default_backend()}')
  print('| variant | form | median ms | vs LoRA |')
  print('|---|---|---|---|')
  for row in rows:
    print(f"| {row['variant']} | {row['form']} | {1e3 * row['seconds']:.2f} | "
          f"{row['vs_lora']:.2f} |")
  ratio = layouts['[d_in, r]'] / layouts['[r, d_in]']
  print(f'\nLoRA grad step, A stored [d_in, r] vs [r, d_in]: {ratio:.2f}x '
        'the time')
  if FLAGS.out:
    os.makedirs(os.path.dirname(FLAGS.out) or '.', exist_ok=True)
    with open(FLAGS.out, 'x') as f:
      json.dump(dict(rows=rows, layout_seconds=layouts,
                     flags={k: FLAGS[k].value for k in (
                         'tokens', 'd_model', 'rank', 'top_k', 'num_experts',
                         'group_size', 'repeats')},
                     backend=jax.default_backend()), f, indent=1)


if __name__ == '__main__':
  app.run(main)
