"""The report's claim tables (experiments.claims_table) and checkpoint-selection section: README's
reproduction summary against the committed result files, both regimes side by side in every state
of the regime selection, and the chosen steps and validation curves of a sweep with checkpoint
selection (synthetic result files)."""
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from experiments import checkpoint_selection
from experiments import claims_table
from experiments import report as report_lib
from experiments import runner
from experiments import sweeps as sweeps_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')


# ------------------------------------------------------------------------------------------------
# README's reproduction summary: regenerated from the committed result files
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def committed():
  """Every claim's analysis of the committed result files (no plots)."""
  return {c: report_lib.analyse(sweeps_lib.get_sweep(c), runner.DEFAULT_RESULTS_DIR)
          for c in report_lib.CLAIMS}


def test_readme_summary_is_the_one_the_committed_results_give(committed):
  block = claims_table.readme_block(committed, {c: sweeps_lib.get_sweep(c) for c in committed},
                                    'experiments/results/REPORT.md')
  with open(README) as f:
    text = f.read()
  assert claims_table.current_block(text) == block, (
      'README.md\'s reproduction summary is not the committed results\'; regenerate it: '
      'python -m experiments.report')
  assert block.count('\n') <= 25 and '600 steps' in block


_SIDE = r'(?P<{0}>.+?) (?P<{0}_mean>[-\d.]+) ± (?P<{0}_sd>[\d.]+) \(n=(?P<{0}_n>\d+)\)'
_ROW = re.compile(r'^\| (?P<claim>c\d) \| (?:(?P<verdict>[a-z ]+)|partial (?P<done>\d+)/(?P<total>\d+)) \| '
                  r'(?:so far (?P<so_far>[a-z ]+): )?' + _SIDE.format('a') + ' vs ' +
                  _SIDE.format('b') + r': (?P<diff>[-+\d.]+), 95% CI \[(?P<low>[-+\d.]+), '
                  r'(?P<high>[-+\d.]+)\]( \(least favourable of (?P<of>\d+)\))? \|$')


def test_readme_numbers_are_the_per_seed_results_by_hand(committed):
  """Each row's means, sds, seeds, difference and Welch interval, recomputed from the points'
  per-seed test metrics with numpy and scipy; its comparison is the one the verdict turns on."""
  with open(README) as f:
    rows = [line for line in claims_table.current_block(f.read()).splitlines()
            if re.match(r'\| c\d \|', line)]
  assert [r.split(' | ')[0][2:] for r in rows] == list(report_lib.CLAIMS)
  for row in rows[:-1]:
    m = _ROW.match(row)
    assert m, row
    agg = committed[m['claim']]
    partial = bool(m['done'])
    if partial:  # a partial sweep: its counts, and the verdict so far
      assert (int(m['done']), int(m['total'])) == (agg['finished'], agg['total']) and m['so_far']
      assert agg['verdict'].startswith(m['so_far'])
    else:
      assert m['verdict'] == agg['verdict'].split(':')[0]
    a, b = (agg['points'][m[k]]['per_seed']['sequence_accuracy'] for k in 'ab')
    for k, vals in (('a', a), ('b', b)):
      assert float(m[f'{k}_mean']) == pytest.approx(np.mean(vals), abs=0.005)
      assert float(m[f'{k}_sd']) == pytest.approx(np.std(vals, ddof=1), abs=0.005)
      assert int(m[f'{k}_n']) == len(vals)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert float(m['diff']) == pytest.approx(np.mean(a) - np.mean(b), abs=0.005)
    assert (float(m['low']), float(m['high'])) == pytest.approx((ci.low, ci.high), abs=0.005)
    assert int(m['of'] or 1) == len(agg['comparisons'])
    # The verdict turns on this comparison: not reproduced -> it goes against the claim (for c1:
    # the higher rank is significantly better), inconclusive -> no significant difference. (A
    # partial sweep's verdict so far may instead be for a comparison without 2 seeds yet.)
    if partial:
      continue
    against = (ci.low > 0) if m['claim'] == 'c1' else (ci.high < 0)
    assert against == (m['verdict'] == 'not reproduced')
    if m['verdict'] == 'inconclusive':
      assert ci.low <= 0 <= ci.high
  largest = max(v for e in committed['c7']['points'].values()
                for sites in e['specialisation'].values() for v in sites.values())
  assert f' {largest:.3f} (' in rows[-1] and rows[-1].startswith('| c7 | inconclusive | ')


