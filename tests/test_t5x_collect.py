"""The collector (experiments/t5x_collect.py) on files a real T5X run wrote: tests/fixtures/
t5x_pod_sweep/ holds what `python -m t5x.train` and `python -m t5x.eval` wrote for three runs of
the tiny XTREME-UP sweep (tests/t5x_pod_sweep.py regenerates it; checkpoint data left out). Needs
no t5x: the files are read as a pod user's copy would be."""
import glob
import json
import os
import re
import shutil

import numpy as np
import pytest

import t5x_pod_sweep
from experiments import benchmarks
from experiments import report as report_lib
from experiments import t5x_backend
from experiments import t5x_collect

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 't5x_pod_sweep')


@pytest.fixture
def pod(tmp_path):
  """(spec, sweep, {name: run}) with the fixture's T5X outputs in each run's MODEL_DIR."""
  with open(os.path.join(FIXTURE, benchmarks.SPEC)) as f:
    spec = benchmarks.PodSpec.from_dict(dict(json.load(f), output_root=str(tmp_path)))
  sweep = benchmarks.pod_sweep(t5x_pod_sweep.SWEEP, spec)
  runs = {r.name: r for r in sweep.runs if r.name in t5x_pod_sweep.RUNS}
  assert len(runs) == 3
  for run in runs.values():
    shutil.copytree(os.path.join(FIXTURE, run.key), spec.model_dir(run))
  return spec, sweep, runs


def _jsonl_metrics(spec, run, split):
  """{task: {metric: value}} straight from the metrics files, at the evaluated step."""
  step = benchmarks.checkpoint_step(t5x_backend.eval_checkpoint(run, spec))
  out = {}
  for path in glob.glob(os.path.join(t5x_backend.eval_dir(spec, run, split), 'inference_eval',
                                     '*-metrics.jsonl')):
    with open(path) as f:
      row = [json.loads(line) for line in f if json.loads(line)['step'] == step][-1]
    out[os.path.basename(path)[:-len('-metrics.jsonl')]] = {
        k: v for k, v in row.items() if k != 'step'}
  return out


def _model_info_sizes(path):
  with open(path) as f:
    return {k: int(v) for k, v in re.findall(r'^Variable (\S+)\s+size (\d+)', f.read(), re.M)}


def test_metrics_per_split_and_task_are_t5x_numbers(pod):
  spec, sweep, runs = pod
  for run in runs.values():
    res = t5x_collect.collect_run(run, sweep, spec, write=False)
    for split in ('validation', 'test'):
      tasks = _jsonl_metrics(spec, run, split)
      assert set(tasks) == {'xtreme_up_translation_en_sw', 'xtreme_up_translation_en_yo'}
      assert res['metrics'][split]['tasks'] == tasks
      chrf = np.mean([m['chrf'] for m in tasks.values()])
      assert res['metrics'][split]['summary']['chrf'] == pytest.approx(chrf)
      assert res['metrics'][split]['summary'][benchmarks.XTREME_UP_SCORE] == pytest.approx(chrf)
    assert res['run']['key'] == run.key and res['backend'] == 't5x'
    assert res['benchmark'] == 'xtreme_up_translation' and res['model_size'] == 't5_tiny'
    assert res['mixture'] == 'xtreme_up_translation'


