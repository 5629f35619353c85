"""Running the pre-registered regime selection (experiments/PREREGISTRATION.md): the candidate
sweeps as registered, their evaluation protocol (per-split sizes, checkpoint choice on validation),
and one tiny end-to-end run of them."""
import json
import os
import subprocess
import sys

import pytest

from experiments import checkpoint_selection as selection_lib
from experiments import evaluation
from experiments import regime_rule
from experiments import runner
from experiments import sweeps as sweeps_lib
from tasks import offline_suite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (train examples per task (None: all), steps, validation interval, fine-tuned mixture)
REGISTERED = {
    'regime_data_limited': (64, 1200, 120, 'offline_bench'),
    'regime_converged': (None, 4800, 480, 'offline_bench'),
    'regime_near_base': (None, 600, 60, 'offline_bench_held_out'),
}


def _config(run, sweep):
  """(train steps, train examples per task (as registered), mixture) of the run's gin config."""
  import gin
  import tasks
  runner.parse_gin(run.gin_files, runner.run_bindings(run, '/tmp/m', '/tmp/b'),
                   sweep.extra_bindings)
  try:
    return (runner._train_arg('train_steps'),
            tasks.registration().get('offline', {}).get('train_examples_per_task'),
            runner._train_arg('mixture_or_task_name'))
  finally:
    gin.clear_config()
    tasks.register_all()


def test_the_candidate_sweeps_are_as_registered():
  for name, (examples, steps, every, mixture) in REGISTERED.items():
    sweep = sweeps_lib.get_sweep(name)
    by_point = {p: [r for r in sweep.runs if r.point == p] for p in sweep.points()}
    assert sorted(by_point) == sorted(sweeps_lib.REGIME_POINTS.values())
    floor, = by_point['floor (frozen base)']
    assert floor.kind == 'floor'
    for point, grid, seeds in (('lora r4', sweeps_lib.LR_GRID, range(6)),
                               ('lora r32', sweeps_lib.LR_GRID, range(6)),
                               ('lora r8', sweeps_lib.LR_GRID, range(3)),
                               ('ceiling (full fine-tuning)', sweeps_lib.FULL_FT_LR_GRID,
                                range(3))):
      runs = by_point[point]
      tuning = sweep.tuning_runs(point)
      assert sorted((r.seed, r.learning_rate) for r in tuning) == [(0, lr) for lr in sorted(grid)]
      assert sorted(r.seed for r in runs if r not in tuning) == list(seeds)[1:]
      assert all(r.lr_from == point for r in runs if r not in tuning)
    for run in (floor, *by_point['lora r4'][:1], *by_point['lora r32'][:1],
                *by_point['ceiling (full fine-tuning)'][:1]):
      assert _config(run, sweep) == (steps, examples, mixture), (name, run.name)
    assert sweep.checkpoint_interval(steps) == every
    assert sweep.num_examples('validation') == 50 and sweep.num_examples('test') is None
    assert (sweep.select_split, sweep.report_split, sweep.metric) == (
        'validation', 'test', 'sequence_accuracy')
  # The near base is another pretraining (its own base key), on the pretraining mix 1:1 with
  # the 15 tasks of en, de, fr, es, it; the others start from the shipped base.
  hashes = {n: runner.base_config_hash(sweeps_lib.get_sweep(n)) for n in REGISTERED}
  assert hashes['regime_data_limited'][0] == hashes['regime_converged'][0]
  assert runner.shipped_base(hashes['regime_converged'][0], log=lambda m: None)
  near_hash, near = hashes['regime_near_base']
  assert near_hash != hashes['regime_converged'][0]
  assert near['train']['mixture_or_task_name'] == 'offline_pretrain_near_mix'
  assert {k: v for k, v in near['train'].items() if k != 'mixture_or_task_name'} == {
      k: v for k, v in hashes['regime_converged'][1]['train'].items()
      if k != 'mixture_or_task_name'}
  assert offline_suite.NEAR_BASE_LANGUAGES == ('en', 'de', 'fr', 'es', 'it')


def test_the_evaluation_protocol_is_part_of_every_run_key():
  c1 = sweeps_lib.get_sweep('c1')
  # The same runs scored the registered way are other runs (another result file) ...
  same = sweeps_lib.Sweep('x', 'x', c1.runs, split_num_examples=(('test', None),))
  assert {r.key for r in same.runs}.isdisjoint(r.key for r in c1.runs)
  assert same.runs[0].as_dict()['evaluation']['num_examples'] == {'validation': 50, 'test': None}
  # ... scored the default way they keep their keys (and result files).
  assert [r.key for r in sweeps_lib.Sweep('y', 'y', same.runs).runs] == [r.key for r in c1.runs]
  assert 'evaluation' not in c1.runs[0].as_dict()
  # --eval_examples caps every split (and so keys the runs apart again).
  sweep = sweeps_lib.with_overrides(sweeps_lib.get_sweep('regime_converged'), (),
                                    eval_num_examples=3)
  assert [sweep.num_examples(s) for s in ('validation', 'test')] == [3, 3]
  with pytest.raises(ValueError, match='split_num_examples names'):
    sweeps_lib.Sweep('z', 'z', c1.runs, split_num_examples=(('train', 5),))
  with pytest.raises(ValueError, match='select_checkpoint_every must be a fraction'):
    sweeps_lib.Sweep('z', 'z', c1.runs, select_checkpoint_every=120)


