"""Real sizes without real hardware: per-device memory and compile time of the train step.

The project's train step (`sira_jax.trainer.make_train_step`, Adafactor on the adapter
parameters, the shardings `sira_jax.placement.Placement` gives state and batch) is compiled ahead of
time from abstract state and batch (`jax.ShapeDtypeStruct`s with their shardings: no weight is
allocated) on a mesh of simulated CPU devices (`--xla_force_host_platform_device_count`, one
subprocess per row), and `compiled.memory_analysis()` read per device: arguments, outputs, XLA
temporaries and generated code. Total = arguments + outputs - aliased + temporaries + code; the
step donates nothing (as `sira_jax.train`), so the output state is a second copy of the input
state. These are CPU compilations: an accelerator's XLA fuses, lays out and rematerialises
differently, so read the figures as the order of magnitude and the differences between rows, not
as a TPU/GPU measurement. Compile seconds are wall clock of XLA's CPU compile (its CPU seconds in
parentheses: on a shared host the wall clock follows the load). On a mesh with no 'expert' axis `expert_compute='auto'` resolves with the
CPU rule (`cost_model.choose_form`).

Models are the project's gin files (gin/models/*.gin) with an adapter gin file
(gin/adapters/{sira,lora}.gin; SiRA with E = 8); the sequence lengths are XTREME-UP's
(gin/t5x/tasks/xtreme_up.gin) and the global batch the project's (gin/t5x/runs/train_common.gin),
split over the mesh's batch shards (data x expert). Variants set `T5Config.scan_layers` and
`T5Config.remat_policy`; a variant whose fields this `T5Config` lacks is skipped with a note.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import time

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), 'gin')
MODELS = {'mt5_xl': 'models/mt5_xl.gin', 'mt5_xxl': 'models/mt5_xxl.gin',
          'tiny': 'models/t5_tiny.gin'}
ADAPTERS = {'sira8': ('adapters/sira.gin', ('NUM_EXPERTS = 8',)),
            'lora': ('adapters/lora.gin', ())}
# name -> T5Config field overrides. 'default' sets nothing (the T5Config defaults).
VARIANTS = {'default': {}}
for _scan in (False, True):
  for _remat in ('none', 'minimal', 'full'):
    VARIANTS[f'{"scan" if _scan else "unscanned"}/remat={_remat}'] = dict(
        scan_layers=_scan, remat_policy=_remat)
ACCELERATOR_GIB = (16, 32, 80)
MEMORY_FIELDS = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
                 'temp_size_in_bytes', 'generated_code_size_in_bytes')


def gin_macro(path: str, name: str):
  """The literal value of `NAME = value` in a gin file under gin/ (the first such line)."""
  with open(os.path.join(GIN_DIR, path)) as f:
    for line in f:
      m = re.match(rf'^{name}\s*=\s*(.+?)\s*(#.*)?$', line)
      if m:
        return ast.literal_eval(m.group(1))
  raise KeyError(f'{name} is not set in gin/{path}')


def xtreme_up_shapes() -> dict:
  """{'inputs', 'targets', 'batch_size'}: the XTREME-UP task lengths and the global batch."""
  lengths = gin_macro('t5x/tasks/xtreme_up.gin', 'TASK_FEATURE_LENGTHS')
  return dict(inputs=lengths['inputs'], targets=lengths['targets'],
              batch_size=gin_macro('t5x/runs/train_common.gin', 'BATCH_SIZE'))


def parse_mesh(text: str) -> dict:
  """'2x4' -> data 2 x model 4; '2x2x2' -> data x expert x model."""
  fix = f'mesh {text!r}: write DATAxMODEL (e.g. 2x4) or DATAxEXPERTxMODEL, positive integers'
  try:
    sizes = [int(s) for s in text.lower().split('x')]
  except ValueError as e:
    raise ValueError(fix) from e
  if min(sizes) < 1:
    raise ValueError(fix)
  if len(sizes) == 2:
    return dict(data=sizes[0], expert=1, model=sizes[1])
  if len(sizes) == 3:
    return dict(zip(('data', 'expert', 'model'), sizes))
  raise ValueError(fix)


def missing_fields(variant: str) -> list[str]:
  """The T5Config fields `variant` sets that this T5Config lacks."""
  from sira_jax.t5.config import T5Config
  have = {f.name for f in dataclasses.fields(T5Config)}
  return [k for k in VARIANTS[variant] if k not in have]


def model_config(model: str, adapter: str, variant: str, bindings=()):
  """T5Config of the model and adapter gin files, the variant's fields set."""
  import gin
  from sira_jax.t5.config import T5Config
  adapter_file, adapter_bindings = ADAPTERS[adapter]
  gin.clear_config()
  gin.add_config_file_search_path(GIN_DIR)
  gin.parse_config_files_and_bindings(
      [os.path.join(GIN_DIR, MODELS[model]), os.path.join(GIN_DIR, adapter_file)],
      list(adapter_bindings) + list(bindings))
  return dataclasses.replace(T5Config(), **VARIANTS[variant])


