"""CI smoke of the benchmark command (`python -m experiments.bench --smoke`): tiny shapes, one
repeat; checks the files and their structure, never a timing."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_smoke_writes_results(tmp_path):
  out = tmp_path / 'bench'
  cmd = [sys.executable, '-m', 'experiments.bench', '--smoke', f'--out={out}',
         '--parts=cost,layer,model,compile', '--model_variants=sira8',
         '--compile_variants=lora,sira8', '--compile_layouts=unscanned,scanned']
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'xla_cache'))
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=600)
  results = json.loads((out / 'results.json').read_text())
  assert {r['form'] for r in results['layer']} == {'-', 'dense', 'gather', 'einsum'}
  assert all(r['median_s'] > 0 for r in results['layer'])
  rows = results['model']['rows']
  assert set(rows) == {'sira8'} and rows['sira8']['trainable_params'] > 0
  assert rows['sira8']['optimizer_state_bytes'] > 0 and rows['sira8']['checkpoint_bytes'] > 0
  assert results['cost_table'] and all(r['best'] for r in results['cost_table'])
  compiled = results['compile']['rows']  # JSON keys: variant -> depth (as a string)
  assert set(compiled) == {'lora', 'sira8', 'lora/scanned', 'sira8/scanned'}
  for name in compiled:
    r = compiled[name]['1']
    assert r['trace_s'] > 0 and r['lower_s'] > 0 and r['compile_s'] > 0 and r['fusions'] > 0
  # A routed site compiles to more kernels than a LoRA one (the router, top-k, slots, statistics).
  assert compiled['sira8']['1']['fusions'] > compiled['lora']['1']['fusions']
  md = (out / 'results.md').read_text()
  assert '## Layer level' in md and 'compile time by stage and depth' in md
  # Results are never overwritten.
  again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode != 0 and 'exists' in again.stderr


@pytest.mark.parametrize('bad', ['--parts=layer,fast', '--model_variants=lora,huge',
                                 '--compile_layouts=folded'])
def test_bench_rejects_bad_flags_before_work(tmp_path, bad):
  out = tmp_path / 'b'
  run = subprocess.run([sys.executable, '-m', 'experiments.bench', '--smoke', f'--out={out}', bad],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
  assert run.returncode != 0 and 'unknown' in run.stderr and not out.exists()


def test_profile_stand_ins_replace_routing_parts_while_tracing():
  """The differential profile's stand-ins really remove the sort (top-k) and the cumsum (slot
  assignment) from a traced SiRA layer, and only inside `stubbed`."""
  import jax
  import jax.numpy as jnp
  from experiments.bench import profile
  from sira_jax.adapters import AdaptedDense, AdapterConfig

  layer = AdaptedDense(16, adapter=AdapterConfig(kind='sira', rank=2, num_experts=4, top_k=2))
  x = jnp.ones((2, 8, 16))
  variables = layer.init(jax.random.PRNGKey(0), x)

  def primitives():
    jaxpr = jax.make_jaxpr(lambda v: layer.apply(v, x, mutable=['intermediates']))(variables)
    return str(jaxpr)

  full = primitives()
  assert 'sort' in full and 'cumsum' in full
  with profile.stubbed(profile.STUBS['routing']):
    stubbed = primitives()
  assert 'sort' not in stubbed and 'cumsum' not in stubbed
  assert 'sort' in primitives()  # Restored after the context.


@pytest.mark.slow
def test_memory_part_smoke(tmp_path):
  """The memory part on one tiny model, 2 simulated devices: the compiled step's per-device
  bytes are read back, and a variant whose T5Config fields are missing is a noted skip."""
  from experiments.bench import memory
  out = tmp_path / 'bench'
  cmd = [sys.executable, '-m', 'experiments.bench', '--smoke', f'--out={out}', '--parts=memory']
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=900)
  results = json.loads((out / 'results.json').read_text())
  rows = {r['variant']: r for r in results['memory']['rows']}
  row = rows['default']
  assert 'error' not in row, row
  assert row['devices'] == 2 and row['backend'] == 'cpu' and row['compile_s'] > 0
  assert row['argument_size_in_bytes'] > 0 and row['temp_size_in_bytes'] > 0
  assert row['total_bytes'] >= row['argument_size_in_bytes'] + row['temp_size_in_bytes']
  assert 0 < row['compile_cpu_s']
  # The frozen base is sharded over 'model' (2 devices): each holds less than all parameters.
  assert row['argument_size_in_bytes'] < 4 * row['params']
  assert row['trainable_params'] < row['params']
  scanned = rows['scan/remat=full']
  if memory.missing_fields('scan/remat=full'):
    assert 'scan_layers' in scanned['skipped']
  else:
    assert 'error' not in scanned and scanned['total_bytes'] > 0, scanned
  md = (out / 'results.md').read_text()
  assert 'per-device memory' in md and 'From CPU compilation' in md and '| tiny | sira8 | 1x2 |' in md