def test_the_scored_checkpoints_and_the_bindings_that_keep_them():
  assert selection_lib.scored_steps(1200, 120) == list(range(120, 1201, 120))
  assert selection_lib.scored_steps(25, 10) == [10, 20, 25]   # and the last step
  assert selection_lib.checkpoint_bindings(1200, 120) == [
      'train.checkpoint_every=120', 'train.keep_checkpoints=10']
  assert selection_lib.checkpoint_bindings(25, 10)[1] == 'train.keep_checkpoints=3'
  sweep = sweeps_lib.get_sweep('regime_data_limited')
  assert [sweep.checkpoint_interval(n) for n in (1200, 20, 3)] == [120, 2, 1]
  assert sweeps_lib.get_sweep('c1').checkpoint_interval(600) is None


def test_the_best_step_is_the_argmax_ties_to_the_earlier_step():
  assert selection_lib.best_step({120: 3.0, 240: 7.5, 360: 7.0}) == 240
  assert selection_lib.best_step({360: 7.5, 240: 7.5, 120: 1.0, 480: 7.5}) == 240
  assert selection_lib.best_step({10: 0.0, 20: 0.0}) == 10
  with pytest.raises(ValueError, match='no scored checkpoint'):
    selection_lib.best_step({})


def test_list_runs_lists_a_candidates_runs(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.runner', '--sweep=regime_data_limited', '--list_runs',
       f'--results_dir={tmp_path}'], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert len(lines) == len(sweeps_lib.get_sweep('regime_data_limited').runs) == 30
  assert all(ln.startswith('todo  ') for ln in lines)
  assert any(ln.endswith('lora r4-lr0.001-s0') for ln in lines)
  assert any(ln.endswith('lora r32-lrtuned-s5') for ln in lines)


# Tiny sizes for the candidates' runs and bases; 10 steps: a checkpoint at every step.
TINY = ('EMBED_DIM=16', 'MLP_DIM=32', 'NUM_HEADS=2', 'HEAD_DIM=8', 'NUM_ENCODER_LAYERS=1',
        'NUM_DECODER_LAYERS=1', 'BATCH_SIZE=8', 'train.tensorboard=False', 'TRAIN_STEPS=10')


@pytest.mark.slow
def test_tiny_candidate_runs_end_to_end_with_checkpoint_selection(tmp_path):
  results, work = str(tmp_path / 'results'), str(tmp_path / 'work')
  # data_limited on one task (64 training examples of it): a LoRA run (the ceiling's runs go
  # through the same runner and selection code; left out to keep CI short).
  sweep = sweeps_lib.with_overrides(
      sweeps_lib.get_sweep('regime_data_limited'),
      (*TINY, "MIXTURE_OR_TASK_NAME='offline_currency_en'"), eval_num_examples=2)
  names = ['lora r4-lr0.001-s0']
  out = runner.run_sweep(sweep, results_dir=results, work_dir=work, progress_bar=False,
                         only=names, log=lambda m: None)
  assert out.done == names
  for run in [r for r in sweep.runs if r.name in names]:
    res = runner.load_result(results, run)
    sel = res['checkpoint_selection']
    curve = {int(s): v for s, v in sel['curve'].items()}
    assert sorted(curve) == list(range(1, 11)) and sel['interval'] == 1
    assert sel['chosen_step'] == selection_lib.best_step(curve)
    assert curve[sel['chosen_step']] == max(curve.values())
    assert not any(v == max(curve.values()) for s, v in curve.items() if s < sel['chosen_step'])
    assert res['metrics']['validation']['summary'] == sel['summaries'][str(sel['chosen_step'])]
    assert res['eval_num_examples'] == {'validation': 2, 'test': 2}
    assert res['cpu_time_s']['train'] > 0 and res['git_revision']
    assert res['run']['evaluation']['select_checkpoint_every'] == 0.1
    assert 'train.keep_checkpoints = 10' in res['gin_config']
    # Test is scored on the chosen step: restoring it gives the recorded test numbers, and the
    # last step gives others (a trained model's cross-entropy moves).
    model_dir = os.path.join(work, 'runs', run.key)
    scored = {}
    for step in (sel['chosen_step'], 10):
      from sira_jax import restore
      model, variables, _, _ = restore.load_trained(model_dir, step=step)
      scored[step] = evaluation.evaluate_split(
          model, variables, res['mixture'], res['task_feature_lengths'], 'test', num_examples=2,
          batch_size=sweep.eval_batch_size, output_dir=str(tmp_path / 'eval'))
    assert scored[sel['chosen_step']] == res['metrics']['test']
    if sel['chosen_step'] != 10:
      assert scored[10]['summary']['cross_entropy'] != res['metrics']['test']['summary'][
          'cross_entropy']
  # near_base: its own base pretrained on offline_pretrain_near_mix, scored on the 15 held-out
  # tasks (the floor: the base as is, no training).
  near = sweeps_lib.with_overrides(sweeps_lib.get_sweep('regime_near_base'), TINY,
                                   eval_num_examples=1)
  out = runner.run_sweep(near, results_dir=results, work_dir=work, progress_bar=False,
                         only=['floor (frozen base)-s0'], log=lambda m: None)
  floor = runner.load_result(results, near.runs[0])
  assert sorted(floor['metrics']['test']['tasks']) == sorted(
      offline_suite.bench_task_names(('pt', 'ru', 'pl', 'tr', 'fi')))
  assert 'checkpoint_selection' not in floor
  with open(os.path.join(work, f'base_{floor["base"]["config_hash"]}', 'provenance.json')) as f:
    assert json.load(f)['settings']['train']['mixture_or_task_name'] == 'offline_pretrain_near_mix'
  assert regime_rule.MIN_SEEDS == len(sweeps_lib.REGIME_SEEDS)
