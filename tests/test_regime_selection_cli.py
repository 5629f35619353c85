"""The regime selection command (experiments/regime_selection.py) on synthetic result files: the
pre-registered rule applied in cost order, each check printed with its numbers, the decision
written to regime_selection.json."""
import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

from experiments import regime_rule
from experiments import regime_selection as sel_lib
from experiments import runner
from experiments import sweeps as sweeps_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIELD = {point: field for field, point in sweeps_lib.REGIME_POINTS.items()}


def _write_candidate(results: str, name: str, *, cost: float, floor=1.0, ceiling=40.0, r4=20.0,
                     r8=22.0, r32=20.5, sd=0.8, only=None):
  """Result files for regime_<name>'s runs (`only`: that many of them, in sweep order): every
  LoRA r4 run costs `cost` CPU seconds; each point's test scores have the given mean over the
  seeds at the chosen rate (the lowest: validation is flat), with per-seed noise of sd."""
  sweep = sweeps_lib.get_sweep(f'regime_{name}')
  means = dict(floor=floor, ceiling=ceiling, lora_r4=r4, lora_r8=r8, lora_r32=r32)
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  noise = {}
  for field in means:
    n = len({r.seed for r in sweep.runs if r.point == sweeps_lib.REGIME_POINTS[field]})
    x = rng.normal(0, sd, n) if n > 1 else np.zeros(1)
    noise[field] = x - x.mean()
  for run in sweep.runs[:only]:
    run = runner.resolve(run, sweep, results)
    field = _FIELD[run.point]
    test = means[field] + noise[field][run.seed]
    summary = lambda v: {'summary': {'sequence_accuracy': v, 'token_accuracy': v}, 'tasks': {}}  # noqa: E731
    res = dict(run=run.as_dict(), metrics={'validation': summary(10.0), 'test': summary(test)},
               params={'total': 10, 'trainable': 1, 'frozen': 9}, gin_config='',
               wall_time_s={'total': cost, 'train': cost, 'eval': 0.0},
               cpu_time_s={'total': cost if field == 'lora_r4' else 1.0, 'train': 0.0,
                           'eval': 0.0})
    runner._write_json(runner.result_path(results, run), res)


