"""The layout table: per device and step, adapter cost of T5-base..XXL (q/k/v/o adapted, SiRA
E=8 k=2 r=4, cf 1.25, groups of 1024) on 8..256 devices, replicated local experts (data
parallel, `dense`/`gather`) vs expert parallel (`einsum`, expert axis = min(E, devices)), from
`sira_jax.cost_model` with its `ACCELERATOR` roofline constants (assumptions, not measurements).
"""
from __future__ import annotations

from sira_jax import cost_model

# (d_model, heads * d_kv, encoder layers, decoder layers) of T5.1.1.
T5_SIZES = {'base': (768, 768, 12, 12), 'large': (1024, 1024, 24, 24),
            'xl': (2048, 2048, 24, 24), 'xxl': (4096, 4096, 24, 24)}


def sites(size: str, batch: int, inputs: int, targets: int, **site_kw):
  """Every q/k/v/o site of one step: (count, Site)."""
  d, inner, enc_layers, dec_layers = T5_SIZES[size]
  n_in, n_out = batch * inputs, batch * targets
  qkv = dict(d_in=d, d_out=inner)
  out = dict(d_in=inner, d_out=d)
  return [
      (3 * enc_layers, cost_model.Site(tokens=n_in, **qkv, **site_kw)),   # encoder q, k, v
      (enc_layers, cost_model.Site(tokens=n_in, **out, **site_kw)),       # encoder o
      (4 * dec_layers, cost_model.Site(tokens=n_out, **qkv, **site_kw)),  # self q/k/v, cross q
      (2 * dec_layers, cost_model.Site(tokens=n_in, **qkv, **site_kw)),   # cross k, v
      (2 * dec_layers, cost_model.Site(tokens=n_out, **out, **site_kw)),  # self o, cross o
  ]


def step_cost(size, form, mesh, **kw):
  flops = local = link = 0.0
  for count, site in sites(size, **kw):
    c = cost_model.form_cost(form, site, mesh)
    flops += count * c.flops
    local += count * c.local_bytes
    link += count * c.link_bytes
  total = cost_model.Cost(flops=flops, local_bytes=local, link_bytes=link, collectives={})
  return total, cost_model.step_seconds(total, cost_model.ACCELERATOR)


def table(devices=(8, 32, 256), sizes=tuple(T5_SIZES), batch=256, inputs=512, targets=128,
          num_experts=8, **site_kw) -> list[dict]:
  rows = []
  kw = dict(batch=batch, inputs=inputs, targets=targets, num_experts=num_experts, **site_kw)
  for size in sizes:
    for n in devices:
      x = min(num_experts, n)
      local_mesh = cost_model.MeshShape(data=n)
      ep_mesh = cost_model.MeshShape(data=n // x, expert=x)
      row = dict(size=size, devices=n, expert_axis=x)
      for name, form, mesh in (('dense', 'dense', local_mesh), ('gather', 'gather', local_mesh),
                               ('einsum_ep', 'einsum', ep_mesh)):
        cost, seconds = step_cost(size, form, mesh, **kw)
        row[name] = dict(gflops=cost.flops / 1e9, local_mb=cost.local_bytes / 1e6,
                         link_mb=cost.link_bytes / 1e6, est_ms=1e3 * seconds)
      row['best'] = min(('dense', 'gather', 'einsum_ep'), key=lambda f: row[f]['est_ms'])
      rows.append(row)
  return rows


def markdown(rows) -> str:
  out = ['| T5 | devices | dense: GFLOP / link MB / est. ms | gather: GFLOP / memory MB / est. ms '
         '| einsum, expert axis X: GFLOP / all-to-all MB / est. ms | cheapest |',
         '|---|---|---|---|---|---|']
  for r in rows:
    d, g, e = r['dense'], r['gather'], r['einsum_ep']
    out.append(f"| {r['size']} | {r['devices']} | {d['gflops']:.1f} / {d['link_mb']:.2f} / "
               f"{d['est_ms']:.2f} | {g['gflops']:.1f} / {g['local_mb']:.0f} / {g['est_ms']:.2f} "
               f"| X={r['expert_axis']}: {e['gflops']:.1f} / {e['link_mb']:.0f} / "
               f"{e['est_ms']:.2f} | {r['best']} |")
  return '\n'.join(out)