def test_readme_block_replaced_between_its_markers_only(tmp_path):
  path = tmp_path / 'README.md'
  path.write_text(f'# title\n\nbefore\n{claims_table.BEGIN}\nold\n{claims_table.END}\nafter\n')
  claims_table.write_readme(str(path), f'{claims_table.BEGIN}\nnew\n{claims_table.END}')
  assert path.read_text() == (
      f'# title\n\nbefore\n{claims_table.BEGIN}\nnew\n{claims_table.END}\nafter\n')
  for broken in ('no markers\n', f'{claims_table.END}\n{claims_table.BEGIN}\n',
                 f'{claims_table.BEGIN}\n{claims_table.BEGIN}\n{claims_table.END}\n'):
    path.write_text(broken)
    with pytest.raises(ValueError, match='expected the markers'):
      claims_table.write_readme(str(path), 'x')
    assert path.read_text() == broken


def test_readme_is_rewritten_only_by_the_default_report():
  default = dict(results_dir=runner.DEFAULT_RESULTS_DIR, out_dir=None, bindings=[],
                 eval_examples=None, sweep_names=list(sweeps_lib.SWEEPS))
  assert report_lib.default_readme(**default) == README
  for change in (dict(out_dir='/tmp/report'), dict(results_dir='/tmp/results'),
                 dict(bindings=['TRAIN_STEPS=2']), dict(eval_examples=2),
                 dict(sweep_names=['c1', 'c3'])):
    assert report_lib.default_readme(**dict(default, **change)) == ''
  with pytest.raises(ValueError, match=r"lacks \['c2'"):
    report_lib.write_report(['c1'], readme=README)


@pytest.mark.parametrize('args,readme,expected', [
    (['--sweep=c1'], 'markers', "the README summary needs every claim; the report lacks ['c2'"),
    ([], 'no markers', 'expected the markers'),
])
def test_readme_flag_errors_name_the_problem(tmp_path, args, readme, expected):
  path = tmp_path / 'README.md'
  path.write_text(f'{claims_table.BEGIN}\n{claims_table.END}\n' if readme == 'markers' else '#\n')
  before = path.read_text()
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.report', *args, f'--readme={path}',
       f'--results_dir={tmp_path}', f'--out_dir={tmp_path / "report"}'], cwd=ROOT,
      capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(f'error: --readme={path}: {expected}')
  assert path.read_text() == before and not (tmp_path / 'report').exists()


# ------------------------------------------------------------------------------------------------
# Synthetic result files
# ------------------------------------------------------------------------------------------------
def _result(run, score, selection=None, steps=100):
  """A result file's content as the runner writes it (the fields the report reads)."""
  split = {'summary': {'sequence_accuracy': score, 'token_accuracy': score + 50.0},
           'tasks': {'offline_date_en': {'sequence_accuracy': score},
                     'offline_unit_de': {'sequence_accuracy': score}}}
  res = {'run': run.as_dict(), 'metrics': {'validation': split, 'test': split},
         'params': {'total': 1000, 'trainable': 10, 'frozen': 990, 'active_per_token': 10},
         'gin_config': '', 'wall_time_s': {'train': 1.0, 'total': 2.0},
         'train': {'steps': steps} if run.kind == 'finetune' else {}}
  if selection is not None:
    res['checkpoint_selection'] = selection.as_dict()
  return res


def _write(sweep, results_dir, score, names=None):
  """Result files for the runs of `sweep` (those named in `names`; None: all), tuning runs first,
  each scoring score(run) (learning rates resolved as the runner resolves them)."""
  order = [r for r in sweep.runs if r.resolved] + [r for r in sweep.runs if not r.resolved]
  for run in order:
    if names is not None and run.name not in names:
      continue
    run = runner.resolve(run, sweep, results_dir)
    path = runner.result_path(results_dir, run)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(_result(run, score(run)), f)


