"""Sweep runner + report smoke test (tiny sizes), and the sweep definitions."""
import json
import os

import numpy as np
import pytest

from experiments import report as report_lib
from experiments import runner
from experiments import sweeps as sweeps_lib

TINY = ('EMBED_DIM=16', 'MLP_DIM=32', 'NUM_HEADS=2', 'HEAD_DIM=8', 'NUM_ENCODER_LAYERS=1',
        'NUM_DECODER_LAYERS=1', 'BATCH_SIZE=8', 'train.tensorboard=False', 'train.log_every=1')


def _tiny_sweep():
  run_gin = ('adapters/sira.gin', 'models/t5_tiny.gin', 'runs/finetune.gin')
  binds = (*TINY, "MIXTURE_OR_TASK_NAME='offline_currency_en'", 'TRAIN_STEPS=2',
           "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 24}", 'NUM_EXPERTS=2')
  # The tuning protocol: two rates on seed 0, seed 1 at the rate seed 0's validation chose.
  runs = tuple(sweeps_lib.tuned('sira E2', run_gin, binds, axes={'experts': 2, 'method': 'sira'},
                                seeds=(0, 1), learning_rates=(1e-2, 3e-2)))
  # The frozen base evaluated as is, on the same data.
  floor = sweeps_lib.Run(point='floor', gin_files=run_gin[1:], bindings=binds[:-1], kind='floor')
  runs = (floor,) + runs
  return sweeps_lib.Sweep(
      'smoke', 'a smoke test', runs,
      base_gin=('models/t5_tiny.gin', 'runs/pretrain.gin'),
      base_bindings=(*TINY, "MIXTURE_OR_TASK_NAME='offline_span_corruption'", 'TRAIN_STEPS=1'),
      eval_num_examples=4, eval_batch_size=8, plots=(('experts', 'method'),),
      routing_points=('sira E2',))