def test_train_summaries_checkpoints_config_and_params(pod):
  spec, sweep, runs = pod
  run = runs['sira E8 k2-lr0.03-s0']
  res = t5x_collect.collect_run(run, sweep, spec, write=False)
  train = res['train']
  assert train['steps'] == spec.train_steps == 230 and train['start_step'] == spec.base_step == 30
  assert train['history'][-1]['step'] == 230
  for name in ('loss', 'cross_entropy', 'aux_loss', 'dropped_fraction', 'gate_entropy',
               'router_confidence', 'expert_usage_min', 'expert_usage_max'):
    assert np.isfinite(train['history'][-1][name]), name
  assert set(train['routing']) >= {'aux_loss', 'dropped_fraction', 'gate_entropy'}
  assert train['wall_time_s'] > 0 and res['wall_time_s']['train'] == train['wall_time_s']
  prov = res['provenance']
  steps = sorted(int(d.split('_')[1]) for d in os.listdir(spec.model_dir(run))
                 if d.startswith('checkpoint_'))
  assert prov['checkpoint_steps'] == steps and steps[0] == 30 and steps[-1] == 230
  assert prov['evaluated_step'] == 230
  assert prov['seed'] == 0 and prov['learning_rate'] == 0.03
  with open(os.path.join(spec.model_dir(run), 'config.gin')) as f:
    assert res['gin_config'] == f.read()
  assert "NUM_EXPERTS = 8" in res['gin_config']
  sizes = _model_info_sizes(os.path.join(spec.model_dir(run), 'model-info.txt'))
  adapter = sum(v for k, v in sizes.items()
                if re.search(r'/(lora_a|lora_b|router_kernel)$', k) and
                not k.startswith('param_states/'))
  experts = sum(v for k, v in sizes.items() if re.search(r'/(lora_a|lora_b)$', k) and
                not k.startswith('param_states/'))
  total = sum(v for k, v in sizes.items() if not k.startswith('param_states/') and k != 'step')
  p = res['params']
  assert p['trainable'] == adapter > 0 and p['total'] == total
  assert p['active_per_token'] == total - experts + experts * 2 // 8  # top-2 of 8 experts
  floor = t5x_collect.collect_run(runs['floor (frozen base)-s0'], sweep, spec, write=False)
  assert floor['params']['trainable'] == 0 and floor['train'] == {}
  assert floor['params']['total'] == p['total'] - p['adapter_total']


def test_collected_sweep_reports_t5x_numbers_and_is_partial(pod, tmp_path):
  spec, sweep, runs = pod
  out = t5x_collect.collect_sweep(sweep, spec)
  assert sorted(out['collected']) == sorted(runs)
  assert len(out['missing']) == len(sweep.runs) - 3
  path = report_lib.write_report([sweep], results_dir=spec.results_dir,
                                 out_dir=str(tmp_path / 'report'))
  with open(path) as f:
    text = f.read()
  assert f'(partial: 3 of {len(sweep.runs)} runs finished)' in text
  agg = json.load(open(tmp_path / 'report' / 'c3.json'))
  sira = agg['points']['sira E8 k2']
  val = {r.learning_rate: np.mean([m['chrf'] for m in _jsonl_metrics(spec, r, 'validation')
                                   .values()])
         for n, r in runs.items() if n.startswith('sira')}
  chosen = max(sorted(val), key=lambda lr: val[lr])
  assert sira['learning_rate'] == chosen
  test = _jsonl_metrics(spec, [r for r in runs.values() if r.learning_rate == chosen][0], 'test')
  assert sira['mean']['chrf'] == pytest.approx(np.mean([m['chrf'] for m in test.values()]))
  assert f'{sira["mean"]["chrf"]:.2f} ± 0.00' in text


def test_missing_outputs_are_named(pod):
  spec, sweep, runs = pod
  run = runs['sira E8 k2-lr0.01-s0']
  shutil.rmtree(os.path.join(t5x_backend.eval_dir(spec, run, 'test'), 'inference_eval'))
  with pytest.raises(t5x_collect.MissingOutputError, match='eval_test/inference_eval/ has no '
                     'metrics for step 230'):
    t5x_collect.collect_run(run, sweep, spec)
  assert run.name in t5x_collect.collect_sweep(sweep, spec)['missing']


def test_gin_macros_and_bindings_of_an_operative_config():
  config = sorted(glob.glob(os.path.join(FIXTURE, "*", "config.gin")))[0]
  with open(config) as f:
    text = f.read()
  macros = t5x_collect.gin_macros(text)
  assert macros['TASK_FEATURE_LENGTHS'] == {'inputs': 32, 'targets': 32}
  assert 'MODEL' not in macros  # a reference, not a literal