def _rank_helps(run):
  """c1 not reproduced: +2 points per rank over seed noise of 1."""
  return 10.0 + run.seed + 2.0 * run.axes.get('rank', 0)


def _rank_flat(run):
  """c1 reproduced: 0.1 points per rank under seed noise of 3."""
  return 20.0 + 3.0 * run.seed + 0.1 * run.axes.get('rank', 0)


def _in_regime(sweep, regime, binding):
  """`sweep` re-run in a regime: f'{claim}@{regime}', every run with `binding` (other keys)."""
  return dataclasses.replace(
      sweep, name=f'{sweep.name}@{regime}',
      runs=tuple(dataclasses.replace(r, bindings=(*r.bindings, binding)) for r in sweep.runs))


def _headline_by_hand(a, b, of):
  """The headline of points a and b ({'point', 'scores'}) from its definition."""
  sa, sb = a['scores'], b['scores']
  ci = stats.ttest_ind(sa, sb, equal_var=False).confidence_interval(0.95)
  side = lambda p: (f'{p["point"]} {np.mean(p["scores"]):.2f} ± '
                    f'{np.std(p["scores"], ddof=1):.2f} (n={len(p["scores"])})')
  return (f'{side(a)} vs {side(b)}: {np.mean(sa) - np.mean(sb):+.2f}, 95% CI '
          f'[{ci.low:+.2f}, {ci.high:+.2f}] (least favourable of {of})')


def _c1_scores(score, rank):
  """{'point', 'scores'} of LoRA of `rank` in c1 under `score` (tuning ties: the smallest rate)."""
  point = 'lora r4' if rank == 4 else ('lora r32 (params of E=8)' if rank == 32 else
                                       f'lora r{rank}')
  run = sweeps_lib.Run(point=point, gin_files=(), axes={'rank': rank})
  return dict(point=point, scores=[score(dataclasses.replace(run, seed=s))
                                   for s in sweeps_lib.SEEDS])


# ------------------------------------------------------------------------------------------------
# Both regimes side by side
# ------------------------------------------------------------------------------------------------
C1 = sweeps_lib.get_sweep('c1')
C1_DATA_LIMITED = _in_regime(C1, 'data_limited', 'TRAIN_STEPS=1200')
WINNER = {'decision': 'winner', 'winner': 'data_limited', 'sweep': 'regime_data_limited'}


def _rows(section):
  return {line.split(' | ')[0][2:]: line.split(' | ')[1:] for line in section.splitlines()
          if re.match(r'\| c\d \|', line)}


@pytest.fixture(scope='module')
def underfit_results(tmp_path_factory):
  """c1's runs in the under-fit regime, where rank helps."""
  results = str(tmp_path_factory.mktemp('results'))
  _write(C1, results, _rank_helps)
  return results


def _section(results, sweeps, selection):
  return claims_table.regimes_section(sweeps, {}, results, selection)


def _underfit_cells():
  return ['not reproduced', _headline_by_hand(_c1_scores(_rank_helps, 64),
                                              _c1_scores(_rank_helps, 4), 4)]


def test_regimes_without_a_selection(underfit_results):
  section = _section(underfit_results, {'c1': C1, 'c1@data_limited': C1_DATA_LIMITED}, None)
  assert claims_table.read_selection(underfit_results) is None
  assert ('**Chosen regime:** regime not chosen yet (no regime_selection.json: `python -m '
          'experiments.regime_selection` writes it).') in section
  assert '**Under-fit regime** (full training data, 100 steps)' in section
  rows = _rows(section)
  assert list(rows) == list(report_lib.CLAIMS)
  assert rows['c1'] == [*_underfit_cells(), 'regime not chosen yet', '- |']
  # Claims whose sweeps are not given (here c2-c7) have not run.
  assert all(rows[c] == ['not run', '-', 'regime not chosen yet', '- |']
             for c in report_lib.CLAIMS[1:])


