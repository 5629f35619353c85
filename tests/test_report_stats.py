"""experiments.report's statistics: Welch intervals, every verdict, NMI of routing, and reports
over result folders holding an unreadable result file."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from experiments import report as report_lib
from experiments import routing_stats
from experiments import runner
from experiments import sweeps as sweeps_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Welch's t interval
# ------------------------------------------------------------------------------------------------
def _welch_by_formula(a, b, level):
  """Welch's interval from its textbook definition (Welch-Satterthwaite degrees of freedom)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
  half = stats.t.ppf(0.5 + level / 2, dof) * math.sqrt(va + vb)
  diff = a.mean() - b.mean()
  return diff, diff - half, diff + half


@pytest.mark.parametrize('a,b,level', [
    ([10.0, 11.0, 12.0], [8.0, 9.5, 9.0], 0.95),              # equal sizes
    ([10.0, 11.0, 12.0, 10.5, 13.0], [2.0, 9.0], 0.95),        # unequal sizes and variances
    ([1.0, 1.1], [0.0, 5.0, -5.0, 2.0, 3.0, -1.0], 0.95),      # the small sample varies least
    ([20.1, 19.7, 20.4], [20.0, 20.2, 19.9, 20.3], 0.90),      # another level
])
def test_welch_interval_equals_scipy_and_the_formula(a, b, level):
  diff, lo, hi = report_lib.welch_interval(a, b, level)
  ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(level)
  assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-12)
  assert (diff, lo, hi) == pytest.approx(_welch_by_formula(a, b, level), rel=1e-10)
  assert lo < diff < hi