def _cli(results, *args):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run([sys.executable, '-m', 'experiments.regime_selection',
                         f'--results_dir={results}', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_the_cheapest_passing_candidate_wins(tmp_path):
  results = str(tmp_path)
  _write_candidate(results, 'near_base', cost=50.0, floor=9.0)            # cheapest: floor fails
  _write_candidate(results, 'data_limited', cost=100.0, r32=28.0)         # rank helps: c1 fails
  _write_candidate(results, 'converged', cost=400.0)                      # passes
  sel = sel_lib.selection(results)
  out = sel_lib.format_selection(sel)
  assert out.index('- near_base') < out.index('- data_limited') < out.index('- converged')
  assert 'winner: converged' in out
  assert 'floor: 9.00 vs < 5: FAIL' in out and 'headroom: ceiling 40.00 - r4 20.00 = 20.00' in out
  assert 'seeds: r4 6, r32 6 vs >= 6: pass' in out
  assert sel['decision'] == 'winner' and sel['winner'] == 'converged'
  assert [c['name'] for c in sel['candidates']] == ['near_base', 'data_limited', 'converged']
  assert [c['cost_cpu_s'] for c in sel['candidates']] == [50.0, 100.0, 400.0]
  limited = sel['candidates'][1]
  assert limited['status'] == 'fails' and not limited['checks']['c1_equivalence']['passed']
  assert limited['checks']['c1_equivalence']['numbers'].startswith('r32 - r4 = +8.00')
  assert limited['scores']['lora_r32'] == pytest.approx(
      28.0 + np.asarray(limited['scores']['lora_r32']) - 28.0)
  # The numbers are the rule's own on the same per-seed scores.
  v = regime_rule.judge(regime_rule.RegimeScores(name='x', cost=1.0, **limited['scores']))
  assert limited['equivalence']['interval'] == pytest.approx(list(v.equivalence.interval))
  assert sel['rule']['equivalence_margin'] == regime_rule.EQUIVALENCE_MARGIN


def test_the_report_tables_each_candidates_checks_in_cost_order(tmp_path):
  from experiments import claims_table
  results = str(tmp_path)
  _write_candidate(results, 'near_base', cost=50.0, r32=28.0)             # rank helps: c1 fails
  _write_candidate(results, 'data_limited', cost=100.0, only=5)           # unfinished
  sel = sel_lib.selection(results)
  table = claims_table.selection_table(sel)
  rows = [line.split(' | ') for line in table.splitlines() if line.startswith('| ')][1:]
  # Measured candidates in cost order, then the one without a measured cost.
  assert [r[0] for r in rows] == ['| near_base', '| data_limited', '| converged']
  near, limited, converged = rows
  checks = sel['candidates'][0]['checks']
  assert near[1:3] == ['50 (n=9)', '30/30']
  assert near[3:7] == [checks[c]['numbers'] for c in sel_lib.CHECKS]
  assert near[3].endswith(': FAIL') and near[5] == '1.00 vs < 5: pass'
  assert near[7] == 'fails |'
  assert limited[1:] == ['100 (n=4)', '5/30', '-', '-', '-', '-', 'unfinished |']
  assert converged[1:3] == ['-', '0/30'] and converged[7] == 'not yet run |'
  # The heads carry the rule's constants as the selection recorded them.
  assert ('| c1 holds: r32 - r4 within +-2 (TOST, 95%) | headroom: ceiling - r4 >= 5 | floor < 5 | '
          'seeds: r4, r32 >= 6 | status |') in table
  assert table.startswith('**The regime selection**') and f'written at {sel["git_revision"][:7]}' in table
  # In the report's first section, above the claims' table.
  section = claims_table.regimes_section({}, {}, results, sel)
  assert section.index('**The regime selection**') < section.index('| claim |')
  assert '**The regime selection**' not in claims_table.regimes_section({}, {}, results, None)


@pytest.mark.slow
def test_the_command_prints_and_writes_the_selection(tmp_path):
  results = str(tmp_path)
  _write_candidate(results, 'near_base', cost=50.0, floor=9.0)
  _write_candidate(results, 'data_limited', cost=100.0)
  proc = _cli(results)
  assert proc.returncode == 0, proc.stderr
  with open(os.path.join(results, 'regime_selection.json')) as f:
    sel = json.load(f)
  assert proc.stdout.strip() == (sel_lib.format_selection(sel) + '\nwritten: '
                                 + os.path.join(results, 'regime_selection.json'))
  assert 'converged (regime_converged; cost not measured; 0/30 runs finished): not yet run' in (
      proc.stdout)
  assert sel['decision'] == 'undecided' and sel['passing_so_far'] == 'data_limited'
  proc = _cli(results, f'--out={tmp_path / "sel.json"}')
  assert proc.returncode == 0 and os.path.exists(tmp_path / 'sel.json')
  # A missing results directory is a one-line user error.
  proc = _cli(str(tmp_path / 'nope'))
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
      f'error: --results_dir={tmp_path / "nope"}: no such directory')


def test_none_passes_labels_the_closest_failing(tmp_path):
  results = str(tmp_path)
  _write_candidate(results, 'near_base', cost=50.0, floor=9.0, r32=30.0)   # two checks fail
  _write_candidate(results, 'data_limited', cost=100.0, ceiling=21.0)      # one fails
  _write_candidate(results, 'converged', cost=400.0, r32=30.0)             # one fails, dearer
  sel = sel_lib.selection(results)
  assert sel['decision'] == 'none_passes' and sel['closest'] == 'data_limited'
  assert sel['failed_checks'] == ['headroom']
  assert 'none passes; closest: data_limited (failing the pre-registered rule)' in (
      sel_lib.format_selection(sel))


def test_unrun_and_unfinished_candidates_leave_it_undecided(tmp_path):
  results = str(tmp_path)
  # Nothing run: every candidate says so, and the next step measures a cost.
  sel = sel_lib.selection(results)
  assert sel['decision'] == 'undecided'
  assert {c['status'] for c in sel['candidates']} == {'not yet run'}
  assert sel['next'].startswith('python -m experiments.runner --sweep=regime_data_limited ')
  assert "'--run=lora r4-lr0.001-s0'" in sel['next']
  # One r4 run of each measures the order; a passing dearer one cannot win past an unfinished
  # cheaper one.
  _write_candidate(results, 'near_base', cost=50.0, only=2)     # the floor and one r4 run
  _write_candidate(results, 'data_limited', cost=100.0, only=2)
  _write_candidate(results, 'converged', cost=400.0)
  sel = sel_lib.selection(results)
  assert sel['decision'] == 'undecided' and sel['next'] == (
      'python -m experiments.runner --sweep=regime_near_base')
  assert [c['status'] for c in sel['candidates']] == [
      'unfinished', 'unfinished', 'finished, not judged (a cheaper candidate decides first)']
  assert sel['candidates'][0]['finished_runs'] == 2
  # A candidate without any r4 run: its cost is unknown, so no winner yet even if one passes.
  other = str(tmp_path / 'other')
  _write_candidate(other, 'converged', cost=400.0)
  _write_candidate(other, 'near_base', cost=50.0, only=1)       # the floor only
  sel = sel_lib.selection(other)
  assert sel['decision'] == 'undecided' and sel['passing_so_far'] == 'converged'
  assert 'not measured' in sel['why']
  statuses = {c['name']: c['status'] for c in sel['candidates']}
  assert statuses == {'converged': 'passes', 'near_base': 'cost not measured',
                      'data_limited': 'not yet run'}