def test_regimes_chosen_but_not_run(underfit_results):
  for sweeps in ({'c1': C1}, {'c1': C1, 'c1@data_limited': C1_DATA_LIMITED}):  # undefined, unrun
    section = _section(underfit_results, sweeps, WINNER)
    assert ('**Chosen regime: data_limited** (the first 64 training examples of each of the 30 '
            'tasks, 1,200 steps): winner of the pre-registered rule') in section
    assert '| claim | under-fit: verdict | under-fit: numbers | data_limited: verdict | ' \
           'data_limited: numbers |' in section
    assert _rows(section)['c1'] == [*_underfit_cells(), 'not run', '- |']


def test_regimes_chosen_and_partly_run(underfit_results, tmp_path):
  results = str(tmp_path / 'results')
  shutil.copytree(underfit_results, results)
  # The floor, the tuning runs and seed 1 of LoRA r4 and r8: r8 vs r4 is measured on 2 seeds each.
  names = ['floor (frozen base)-s0'] + [
      n for rank in (4, 8) for n in
      [f'lora r{rank}-lr{lr:g}-s0' for lr in sweeps_lib.LR_GRID] + [f'lora r{rank}-lrtuned-s1']]
  finished = len(names)
  assert set(names) <= {r.name for r in C1_DATA_LIMITED.runs}
  _write(C1_DATA_LIMITED, results, _rank_flat, names)
  section = _section(results, {'c1': C1, 'c1@data_limited': C1_DATA_LIMITED}, WINNER)
  r4, r8 = (dict(_c1_scores(_rank_flat, rank), scores=_c1_scores(_rank_flat, rank)['scores'][:2])
            for rank in (4, 8))
  assert _rows(section)['c1'] == [
      *_underfit_cells(), f'partial {finished}/31',
      'so far reproduced: ' + _headline_by_hand(r8, r4, 1).replace(' (least favourable of 1)', '')
      + ' |']


def test_regimes_chosen_and_complete_in_the_report(underfit_results, tmp_path):
  results, out = str(tmp_path / 'results'), str(tmp_path / 'report')
  _write(C1, results, _rank_helps)
  _write(C1_DATA_LIMITED, results, _rank_flat)
  with open(os.path.join(results, 'regime_selection.json'), 'w') as f:
    json.dump(WINNER, f)
  sweeps = {'c1': C1, 'c1@data_limited': C1_DATA_LIMITED}
  path = report_lib.write_report([C1], results_dir=results, out_dir=out, regimes=sweeps)
  text = open(path).read()
  section = text[text.index('## The claims in both regimes'):text.index('## c1: ')]
  assert text.index('## The claims in both regimes') < text.index('## c1: ')
  assert _rows(section)['c1'] == [
      *_underfit_cells(), 'reproduced',
      _headline_by_hand(_c1_scores(_rank_flat, 64), _c1_scores(_rank_flat, 4), 4) + ' |']
  # The same numbers as the regime sweep's own report.
  regime = report_lib.analyse(C1_DATA_LIMITED, results)
  assert regime['verdict'] == 'reproduced: no higher rank significantly better than lora r4'
  assert report_lib.format_headline(regime['headline']) in section


@pytest.mark.parametrize('selection,expected', [
    ({'decision': 'none_passes', 'closest': 'converged', 'label': 'converged (failing the '
      'pre-registered rule)', 'failed_checks': ['c1_equivalence', 'headroom']},
     '**Chosen regime: converged** (all 2,000 training examples of each task, 4,800 steps): none '
     'passes; closest: converged (failing c1_equivalence, headroom)'),
    ({'decision': 'undecided', 'why': 'converged is next in cost order and has 13 of 40 runs '
      'unfinished', 'next': 'python -m experiments.runner --sweep=regime_converged'},
     '**Chosen regime:** regime not chosen yet (undecided: converged is next in cost order and '
     'has 13 of 40 runs unfinished).'),
])
def test_regimes_without_a_winner(underfit_results, selection, expected):
  section = _section(underfit_results, {'c1': C1}, selection)
  assert expected in section
  right = ['not run', '- |'] if selection['decision'] == 'none_passes' else [
      'regime not chosen yet', '- |']
  assert _rows(section)['c1'] == [*_underfit_cells(), *right]


