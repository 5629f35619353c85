"""Model level: where the train step's compile time goes, by stage and by depth.

The T5-small train step of `experiments.bench.model` is compiled with the persistent compilation
cache off, timed by stage: trace (`jax.jit(...).trace`: Python and Flax building the jaxpr),
lower (to StableHLO) and XLA compile (HLO passes and code generation). The same is done with 1+1,
2+2 and 6+6 layers, so the fixed cost and the cost of each extra encoder + decoder layer pair can be
read off; with q/k/v/o adapted a layer pair has 3 * 4 = 12 adapted (for SiRA: routed) sites. The
optimized HLO's fusion count is recorded with each row: XLA on CPU generates code for every fusion
separately, so compile time follows that count. With `layouts=('unscanned', 'scanned')` every
variant is also compiled with its layer stacks scanned (`T5Config.scan_layers`: one layer body
compiled per stack whatever the depth); its rows are named '<variant>/scanned'.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re

import jax

from experiments.bench import common, model
from sira_jax.adapters import AdapterConfig

_FUSION = re.compile(r'= \S+ fusion\(')


@contextlib.contextmanager
def persistent_cache_off():
  """Compiles inside really compile: the persistent cache is neither read nor written."""
  before = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', before)


LAYOUTS = ('unscanned', 'scanned')


def row_name(variant: str, layout: str) -> str:
  return variant if layout == 'unscanned' else f'{variant}/{layout}'


def stage_times(adapter: AdapterConfig, adapted: str, layers: int, *, small: bool,
                batch_size: int, inputs: int, targets: int, scan_layers: bool = False) -> dict:
  """Seconds to trace, lower and XLA-compile one train step with `layers` encoder and `layers`
  decoder layers (`adapted`: 'qkvo' or 'qv', as in `model.TARGETS`; `scan_layers`: each stack
  one `nn.scan`), and the optimized HLO's fusion count."""
  cfg = dataclasses.replace(model.t5_small(adapter, adapted, small=small),
                            num_encoder_layers=layers, num_decoder_layers=layers,
                            scan_layers=scan_layers)
  step, args = model.jitted_train_step(cfg, model.batch(cfg, batch_size, inputs, targets))
  with persistent_cache_off():
    traced, trace_s = common.timed(lambda: step.trace(*args))
    lowered, lower_s = common.timed(traced.lower)
    compiled, compile_s = common.timed(lowered.compile)
  hlo = compiled.as_text()
  return dict(layers=layers, trace_s=trace_s, lower_s=lower_s, compile_s=compile_s,
              total_s=trace_s + lower_s + compile_s, fusions=len(_FUSION.findall(hlo)),
              hlo_lines=hlo.count('\n'))


def run(variants: dict[str, tuple[AdapterConfig, str]], depths: list[int], *, small: bool,
        batch_size: int, inputs: int, targets: int, layouts: tuple[str, ...] = ('unscanned',),
        progress=print) -> dict:
  """Rows `row_name(variant, layout)` -> depth -> stage times, compiled depth by depth (all
  variants and layouts at one depth, then the next) so that a change in load touches every row
  alike."""
  unknown = sorted(set(layouts) - set(LAYOUTS))
  if unknown:
    raise ValueError(f'compile layouts {unknown}: known {LAYOUTS}')
  rows = {row_name(n, lay): {} for lay in layouts for n in variants}
  for layers in depths:
    for layout in layouts:
      for name, (adapter, adapted) in variants.items():
        row = row_name(name, layout)
        progress(f'compile: {row}, {layers}+{layers} layers: trace, lower, compile (cache off)')
        rows[row][layers] = stage_times(adapter, adapted, layers, small=small,
                                        batch_size=batch_size, inputs=inputs, targets=targets,
                                        scan_layers=layout == 'scanned')
  return dict(rows=rows, depths=list(depths), layouts=list(layouts))


def per_layer_pair(by_depth: dict, key: str) -> float | None:
  """Seconds one extra encoder + decoder layer pair adds (slope between the shallowest and the
  deepest depth)."""
  depths = sorted(by_depth)
  if len(depths) < 2:
    return None
  lo, hi = depths[0], depths[-1]
  return (by_depth[hi][key] - by_depth[lo][key]) / (hi - lo)


def markdown(res: dict, reference: str = 'lora') -> list[str]:
  """Tables by depth; each row's ratio is to `reference` in the same layout."""
  rows, depths = res['rows'], res['depths']
  out = ['| variant | layers | trace s | lower s | XLA compile s | total s | / ' + reference +
         ' (total, same layout) | fusions |', '|---|---|---|---|---|---|---|---|']
  for layers in depths:
    for name, by_depth in rows.items():
      r = by_depth[layers]
      ref = row_name(reference, name.split('/', 1)[1]) if '/' in name else reference
      ratio = (f'{r["total_s"] / rows[ref][layers]["total_s"]:.2f}' if ref in rows else '')
      out.append(f'| {name} | {layers}+{layers} | {r["trace_s"]:.1f} | {r["lower_s"]:.1f} | '
                 f'{r["compile_s"]:.1f} | {r["total_s"]:.1f} | {ratio} | {r["fusions"]} |')
  if len(depths) >= 2:
    out += ['', '| variant | XLA compile s per extra layer pair | total s per extra layer pair | '
            'fusions per extra layer pair |', '|---|---|---|---|']
    for name, by_depth in rows.items():
      out.append(f'| {name} | {per_layer_pair(by_depth, "compile_s"):.2f} | '
                 f'{per_layer_pair(by_depth, "total_s"):.2f} | '
                 f'{per_layer_pair(by_depth, "fusions"):.0f} |')
  return out
