r"""One command for every benchmark: layer level, model level (train step, compile time, memory),
compile time by stage and depth, cached decoding, the PEFT peer, the cost-model layout table and
the per-device memory of real-size models compiled on simulated CPU meshes; writes results.json and
results.md into a new directory (never overwritten).

  python -m experiments.bench --out=experiments/results/bench_cpu      # full (~40 min, 2 cores)
  python -m experiments.bench --smoke --out=/tmp/bench_smoke            # seconds: CI smoke
  python -m experiments.bench --parts=memory --out=experiments/results/memory_cpu  # hours: mT5
      # XL/XXL x SiRA/LoRA x meshes x remat/scan variants (--memory_* flags pick a subset)

Ratios are within one run, medians over interleaved repeats, with the load average recorded;
compare ratios, not seconds. `--parts` picks a subset (layer,model,profile,compile,decode,peer,
cost, and memory, which only runs when named).
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from experiments.bench import (common, compile_time, cost_table, layer, memory, model, peer,
                               profile)
from sira_jax import partitioning
from sira_jax.adapters import AdapterConfig

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'New output directory for results.json and results.md.')
flags.DEFINE_bool('smoke', False, 'Tiny shapes and one repeat: a seconds-long check of the code.')
PARTS = ('layer', 'model', 'profile', 'compile', 'decode', 'peer', 'cost', 'memory')
flags.DEFINE_list('parts', [p for p in PARTS if p != 'memory'],
                  'Parts to run (memory, hours at full size, only when named).')
flags.DEFINE_integer('repeats', 5, 'Interleaved timed repeats per variant (median).')
flags.DEFINE_list('experts', ['4', '8', '32', '64'], 'Layer level: expert counts E.')
flags.DEFINE_list('tokens', ['8192'], 'Layer level: tokens per step.')
flags.DEFINE_list('group_sizes', ['256', '1024'], 'Layer level: max_group_size values.')
flags.DEFINE_integer('einsum_max_experts', 8, 'Layer level: largest E timed in the einsum form.')
flags.DEFINE_integer('peer_threads', None, 'torch threads of the PEFT peer (default: all cores, '
                     'as jax uses).')
flags.DEFINE_list('model_variants', ['lora', 'sira8', 'sira32', 'sira8_einsum', 'lora_qv',
                                     'sira8_qv'], 'Model level variants.')
flags.DEFINE_list('compile_variants', ['lora', 'sira8', 'sira32'],
                  'Compile part: variants (names as --model_variants).')
flags.DEFINE_list('compile_depths', ['1', '2', '6'],
                  'Compile part: encoder (= decoder) layer counts.')
flags.DEFINE_list('compile_layouts', ['unscanned'],
                  f'Compile part: layer-stack layouts ({", ".join(compile_time.LAYOUTS)}).')

flags.DEFINE_list('memory_models', ['mt5_xl', 'mt5_xxl'],
                  f'Memory part: models ({sorted(memory.MODELS)}).')
flags.DEFINE_list('memory_adapters', ['sira8', 'lora'],
                  f'Memory part: adapters ({sorted(memory.ADAPTERS)}).')
flags.DEFINE_list('memory_meshes', ['2x4', '4x8'],
                  'Memory part: simulated meshes, DATAxMODEL (or DATAxEXPERTxMODEL).')
flags.DEFINE_list('memory_variants', list(memory.VARIANTS),
                  'Memory part: T5Config variants (scan_layers, remat_policy).')
flags.DEFINE_multi_string('memory_bindings', [], "Memory part: extra gin bindings, e.g. "
                          "\"ACTIVATION_DTYPE = 'bfloat16'\".")
flags.DEFINE_integer('memory_batch_size', None, 'Memory part: global batch (default: '
                     'gin/t5x/runs/train_common.gin BATCH_SIZE).')
flags.DEFINE_integer('memory_timeout', 3600, 'Memory part: seconds per compilation.')


def model_variants(names):
  table = {
      'lora': (AdapterConfig(kind='lora', rank=4), 'qkvo'),
      # LoRA at SiRA's total rank E*r (E=8, E=32): the dense form's low-rank matmul widths.
      'lora32': (AdapterConfig(kind='lora', rank=32), 'qkvo'),
      'lora128': (AdapterConfig(kind='lora', rank=128), 'qkvo'),
      'sira8': (AdapterConfig(kind='sira', rank=4, num_experts=8, top_k=2), 'qkvo'),
      'sira32': (AdapterConfig(kind='sira', rank=4, num_experts=32, top_k=2), 'qkvo'),
      'sira8_dense': (AdapterConfig(kind='sira', rank=4, num_experts=8, top_k=2,
                                    expert_compute='dense'), 'qkvo'),
      'sira8_einsum': (AdapterConfig(kind='sira', rank=4, num_experts=8, top_k=2,
                                     expert_compute='einsum'), 'qkvo'),
      'sira8_gather': (AdapterConfig(kind='sira', rank=4, num_experts=8, top_k=2,
                                     expert_compute='gather'), 'qkvo'),
      'lora_qv': (AdapterConfig(kind='lora', rank=4), 'qv'),
      'sira8_qv': (AdapterConfig(kind='sira', rank=4, num_experts=8, top_k=2), 'qv'),
      'none': (AdapterConfig(kind='none'), 'qkvo'),
  }
  unknown = [n for n in names if n not in table]
  if unknown:
    raise app.UsageError(f'--model_variants: unknown {unknown}; choose from {sorted(table)}')
  return {n: table[n] for n in names}


def log(msg):
  print(f'[{time.strftime("%H:%M:%S")} load {common.load_average()[0]}] {msg}', flush=True)


def ratio_lines(rows, pairs):
  return [f'| {a} / {b} | {rows[a]["median_s"] / rows[b]["median_s"]:.2f} |'
          for a, b in pairs if a in rows and b in rows]


def main(argv):
  del argv
  if not FLAGS.out:
    raise app.UsageError('--out is required (a new directory).')
  if os.path.exists(FLAGS.out):
    raise app.UsageError(f'--out {FLAGS.out} exists; results are never overwritten: pick a new '
                         'directory.')
  unknown = set(FLAGS.parts) - set(PARTS)
  if unknown:
    raise app.UsageError(f'--parts: unknown {sorted(unknown)}')
  variants = model_variants(FLAGS.model_variants)
  compile_variants = model_variants(FLAGS.compile_variants)
  try:
    compile_depths = [int(d) for d in FLAGS.compile_depths]
  except ValueError as e:
    raise app.UsageError(f'--compile_depths: integers, e.g. 1,2,6 ({e})') from e
  if min(compile_depths, default=0) < 1:
    raise app.UsageError('--compile_depths: every depth must be >= 1')
  bad_layouts = sorted(set(FLAGS.compile_layouts) - set(compile_time.LAYOUTS))
  if bad_layouts or not FLAGS.compile_layouts:
    raise app.UsageError(f'--compile_layouts: unknown {bad_layouts or "(none given)"}; choose among '
                         f'{", ".join(compile_time.LAYOUTS)}')
  memory_flags = dict(models=FLAGS.memory_models, adapters=FLAGS.memory_adapters,
                      variants=FLAGS.memory_variants)
  for flag, table in (('models', memory.MODELS), ('adapters', memory.ADAPTERS),
                      ('variants', memory.VARIANTS)):
    unknown = [n for n in memory_flags[flag] if n not in table]
    if unknown:
      raise app.UsageError(f'--memory_{flag}: unknown {unknown}; choose from {sorted(table)}')
  try:
    for mesh_text in FLAGS.memory_meshes:
      memory.parse_mesh(mesh_text)
  except ValueError as e:
    raise app.UsageError(f'--memory_meshes: {e}') from e
  peer_missing = peer.available() if 'peer' in FLAGS.parts else None
  if peer_missing and not FLAGS.smoke:
    raise app.UsageError(f'the PEFT peer needs: {peer_missing}; or drop it from --parts.')
  partitioning.enable_compilation_cache()
  os.makedirs(FLAGS.out)
  smoke = FLAGS.smoke
  repeats = 1 if smoke else FLAGS.repeats
  shapes = (dict(batch_size=2, inputs=8, targets=4) if smoke else
            dict(batch_size=8, inputs=128, targets=64))
  results = dict(environment=common.environment(), command=' '.join(sys.argv), smoke=smoke,
                 started=time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
                 load_start=common.load_average())
  md = [f'# Benchmark results ({results["started"]}, backend {results["environment"]["backend"]}, '
        f'{results["environment"]["cpu_count"]} CPUs; no GPU/TPU was lent: CPU figures only)',
        '', f'Command: `{results["command"]}`. Ratios within one run, medians over {repeats} '
        'interleaved repeats; load averages (1 min) recorded per part.']

  def save():
    with open(os.path.join(FLAGS.out, 'results.json'), 'w') as f:
      json.dump(results, f, indent=1, default=str)
    with open(os.path.join(FLAGS.out, 'results.md'), 'w') as f:
      f.write('\n'.join(md) + '\n')

  if 'cost' in FLAGS.parts:
    rows = cost_table.table()
    results['cost_table'] = rows
    md += ['', '## Layout cost model (per device per step, T5 q/k/v/o, SiRA E=8 k=2 r=4)', '',
           cost_table.__doc__.strip(), '', cost_table.markdown(rows)]
    save()
  if 'layer' in FLAGS.parts:
    rows = layer.run(d=32 if smoke else 512, rank=4, top_k=2,
                     experts=[4] if smoke else [int(e) for e in FLAGS.experts],
                     tokens=[256] if smoke else [int(t) for t in FLAGS.tokens],
                     group_sizes=[128] if smoke else [int(g) for g in FLAGS.group_sizes],
                     forms=['dense', 'gather', 'einsum'], repeats=repeats,
                     einsum_max_experts=FLAGS.einsum_max_experts, progress=log)
    results['layer'] = rows
    md += ['', '## Layer level: one adapted projection, fwd + bwd, time / LoRA', '',
           layer.__doc__.strip(), layer.markdown(rows)]
    save()
  if 'model' in FLAGS.parts:
    res = model.run_train(variants, small=smoke, repeats=repeats, progress=log, **shapes)
    results['model'] = res
    rows = res['rows']
    md += ['', '## Model level: train step (T5-small shapes, q/k/v/o unless _qv)', '',
           f'load {res["load"]["before"][0]}-{res["load"]["after"][0]}; '
           f'{res["tokens_per_step"]} tokens per step.', '',
           '| variant | step ms | tokens/s | compile s | temp MiB | trainable params | '
           'optimizer state MiB | checkpoint MiB |', '|---|---|---|---|---|---|---|---|']
    for name, r in rows.items():
      md.append(f'| {name} | {1e3 * r["median_s"]:.0f} | {r["tokens_per_s"]:.0f} | '
                f'{r["compile_s"]:.1f} | {(r["temp_bytes"] or 0) / 2**20:.0f} | '
                f'{r["trainable_params"]} | {r["optimizer_state_bytes"] / 2**20:.2f} | '
                f'{r["checkpoint_bytes"] / 2**20:.2f} |')
    pairs = [('sira8', 'lora'), ('sira32', 'sira8'), ('sira8_einsum', 'sira8'),
             ('sira8_gather', 'sira8'), ('sira8_dense', 'lora'), ('sira8_qv', 'lora_qv'),
             ('sira8', 'lora32'), ('sira32', 'lora128'), ('lora128', 'lora32')]
    md += ['', '| ratio (step time) | value |', '|---|---|'] + ratio_lines(rows, pairs)
    md += [f'| compile {a} / {b} | {rows[a]["compile_s"] / rows[b]["compile_s"]:.2f} |'
           for a, b in (('sira8', 'lora'), ('sira32', 'lora')) if a in rows and b in rows]
    save()
  if 'profile' in FLAGS.parts:
    res = profile.run(small=smoke, repeats=repeats, progress=log, **shapes)
    results['profile'] = res
    md += ['', '## Model level: where the SiRA - LoRA step time goes (differential profile)', '',
           profile.__doc__.strip(), ''] + profile.markdown(res)
    save()
  if 'compile' in FLAGS.parts:
    res = compile_time.run(compile_variants, [1] if smoke else compile_depths, small=smoke,
                           layouts=tuple(FLAGS.compile_layouts), progress=log, **shapes)
    results['compile'] = res
    reference = 'lora' if 'lora' in compile_variants else next(iter(compile_variants))
    md += ['', '## Model level: train-step compile time by stage and depth (persistent cache off)',
           '', compile_time.__doc__.strip(), ''] + compile_time.markdown(res, reference)
    save()
  if 'decode' in FLAGS.parts:
    dec = {'merged lora (= base)': (AdapterConfig(kind='none'), 'qkvo'),
           'sira8': (AdapterConfig(kind='sira', rank=4, num_experts=8, top_k=2), 'qkvo')}
    res = model.run_decode(dec, small=smoke, repeats=repeats, batch_size=shapes['batch_size'],
                           inputs=shapes['inputs'], steps=4 if smoke else 64, progress=log)
    results['decode'] = res
    rows = res['rows']
    md += ['', f'## Cached greedy decoding ({res["steps"]} steps, batch {res["batch"]})', '',
           f'load {res["load"]["before"][0]}-{res["load"]["after"][0]}. A merged LoRA serves '
           'with the base model\'s kernels, so the base model times it.', '',
           '| variant | ms | first call (compile) s |', '|---|---|---|']
    md += [f'| {n} | {1e3 * r["median_s"]:.0f} | {r["first_call_s"]:.1f} |' for n, r in rows.items()]
    a, b = 'sira8', 'merged lora (= base)'
    md.append(f'\nsira8 / merged LoRA: {rows[a]["median_s"] / rows[b]["median_s"]:.2f}')
    save()
  if 'peer' in FLAGS.parts and not peer_missing:
    fns, facts = {}, {}
    peer_targets = ('qkvo',) if smoke else ('qkvo', 'qv')
    for targets in peer_targets:
      log(f'peer: building PEFT LoRA {targets} and the project LoRA {targets}')
      fns[f'peft lora {targets}'], facts[f'peft lora {targets}'] = peer.peft_step(
          targets, small=smoke, batch_size=shapes['batch_size'], inputs=shapes['inputs'],
          target_len=shapes['targets'], threads=FLAGS.peer_threads)
      cfg = model.t5_small(AdapterConfig(kind='lora', rank=4), targets, small=smoke)
      fns[f'project lora {targets}'], facts[f'project lora {targets}'] = (
          model.train_step_variant(cfg, model.batch(cfg, **shapes)))
    log(f'peer: timing {len(fns)} x {repeats}')
    timing = common.interleaved(fns, repeats)
    tokens = shapes['batch_size'] * (shapes['inputs'] + shapes['targets'])
    rows = {n: dict(median_s=timing[n]['median_s'], tokens_per_s=tokens / timing[n]['median_s'],
                    **{k: v for k, v in facts[n].items() if not isinstance(v, bytes)})
            for n in fns}
    results['peer'] = dict(rows=rows, load=timing['_load'])
    threads = facts[f'peft lora {peer_targets[0]}']['threads']
    md += ['', f'## Peer: Hugging Face PEFT LoRA (PyTorch, same T5 shapes; torch threads: {threads})',
           '',
           f'load {timing["_load"]["before"][0]}-{timing["_load"]["after"][0]}.', '',
           '| variant | step ms | tokens/s | trainable params |', '|---|---|---|---|']
    md += [f'| {n} | {1e3 * r["median_s"]:.0f} | {r["tokens_per_s"]:.0f} | '
           f'{r["trainable_params"]} |' for n, r in rows.items()]
    for t in peer_targets:
      md.append(f'\nproject / PEFT tokens/s ({t}): '
                f'{rows[f"project lora {t}"]["tokens_per_s"] / rows[f"peft lora {t}"]["tokens_per_s"]:.2f}')
    save()
  if 'memory' in FLAGS.parts:
    mem_shapes = memory.xtreme_up_shapes()
    if FLAGS.memory_batch_size:
      mem_shapes['batch_size'] = FLAGS.memory_batch_size
    if smoke:
      mem_shapes = dict(inputs=8, targets=4, batch_size=2)
    def save_rows(partial):  # results.json holds every finished row while later ones compile
      results['memory'] = dict(partial, partial=True)
      save()

    res = memory.run(['tiny'] if smoke else FLAGS.memory_models,
                     ['sira8'] if smoke else FLAGS.memory_adapters,
                     ['1x2'] if smoke else FLAGS.memory_meshes,
                     ['default', 'scan/remat=full'] if smoke else FLAGS.memory_variants,
                     shapes=mem_shapes, bindings=FLAGS.memory_bindings,
                     timeout_s=FLAGS.memory_timeout, progress=log, on_row=save_rows)
    results['memory'] = res
    md += ['', '## Real sizes on simulated meshes: per-device memory and compile time', '',
           memory.__doc__.strip(), ''] + memory.markdown(res)
    save()
  results['load_end'] = common.load_average()
  md += ['', f'Load average at the end: {results["load_end"]}.']
  save()
  log(f'wrote {FLAGS.out}/results.json and results.md')


if __name__ == '__main__':
  app.run(main)
