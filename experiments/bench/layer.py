"""Layer level: one adapted d x d projection, forward + backward (adapter grads and the input
grad), LoRA and SiRA in every expert form, over E, token counts and group sizes.

Each (tokens, group size) cell is one interleaved timing run of LoRA and every (E, form), so the
ratios to LoRA in a cell are measured under the same load. The aux and z losses are part of the
objective ('intermediates' mutable), so XLA cannot drop the routing statistics.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.bench import common
from sira_jax import cost_model
from sira_jax.adapters import AdaptedDense, AdapterConfig, trainable_mask
from sira_jax.experts import EXPERT_FORMS


def layer_step(cfg: AdapterConfig, d: int, x: jax.Array):
  """A () -> grads closure of jit(grad) of mean(y^2) + 0.01 aux + 0.001 z for one layer."""
  layer = AdaptedDense(d, adapter=cfg)
  variables = jax.jit(layer.init)(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: p + 0.01, nn.unbox(variables['params']))
  mask = trainable_mask(params)
  trainable = {k: v for k, v in params.items() if mask[k]}
  frozen = {k: v for k, v in params.items() if not mask[k]}

  def loss(trainable, x):
    y, state = layer.apply({'params': {**frozen, **trainable}}, x, enable_dropout=True,
                           rngs={'dropout': jax.random.PRNGKey(1)}, mutable=['intermediates'])
    stats = state.get('intermediates', {})
    extra = sum(f * stats[n][0] for n, f in (('aux_loss', 0.01), ('router_z_loss', 0.001))
                if n in stats)
    return jnp.mean(y ** 2) + extra

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  compiled, compile_s = common.timed(lambda: step.lower(trainable, x).compile())
  temp = compiled.memory_analysis()
  return (lambda: jax.block_until_ready(compiled(trainable, x)), compile_s,
          getattr(temp, 'temp_size_in_bytes', None))


def run(*, d: int, rank: int, top_k: int, experts: list[int], tokens: list[int],
        group_sizes: list[int], forms: list[str], repeats: int, einsum_max_experts: int,
        progress=print) -> list[dict]:
  rows = []
  for n in tokens:
    x = jax.random.normal(jax.random.PRNGKey(2), (n // 128, 128, d))
    for group in group_sizes:
      variants = {'lora': AdapterConfig(kind='lora', rank=rank)}
      for e in experts:
        for form in forms:
          if form == 'einsum' and e > einsum_max_experts:
            continue
          variants[f'sira E={e} {form}'] = AdapterConfig(
              kind='sira', rank=rank, num_experts=e, top_k=top_k, expert_compute=form,
              max_group_size=group)
      fns, meta = {}, {}
      for name, cfg in variants.items():
        progress(f'layer: tokens={n} group={group} {name}: compiling')
        fn, compile_s, temp = layer_step(cfg, d, x)
        fns[name] = fn
        meta[name] = dict(compile_s=compile_s, temp_bytes=temp)
      progress(f'layer: tokens={n} group={group}: timing {len(fns)} variants x {repeats}')
      timing = common.interleaved(fns, repeats)
      lora_s = timing['lora']['median_s']
      for name, cfg in variants.items():
        row = dict(tokens=n, group_size=group, variant=name, kind=cfg.kind,
                   num_experts=cfg.num_experts if cfg.kind == 'sira' else None,
                   form=cfg.expert_compute if cfg.kind == 'sira' else '-',
                   median_s=timing[name]['median_s'], vs_lora=timing[name]['median_s'] / lora_s,
                   load=timing['_load'], **meta[name])
        if cfg.kind == 'sira':
          site = cost_model.Site(tokens=n, d_in=d, d_out=d, rank=rank, num_experts=cfg.num_experts,
                                 top_k=top_k, group_size=group)
          row['auto_form'] = cost_model.choose_form(site, backend=jax.default_backend())
        rows.append(row)
  return rows


def markdown(rows: list[dict]) -> str:
  """One table per (tokens, group): rows E, columns forms, cells time vs LoRA."""
  out = []
  cells = sorted({(r['tokens'], r['group_size']) for r in rows})
  for n, group in cells:
    sub = [r for r in rows if (r['tokens'], r['group_size']) == (n, group)]
    forms = [f for f in EXPERT_FORMS if any(r['form'] == f for r in sub)]
    lora = next(r for r in sub if r['kind'] == 'lora')
    out.append(f'\n**{n} tokens, groups of {group}** (LoRA {1e3 * lora["median_s"]:.1f} ms; '
               f'load {lora["load"]["before"][0]}-{lora["load"]["after"][0]})\n')
    out.append('| E | ' + ' | '.join(f'{f} / LoRA' for f in forms) + ' | auto picks |')
    out.append('|---|' + '---|' * (len(forms) + 1))
    for e in sorted({r['num_experts'] for r in sub if r['num_experts']}):
      by_form = {r['form']: r for r in sub if r['num_experts'] == e}
      cells_e = [f'{by_form[f]["vs_lora"]:.2f}' if f in by_form else '-' for f in forms]
      auto = next(iter(by_form.values()))['auto_form']
      out.append(f'| {e} | ' + ' | '.join(cells_e) + f' | {auto} |')
  return '\n'.join(out)