def test_welch_interval_with_one_seed_or_no_spread():
  diff, lo, hi = report_lib.welch_interval([3.0], [1.0, 2.0])
  assert diff == 1.5 and math.isnan(lo) and math.isnan(hi)
  assert report_lib.welch_interval([2.0, 2.0], [1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Verdicts: each one the report can emit, on synthetic results
# ------------------------------------------------------------------------------------------------
HIGH, LOW = [30.0, 31.0, 32.0], [10.0, 11.0, 12.0]
NOISY = [10.0, 30.0, 20.0]


def _verdict(sweep_name, per_seed, missing=(), unreadable_runs=(), routing=None):
  """The verdict of `sweep_name` on points {point: per-seed sequence accuracy} (the point's
  routing analysis from `routing`, as sweep_section adds it)."""
  sweep = sweeps_lib.get_sweep(sweep_name)
  points = {p: {'per_seed': {'sequence_accuracy': v}} for p, v in per_seed.items()}
  for p, r in (routing or {}).items():
    points[p]['specialisation'] = routing_stats.specialisation(r)
  total = 10
  agg = dict(points=points, missing=list(missing), unreadable_runs=list(unreadable_runs),
             finished=total - len(missing) - len(unreadable_runs), total=total)
  comps = [report_lib.compare(agg, a, b, 'sequence_accuracy')
           for a, b in report_lib.claim_comparisons(sweep, agg)]
  return report_lib.claim_verdict(sweep, agg, comps)


def _routing(usage_by_task):
  """A routing analysis of one site: {task: expert shares}."""
  return {'tasks': list(usage_by_task), 'sites': ['encoder/layers_0/mlp'],
          'usage': {t: {'encoder/layers_0/mlp': u} for t, u in usage_by_task.items()}}


# Date tasks go to expert 0, unit tasks to expert 1: the expert identifies the family.
SPECIALISED = _routing({'offline_date_en': [1.0, 0.0], 'offline_date_de': [1.0, 0.0],
                        'offline_unit_en': [0.0, 1.0], 'offline_unit_de': [0.0, 1.0]})
# Every task routes alike.
UNIFORM = _routing({t: [0.3, 0.7] for t in SPECIALISED['tasks']})
# Slightly family-dependent: NMI(family) = 1 - H(0.6, 0.4) / log 2 = 0.029.
WEAK = _routing({'offline_date_en': [0.6, 0.4], 'offline_date_de': [0.6, 0.4],
                 'offline_unit_en': [0.4, 0.6], 'offline_unit_de': [0.4, 0.6]})


@pytest.mark.parametrize('sweep,per_seed,routing,expected', [
    # c1 (higher ranks do not help):
    ('c1', {'lora r4': LOW, 'lora r8': HIGH}, None,
     'not reproduced: lora r8 significantly better than lora r4'),
    ('c1', {'lora r4': LOW, 'lora r8': NOISY}, None,
     'reproduced: no higher rank significantly better than lora r4'),
    ('c1', {'lora r4': HIGH, 'lora r8': LOW}, None,
     'reproduced: no higher rank significantly better than lora r4'),
    # c3 (SiRA beats the other methods):
    ('c3', {'sira E8 k2': HIGH, 'lora r4': LOW}, None,
     'reproduced: significantly better than every comparison point'),
    ('c3', {'sira E8 k2': LOW, 'lora r4': HIGH, 'molora E8': NOISY}, None,
     'not reproduced: lora r4 significantly better'),
    ('c3', {'sira E8 k2': HIGH, 'lora r4': LOW, 'molora E8': NOISY}, None,
     'inconclusive: no significant difference to molora E8'),
    ('c3', {'sira E8 k2': [30.0], 'lora r4': LOW}, None,
     'inconclusive: comparisons without 2 seeds per point'),
    ('c3', {'sira E8 k2': HIGH}, None, 'not measured'),
    # c7 (experts specialise by family or language):
    ('c7', {'sira E8 k2': HIGH}, SPECIALISED,
     'reproduced: largest NMI(expert; family or language) over sites 1.000'),
    ('c7', {'sira E8 k2': HIGH}, UNIFORM,
     'not reproduced: largest NMI(expert; family or language) over sites 0.000'),
    ('c7', {'sira E8 k2': HIGH}, WEAK,
     'inconclusive: largest NMI(expert; family or language) over sites 0.029'),
    ('c7', {'sira E8 k2': HIGH}, None, 'not measured'),
])
def test_every_verdict_is_reachable(sweep, per_seed, routing, expected):
  routing = {'sira E8 k2': routing} if routing else None
  assert _verdict(sweep, per_seed, routing=routing) == expected


def test_verdicts_are_marked_partial():
  per_seed = {'sira E8 k2': HIGH, 'lora r4': LOW}
  assert _verdict('c3', per_seed, missing=['a', 'b']) == (
      'reproduced: significantly better than every comparison point '
      '(partial: 8 of 10 runs finished)')
  assert _verdict('c3', per_seed, unreadable_runs=['c']) == (
      'reproduced: significantly better than every comparison point '
      '(partial: 9 of 10 runs finished, 1 skipped for unreadable result files)')
  assert _verdict('c7', {}, missing=['a']) == 'not measured (partial: 9 of 10 runs finished)'


# ------------------------------------------------------------------------------------------------
# NMI(expert; family or language)
# ------------------------------------------------------------------------------------------------
def test_nmi_is_one_for_specialised_and_zero_for_independent_routing():
  site = 'encoder/layers_0/mlp'
  spec = routing_stats.specialisation(SPECIALISED)
  assert spec['family'][site] == pytest.approx(1.0, abs=1e-12)
  # Each language holds one date and one unit task: its expert shares are (1/2, 1/2) either way.
  assert spec['language'][site] == pytest.approx(0.0, abs=1e-12)
  spec = routing_stats.specialisation(UNIFORM)
  assert spec == {'family': {site: pytest.approx(0.0, abs=1e-12)},
                  'language': {site: pytest.approx(0.0, abs=1e-12)}}


def test_nmi_by_hand_on_an_intermediate_case():
  site = 'encoder/layers_0/mlp'
  # date -> expert 0 always; unit -> experts 0 and 1 evenly. Groups equally likely:
  # p(X) = (3/4, 1/4), H(X) = log 4 - (3/4) log 3; H(X | date) = 0, H(X | unit) = log 2;
  # NMI = (H(X) - log(2) / 2) / H(X) = 0.38369.
  routing = _routing({'offline_date_en': [1.0, 0.0], 'offline_date_de': [1.0, 0.0],
                      'offline_unit_en': [0.5, 0.5], 'offline_unit_de': [0.5, 0.5]})
  h_x = math.log(4) - 0.75 * math.log(3)
  spec = routing_stats.specialisation(routing)
  assert spec['family'][site] == pytest.approx((h_x - math.log(2) / 2) / h_x, rel=1e-12)
  assert spec['family'][site] == pytest.approx(0.38369, abs=1e-5)
  assert spec['language'][site] == pytest.approx(0.0, abs=1e-12)
  # One family only: NMI with the family is undefined and left out.
  one_family = _routing({'offline_date_en': [1.0, 0.0], 'offline_date_de': [0.0, 1.0]})
  spec = routing_stats.specialisation(one_family)
  assert spec['family'] == {} and spec['language'][site] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------
# An unreadable result.json among many run folders
# ------------------------------------------------------------------------------------------------
def _result(run, score):
  """A result file's content as the runner writes it (the fields the report reads)."""
  split = {'summary': {'sequence_accuracy': score, 'token_accuracy': score + 50.0},
           'tasks': {'offline_date_en': {'sequence_accuracy': score},
                     'offline_unit_de': {'sequence_accuracy': score}}}
  return {'run': run.as_dict(), 'metrics': {'validation': split, 'test': split},
          'params': {'total': 1000, 'trainable': 10, 'frozen': 990, 'active_per_token': 10},
          'gin_config': '', 'wall_time_s': {'train': 1.0, 'total': 2.0}}


def _write_results(sweep, results_dir):
  """Result files for every run of `sweep` (tuned rates resolved as the runner resolves them);
  returns {run name: path}."""
  paths = {}
  for run in [r for r in sweep.runs if r.resolved] + [r for r in sweep.runs if not r.resolved]:
    run = runner.resolve(run, sweep, results_dir)
    score = 10.0 * (run.seed + 1) + 1000 * (run.learning_rate or 0) + len(run.point)
    path = runner.result_path(results_dir, run)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(_result(run, score), f)
    paths[run.name] = path
  return paths


def _truncate(path):
  with open(path) as f:
    text = f.read()
  with open(path, 'w') as f:
    f.write(text[:len(text) // 2])


def test_report_skips_an_unreadable_result_file_and_names_it(tmp_path):
  sweep = sweeps_lib.get_sweep('c1')
  results, out = str(tmp_path / 'results'), str(tmp_path / 'report')
  paths = _write_results(sweep, results)
  assert len(paths) == len(sweep.runs) == 31
  # A run at its tuned rate (seed 1 of lora r8), and a tuning run of lora r16 at the rate it
  # chooses (its seeds 1 and 2 cannot be resolved without it).
  tuned_run = [n for n in paths if n.startswith('lora r8-lr') and n.endswith('-s1')][0]
  r16 = sweep.tuning_runs('lora r16')
  chosen = max(r16, key=lambda r: r.learning_rate)  # the score grows with the rate
  _truncate(paths[tuned_run])
  _truncate(paths[chosen.name])
  proc = subprocess.run(  # the command line, as a user runs it
      [sys.executable, '-m', 'experiments.report', '--sweep=c1', f'--results_dir={results}',
       f'--out_dir={out}'], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == os.path.join(out, 'REPORT.md')
  err = proc.stderr
  warnings = [line for line in err.splitlines() if line.startswith('warning:')]
  assert len(warnings) == 2
  for p in (paths[tuned_run], paths[chosen.name]):  # once each, with the parse error
    assert sum(w.startswith(f'warning: skipping unreadable result file {p}: JSONDecodeError: ')
               for w in warnings) == 1
  with open(os.path.join(out, 'c1.json')) as f:
    agg = json.load(f)
  assert set(agg['unreadable']) == {paths[tuned_run], paths[chosen.name]}
  assert all(e.startswith('JSONDecodeError: ') for e in agg['unreadable'].values())
  skipped = {tuned_run, chosen.name, 'lora r16-lrtuned-s1', 'lora r16-lrtuned-s2'}
  assert set(agg['unreadable_runs']) == skipped
  assert agg['finished'] == 31 - 4 and agg['missing'] == []
  # The affected points keep their readable runs; lora r16 falls back to its readable rates.
  assert agg['points']['lora r8']['seeds'] == [0, 2]
  assert agg['points']['lora r16']['seeds'] == [0]
  text = open(os.path.join(out, 'REPORT.md')).read()
  assert '**Partial table:** 4 run(s) skipped' in text
  assert f'- `{paths[tuned_run]}`: JSONDecodeError: ' in text
  assert '(partial: 27 of 31 runs finished, 4 skipped for unreadable result files)' in text


def test_report_of_complete_results_is_not_partial(tmp_path, capsys):
  sweep = sweeps_lib.get_sweep('c1')
  results = str(tmp_path / 'results')
  _write_results(sweep, results)
  agg = report_lib.aggregate(sweep, results)
  assert agg['unreadable'] == {} and agg['unreadable_runs'] == [] and agg['finished'] == 31
  assert report_lib.partial_note(agg) == ''
  assert 'warning' not in capsys.readouterr().err