@pytest.mark.slow
def test_runner_and_report_on_a_two_run_sweep(tmp_path):
  sweep = _tiny_sweep()
  results, work, out = (str(tmp_path / d) for d in ('results', 'work', 'report'))
  first = runner.run_sweep(sweep, results_dir=results, work_dir=work, progress_bar=False,
                           log=lambda m: None)
  assert len(first.done) == 4 and not first.pending
  # Finished runs are skipped on a second call (resumable sweeps).
  again = runner.run_sweep(sweep, results_dir=results, work_dir=work, progress_bar=False,
                           log=lambda m: None)
  assert again.done == [] and len(again.skipped) == 4
  # `--run` picks runs by name, a tuned run by its sweep name ('...-lrtuned-s1') too.
  picked = runner.run_sweep(sweep, results_dir=results, work_dir=work, progress_bar=False,
                            log=lambda m: None, only=[sweep.runs[0].name, sweep.runs[-1].name])
  assert picked.done == [] and picked.skipped == [sweep.runs[0].name, sweep.runs[-1].name]
  with pytest.raises(ValueError, match='no run named'):
    runner.run_sweep(sweep, results_dir=results, work_dir=work, progress_bar=False,
                     log=lambda m: None, only=['no such run'])
  floor = runner.load_result(results, sweep.runs[0])
  assert floor['train'] == {} and floor['params']['trainable'] == 0
  assert 'offline_currency_en' in floor['metrics']['test']['tasks']
  tuning = sweep.tuning_runs('sira E2')
  assert [(r.seed, r.learning_rate) for r in tuning] == [(0, 1e-2), (0, 3e-2)]
  summaries = {r.learning_rate: runner.load_result(results, r)['metrics']['validation']['summary']
               for r in tuning}
  # The best validation sequence accuracy; a tie (likely after 2 steps): token accuracy decides.
  chosen = sweeps_lib.choose_learning_rate(
      {lr: [m['sequence_accuracy']] for lr, m in summaries.items()},
      {lr: [m['token_accuracy']] for lr, m in summaries.items()})
  seed1, = [r for r in sweep.runs if r.seed == 1]
  assert not seed1.resolved and runner.load_result(results, seed1) is None
  seed1, res1 = runner.resolved_result(results, seed1, sweep)
  assert seed1.learning_rate == chosen and res1['run']['learning_rate'] == chosen
  assert f'LEARNING_RATE = {chosen!r}' in res1['gin_config']
  seed0 = [r for r in tuning if r.learning_rate == chosen][0]
  res = [runner.load_result(results, seed0), res1]
  for r, run in zip(res, (seed0, seed1)):
    assert r['run']['seed'] == run.seed and r['git_revision'] and r['hardware']['cpu_count']
    assert r['params']['trainable'] > 0 and r['params']['total'] > r['params']['trainable']
    assert set(r['metrics']) == {'validation', 'test'}
    assert r['train']['steps'] == 2 and r['wall_time_s']['total'] > 0
    assert r['routing']['num_experts'] == 2
    # Training-mode statistics on the run's training batches, eval-mode ones apart.
    assert r['routing']['train_batches']['mode'] == 'train'
    assert r['routing']['train_batches']['num_batches'] == 8
    assert set(r['routing']['eval']['dropped_fraction']) == set(r['routing']['sites'])
    assert 'offline_currency_en' in r['metrics']['test']['tasks']

  path = report_lib.write_report([sweep], results_dir=results, out_dir=out)
  text = open(path).read()
  with open(os.path.join(out, 'smoke.json')) as f:
    agg = json.load(f)
  point = agg['points']['sira E2']
  assert point['learning_rate'] == chosen and point['seeds'] == [0, 1]
  for metric in ('sequence_accuracy', 'token_accuracy'):
    vals = [r['metrics']['test']['summary'][metric] for r in res]
    assert point['per_seed'][metric] == pytest.approx(vals)
    assert point['mean'][metric] == pytest.approx(np.mean(vals))
    # The table shows exactly these numbers.
    assert f'{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}' in text
  plots = sorted(os.listdir(os.path.join(out, 'plots')))
  assert plots == ['smoke_per_family.png', 'smoke_per_language.png', 'smoke_routing_sira_E2.png',
                   'smoke_sequence_accuracy_vs_experts.png']
  for p in plots:
    assert open(os.path.join(out, 'plots', p), 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
    assert f'plots/{p}' in text
  # The plotted points are the aggregated runs' numbers.
  curve = agg['plots']['plots/smoke_sequence_accuracy_vs_experts.png']['sira']
  assert curve == [[2, pytest.approx(point['mean']['sequence_accuracy']),
                    pytest.approx(point['std']['sequence_accuracy'])]]
  usage = agg['plots']['plots/smoke_routing_sira_E2.png']['usage']
  assert usage == res[0]['routing']['eval']['usage']
  assert 'train-batch dropped' in text and 'old measurement' not in text


def test_choose_learning_rate():
  assert sweeps_lib.choose_learning_rate({1e-3: [10.0, 20.0], 3e-3: [14.0]}) == 1e-3
  assert sweeps_lib.choose_learning_rate({3e-3: [5.0], 1e-3: [5.0]}) == 1e-3   # tie: smaller
  # A tie (c2's AdaMix: 0 at every rate) goes to the better token accuracy, then the smaller rate.
  tied = {1e-3: [0.0], 3e-3: [0.0], 1e-2: [0.0]}
  assert sweeps_lib.choose_learning_rate(tied, {1e-3: [85.0], 3e-3: [89.4], 1e-2: [58.9]}) == 3e-3
  assert sweeps_lib.choose_learning_rate(tied, {1e-3: [85.0], 3e-3: [85.0], 1e-2: [60.0]}) == 1e-3
  # The tie-break never overrides a better main score.
  assert sweeps_lib.choose_learning_rate({1e-3: [1.0], 3e-3: [0.0]}, {1e-3: [50.0], 3e-3: [99.0]}
                                         ) == 1e-3
  with pytest.raises(ValueError, match='no tuning results'):
    sweeps_lib.choose_learning_rate({})


def test_chosen_learning_rate_is_one_rule_for_runner_and_report():
  # Tuning runs (seed 0 at two rates) choose; a seed-1 run at a worse-scoring rate does not.
  runs = sweeps_lib.grid('p', ('adapters/lora.gin',), seeds=(0,), learning_rates=(1e-3, 1e-2))
  other = sweeps_lib.grid('p', ('adapters/lora.gin',), seeds=(1,), learning_rates=(1e-3,))[0]
  sweep = sweeps_lib.Sweep('t', 'test', tuple(runs) + (other,))
  res = lambda v: {'metrics': {'validation': {'summary': {'sequence_accuracy': v}}}}  # noqa: E731
  results = {1e-3: [(runs[0], res(10.0)), (other, res(90.0))], 1e-2: [(runs[1], res(20.0))]}
  lr, scores = sweeps_lib.chosen_learning_rate(sweep, 'p', results)
  assert lr == 1e-2 and scores == {1e-3: [10.0], 1e-2: [20.0]}
  # Tied on sequence accuracy: validation token accuracy decides.
  tok = lambda v, t: {'metrics': {'validation': {'summary': {'sequence_accuracy': v,  # noqa: E731
                                                             'token_accuracy': t}}}}
  assert sweeps_lib.chosen_learning_rate(
      sweep, 'p', {1e-3: [(runs[0], tok(0.0, 85.0))], 1e-2: [(runs[1], tok(0.0, 89.0))]})[0] == 1e-2
  # A point without tuning runs (one fixed rate) is scored on every given run.
  fixed = sweeps_lib.Sweep('f', 'test', (other,))
  assert sweeps_lib.chosen_learning_rate(fixed, 'p', {1e-3: [(other, res(5.0))]}) == (
      1e-3, {1e-3: [5.0]})


def test_sweep_definitions():
  assert {'c1', 'c2', 'c3', 'c4', 'c5', 'c6', 'c7'} <= set(sweeps_lib.SWEEPS)
  for sweep in sweeps_lib.SWEEPS.values():
    for point in sweep.points():
      runs = [r for r in sweep.runs if r.point == point]
      if runs[0].kind == 'floor':
        continue
      # The regime selection runs more seeds of LoRA r4 and r32 (the rule's power); the claims in
      # a regime more on their headline points (tests/test_regime_claims.py).
      seeds = (sweeps_lib.REGIME_SEEDS if sweep.name.startswith('regime_')
               and point in ('lora r4', 'lora r32') else
               _claim_in_regime_seeds(sweep, point) if '@' in sweep.name else sweeps_lib.SEEDS)
      assert {r.seed for r in runs} == set(seeds), (sweep.name, point)
      tuning = sweep.tuning_runs(point)
      grid = (sweeps_lib.FULL_FT_LR_GRID if runs[0].axes['method'] == 'full_ft'
              else sweeps_lib.LR_GRID)
      if tuning:
        # The same budget for every tuned point: the grid on the tuning seeds, nothing else.
        assert sorted((r.seed, r.learning_rate) for r in tuning) == sorted(
            (s, lr) for s in sweeps_lib.TUNE_SEEDS for lr in grid), (sweep.name, point)
        assert all(r.lr_from == point for r in runs if r not in tuning)
      else:
        # An ablation inherits the rate of its method's tuned point in the same sweep.
        src, = {r.lr_from for r in runs}
        assert sweep.tuning_runs(src) and src.split()[0] == point.split()[0], (sweep.name, point)
  # Every method of the comparisons is tuned itself (never inherits another method's rate).
  in_regimes = [f'{c}@{x}' for c in ('c2', 'c3') for x in sweeps_lib.REGIME_CANDIDATES]
  for name in ('c2', 'c3', *in_regimes):
    sweep = sweeps_lib.get_sweep(name)
    assert all(sweep.tuning_runs(p) for p in sweep.points() if not p.startswith('floor'))
  c3 = sweeps_lib.get_sweep('c3')
  assert {r.axes['method'] for r in c3.runs} >= {'lora', 'adamix', 'molora', 'sira', 'floor',
                                                  'full_ft'}
  with pytest.raises(ValueError, match='unknown sweep'):
    sweeps_lib.get_sweep('c9')


def _claim_in_regime_seeds(sweep, point):
  """The seeds of a point of a claim in a regime ('c3@data_limited'): c1's ranks the selection's
  REGIME_SEEDS (in a trimmed candidate r4 and r32 only, the others SEEDS); c2, c3 and SiRA's
  default point HEADLINE_SEEDS; the ablations ABLATION_SEEDS."""
  if sweep.claim_id == 'c1':
    trimmed = sweep.name.split('@')[1] in sweeps_lib.REGIME_BUDGET_TRIMMED
    return (sweeps_lib.SEEDS if trimmed and point not in ('lora r4', 'lora r32')
            else sweeps_lib.REGIME_SEEDS)
  if sweep.claim_id in ('c2', 'c3') or point == sweeps_lib.SIRA:
    return sweeps_lib.HEADLINE_SEEDS
  return sweeps_lib.ABLATION_SEEDS


def test_c6_lists_every_ablation_against_the_default_outside_the_verdict():
  sweep = sweeps_lib.get_sweep('c6')
  seeds = {'sira E8 k2': [10.0, 11.0, 12.0], 'sira no expert dropout': [10.0, 11.0, 12.0],
           'smoe_dropout E8': [10.0, 11.0, 12.0], 'sira E8 k4': [20.0, 21.0, 22.0],
           'sira aux 0': [1.0, 2.0]}
  agg = {'points': {p: {'per_seed': {'sequence_accuracy': v}} for p, v in seeds.items()}}
  pairs = report_lib.ablation_comparisons(sweep, agg)
  # Measured ablations only, never the claim's own pairs, never another method.
  assert pairs == [('sira E8 k4', 'sira E8 k2'), ('sira aux 0', 'sira E8 k2')]
  k4, aux0 = (report_lib.compare(agg, a, b, 'sequence_accuracy') for a, b in pairs)
  assert k4['outcome'] == 'a higher' and k4['diff'] == pytest.approx(10.0)
  assert aux0['outcome'] == 'b higher'
  # The verdict reads the claim's pairs alone: equal there, so inconclusive.
  comps = [report_lib.compare(agg, a, b, 'sequence_accuracy')
           for a, b in report_lib.claim_comparisons(sweep, agg)]
  assert report_lib.claim_verdict(sweep, dict(agg, missing=[], finished=1, total=1),
                                  comps).startswith('inconclusive')
  assert report_lib.ablation_comparisons(sweeps_lib.get_sweep('c3'), agg) == []


def test_family_and_language():
  from tasks import family_and_language
  assert family_and_language('offline_date_ru') == ('date', 'ru')
  assert family_and_language('xtreme_up_semantic_parsing_hi') == ('semantic_parsing', 'hi')
  assert family_and_language('xtreme_up_translation_en_sw') == ('translation', 'sw')
  assert family_and_language('xtreme_up_transliteration_hi_Deva_Latn') == ('transliteration', 'hi')


def test_full_finetuning_counts_every_parameter_as_trained():
  counts = dict(total=100, trainable=0, frozen=100, adapter_total=0)
  for pretrain, trainable in (('True', 100), ('False', 0)):
    got = runner.trained_counts(counts, f'train.pretrain = {pretrain}\n')
    assert got['trainable'] == trainable and got['total'] == 100
  # The floor (no training; its gin config is the fine-tuning one) keeps its counts; the report
  # reads old result files the same way.
  assert runner.trained_counts(counts, '') == counts
  res = {'params': counts, 'gin_config': 'train.pretrain = True\n'}
  assert report_lib._params(res)['trainable'] == 100


def test_sira_defaults_changes_one_knob_at_a_time_under_c2s_protocol():
  sweep = sweeps_lib.get_sweep('sira_defaults')
  c2 = sweeps_lib.get_sweep('c2')
  base, *variants = sweep.points()
  assert base == sweeps_lib.SIRA and len(variants) == len(sweeps_lib.SIRA_DEFAULTS_VARIANTS) == 6
  c2_sira = next(r for r in c2.runs if r.point == sweeps_lib.SIRA)
  base_runs = [r for r in sweep.runs if r.point == base]
  # SiRA as it is in c2, on c2's task, logging every 10 steps for the last-100-steps loss.
  assert set(base_runs[0].bindings) == set(c2_sira.bindings) | {'train.log_every=10'}
  for point, bindings, _ in sweeps_lib.SIRA_DEFAULTS_VARIANTS:
    runs = [r for r in sweep.runs if r.point == point]
    assert runs[0].bindings == (*base_runs[0].bindings, *bindings)
    assert runs[0].gin_files == c2_sira.gin_files
    # Tuned like SiRA: the same grid on the tuning seeds, the other seeds at its own rate.
    assert [(r.seed, r.learning_rate, r.lr_from) for r in runs] == [
        (b.seed, b.learning_rate, b.lr_from and point) for b in base_runs]
  assert len(sweep.runs) == 7 * (len(sweeps_lib.LR_GRID) + len(sweeps_lib.SEEDS) - 1) == 42
  # Decided on training evidence: validation and the training loss, never test.
  assert sweep.select_split == sweep.report_split == 'validation'
  assert sweep.training_evidence == (sweeps_lib.TRAIN_CE_LAST_100,)
  assert sweep.routing_points == tuple(sweep.points())
  assert 'Fairness rule' in sweeps_lib.sira_defaults_sweep.__doc__