# ------------------------------------------------------------------------------------------------
# Checkpoint selection: the chosen steps and the validation curves
# ------------------------------------------------------------------------------------------------
def test_chosen_steps_and_validation_curves(tmp_path):
  sweep = sweeps_lib.Sweep(
      'selected', 'checkpoint selection', tuple(
          sweeps_lib.floor_run() + sweeps_lib.grid('lora r4', ('adapters/lora.gin',),
                                                   seeds=(0, 1), learning_rates=(1e-3,))),
      select_checkpoint_every=0.25)
  results, out = str(tmp_path / 'results'), str(tmp_path / 'report')
  curves = {0: {25: 1.0, 50: 4.0, 75: 4.0, 100: 2.0},  # tie: the earlier step
            1: {25: 0.5, 50: 1.0, 75: 2.0, 100: 3.0}}
  for run in sweep.runs:
    selection = None
    if run.kind == 'finetune':
      curve = curves[run.seed]
      step = checkpoint_selection.best_step(curve)
      selection = checkpoint_selection.Selection(
          interval=25, split='validation', metric='sequence_accuracy', curve=curve,
          chosen_step=step, scores={s: {'summary': {'sequence_accuracy': v}}
                                    for s, v in curve.items()})
    path = runner.result_path(results, run)
    os.makedirs(os.path.dirname(path))
    with open(path, 'w') as f:
      json.dump(_result(run, 10.0 + run.seed, selection), f)
  text = open(report_lib.write_report([sweep], results_dir=results, out_dir=out)).read()
  assert ('Checkpoints chosen on validation (the best sequence accuracy among those kept at every '
          "25% of the run; ties: the earlier step), per seed: chosen step / the run's steps:"
          ) in text
  assert '| point | seed 0 | seed 1 |\n|---|---|---|\n| lora r4 | 50 / 100 | 100 / 100 |\n' in text
  assert '| floor (frozen base) |' not in text.split('Checkpoints chosen')[1]  # no selection
  figure = 'plots/selected_validation_curve_lora_r4.png'
  assert f'![lora r4: validation curves]({figure})' in text
  assert open(os.path.join(out, figure), 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  with open(os.path.join(out, 'selected.json')) as f:
    agg = json.load(f)
  assert agg['plots'][figure] == {str(seed): [[s, v] for s, v in sorted(c.items())]
                                  for seed, c in curves.items()}
  point = agg['points']['lora r4']
  assert point['checkpoint_selection']['chosen_step'] == [50, 100]
  assert point['train_steps'] == [100, 100]
  assert 'checkpoint_selection' not in agg['points']['floor (frozen base)']
  assert not math.isnan(point['mean']['sequence_accuracy'])


def test_no_checkpoint_section_without_selection(tmp_path):
  sweep = sweeps_lib.Sweep('plain', 'last checkpoint', tuple(sweeps_lib.grid(
      'lora r4', ('adapters/lora.gin',), seeds=(0, 1), learning_rates=(1e-3,))))
  results = str(tmp_path / 'results')
  _write(sweep, results, lambda run: 10.0 + run.seed)
  agg = report_lib.analyse(sweep, results)
  assert 'checkpoint_selection' not in agg['points']['lora r4']
  assert report_lib.checkpoint_selection_section(sweep, agg, str(tmp_path), str(tmp_path)) == []


def test_every_sweep_report_names_the_claims_in_a_regime_not_started_without_sections(tmp_path):
  results = str(tmp_path / 'results')  # nothing finished
  text = open(report_lib.write_report(results_dir=results, out_dir=str(tmp_path / 'out'))).read()
  assert '## c1: ' in text and '## regime_data_limited: ' in text   # the first regime; the next step
  unstarted = [n for n in sweeps_lib.SWEEPS if '@' in n]
  assert unstarted and not any(f'## {n}:' in text for n in unstarted)
  assert all(f'`{n}`' in text[text.index('## Not started'):] for n in unstarted)
  assert not any(os.path.exists(tmp_path / 'out' / f'{n}.json') for n in unstarted)