def compile_one(spec: dict) -> dict:
  """Compiles the train step of `spec` ahead of time on this process's devices; the row."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn
  from experiments.bench import common, compile_time
  from sira_jax import losses, model_init, optim, partitioning, placement as placement_lib, trainer
  from sira_jax.adapters import trainable_mask
  from sira_jax.t5.network import Transformer

  cfg = model_config(spec['model'], spec['adapter'], spec['variant'], spec.get('bindings', ()))
  placement = placement_lib.Placement(spec["mesh"])
  mesh = placement.mesh
  batch_size, inputs, targets = spec['batch_size'], spec['inputs'], spec['targets']
  placement.check_batch_size(batch_size)
  model = Transformer(cfg)
  variables = nn.unbox(model_init.abstract_variables(model))
  mask = trainable_mask(variables['params'])
  tx = optim.make_optimizer('adafactor', 1e-3)
  state = jax.eval_shape(lambda v: trainer.create_state(
      v, tx, trainable_mask=mask, rng=jax.random.PRNGKey(0)), variables)
  state_sh = placement.state_shardings(model, state, mask)
  abstract = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  state = jax.tree.map(abstract, state, state_sh)
  batch_sh = partitioning.batch_sharding(mesh, 2)
  batch = {k: jax.ShapeDtypeStruct((batch_size, n), jnp.int32, sharding=batch_sh)
           for k, n in (('encoder_input_tokens', inputs), ('decoder_input_tokens', targets),
                        ('decoder_target_tokens', targets))}
  rep = partitioning.replicated(mesh)
  total = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
  step = jax.jit(trainer.make_train_step(model, tx, losses.LossConfig()),
                 out_shardings=(state_sh, rep))
  with compile_time.persistent_cache_off(), partitioning.activate(mesh):
    lowered, trace_lower_s = common.timed(lambda: step.lower(state, batch, total))
    cpu_start = time.process_time()
    compiled, compile_s = common.timed(lowered.compile)
    compile_cpu_s = time.process_time() - cpu_start
  memory = compiled.memory_analysis()
  row = {f: int(getattr(memory, f, 0) or 0) for f in MEMORY_FIELDS}
  row['total_bytes'] = (row['argument_size_in_bytes'] + row['output_size_in_bytes'] -
                        row['alias_size_in_bytes'] + row['temp_size_in_bytes'] +
                        row['generated_code_size_in_bytes'])
  params = jax.tree.leaves(variables['params'])
  return dict(row, trace_lower_s=trace_lower_s, compile_s=compile_s, compile_cpu_s=compile_cpu_s,
              params=int(sum(x.size for x in params)),
              trainable_params=optim.count_params(state.params),
              devices=jax.device_count(), backend=jax.default_backend(),
              host_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def run_one(spec: dict, timeout_s: float) -> dict:
  """`compile_one(spec)` in a subprocess with the mesh's device count of simulated CPU devices."""
  devices = spec['mesh']['data'] * spec['mesh']['expert'] * spec['mesh']['model']
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, JAX_PLATFORMS='cpu', CUDA_VISIBLE_DEVICES='',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''))
  try:
    done = subprocess.run([sys.executable, '-m', 'experiments.bench.memory', json.dumps(spec)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
  except subprocess.TimeoutExpired:
    return dict(error=f'timed out after {timeout_s:.0f} s')
  if done.returncode:
    tail = done.stderr.strip().splitlines()[-1:] or [f'exit {done.returncode}']
    return dict(error=tail[0][:300])
  return json.loads(done.stdout.strip().splitlines()[-1])


def run(models, adapters, meshes, variants, *, shapes: dict, bindings=(), timeout_s=3600,
        progress=print, on_row=None) -> dict:
  """Rows for every model x adapter x mesh x variant (a variant whose T5Config fields are
  missing is a row with a `skipped` note), and the shapes used. `on_row(partial result)` is
  called after every row (rows take minutes to hours: the caller saves them as they come)."""
  rows = []
  for model in models:
    for adapter in adapters:
      for mesh_text in meshes:
        mesh = parse_mesh(mesh_text)
        for variant in variants:
          row = dict(model=model, adapter=adapter, mesh=mesh_text, variant=variant,
                     batch_per_device=shapes['batch_size'] // (mesh['data'] * mesh['expert']))
          missing = missing_fields(variant)
          if missing:
            row['skipped'] = f'T5Config has no field {", ".join(missing)} yet'
            progress(f'memory: {model} {adapter} {mesh_text} {variant}: {row["skipped"]}')
          else:
            progress(f'memory: {model} {adapter} {mesh_text} {variant}: compiling')
            spec = dict(model=model, adapter=adapter, variant=variant, mesh=mesh,
                        bindings=list(bindings), **shapes)
            row.update(run_one(spec, timeout_s))
          rows.append(row)
          if on_row is not None:
            on_row(dict(rows=list(rows), shapes=shapes, bindings=list(bindings)))
  return dict(rows=rows, shapes=shapes, bindings=list(bindings))


def fits(total_bytes: int) -> str:
  sizes = [f'{g}' for g in ACCELERATOR_GIB if total_bytes <= g * 2**30]
  return ', '.join(sizes) + ' GiB' if sizes else 'none'


def markdown(res: dict) -> list[str]:
  s = res['shapes']
  source = ("XTREME-UP's lengths (gin/t5x/tasks/xtreme_up.gin) and the project's batch "
            '(gin/t5x/runs/train_common.gin)' if s == xtreme_up_shapes() else
            "set for this run, not XTREME-UP's")
  out = [f'Shapes: inputs {s["inputs"]} / targets {s["targets"]} tokens, global batch '
         f'{s["batch_size"]} over data x expert ({source}); the gin files\' dtypes'
         + (f'; bindings {res["bindings"]}' if res['bindings'] else '') + '. '
         '**From CPU compilation (simulated devices), not measured on accelerators.**', '',
         '| model | adapter | mesh (data x model) | variant | batch / device | '
         'arguments GiB | outputs GiB | temp GiB | code MiB | per-device total GiB | '
         'fits (16/32/80 GiB) | compile s (CPU s) | host peak RSS GiB |',
         '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  gib = lambda b: f'{b / 2**30:.2f}'
  for r in res['rows']:
    head = (f'| {r["model"]} | {r["adapter"]} | {r["mesh"]} | {r["variant"]} | '
            f'{r["batch_per_device"]} |')
    note = r.get('skipped') or r.get('error')
    if note:
      out.append(head + f' {"skipped" if "skipped" in r else "failed"}: {note} |' + ' |' * 7)
      continue
    out.append(head + f' {gib(r["argument_size_in_bytes"])} | {gib(r["output_size_in_bytes"])} | '
               f'{gib(r["temp_size_in_bytes"])} | '
               f'{r["generated_code_size_in_bytes"] / 2**20:.1f} | {gib(r["total_bytes"])} | '
               f'{fits(r["total_bytes"])} | {r["compile_s"]:.1f} ({r["compile_cpu_s"]:.0f}) | '
               f'{gib(r["host_peak_rss_bytes"])} |')
  return out


if __name__ == '__main__':
  print(json.dumps(compile_one(json.loads(sys.argv[1]))))
