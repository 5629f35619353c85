r"""Apply the pre-registered regime rule (experiments/regime_rule.py) to the selection's results.

  python -m experiments.regime_selection                     # reads experiments/results
  python -m experiments.regime_selection --results_dir=/path/to/results --out=/tmp/sel.json

For each candidate (`sweeps.REGIME_CANDIDATES`, sweep `regime_<name>`) it reads the result files:
its cost (the median CPU seconds, `cpu_time_s.total`, of its finished LoRA r4 runs: training and
every evaluation of one run) and, once every run of the sweep is finished, its test sequence
accuracy per seed (the points of `sweeps.REGIME_POINTS`, at the learning rate the runner chose,
as `experiments.report.aggregate` reads them). Candidates go in the order of their cost; the
first that passes `regime_rule.judge` wins (`regime_rule.decide` over the finished candidates
in cost order). It prints each candidate's checks with their numbers and pass/fail, then the
decision, and writes it to `<results_dir>/regime_selection.json` (or --out):
  - 'winner': the cheapest candidate that passes (every cheaper one finished and failed);
  - 'none_passes': every candidate finished and failed; `closest` names the one to run the
    mixtures in, labelled failing (`regime_rule.closest`);
  - 'undecided': a candidate's cost is not measured yet (no LoRA r4 run finished: it could be
    the cheapest), or the next candidate in cost order is unfinished; `next` says what to run.
Exit status 0 whatever the decision; 2 for a user error (one line on stderr).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from experiments import regime_rule
from experiments import runner
from experiments import sweeps as sweeps_lib

METRIC = 'sequence_accuracy'
COST_POINT = sweeps_lib.REGIME_POINTS['lora_r4']
OUT = 'regime_selection.json'
# The rule's checks (`regime_rule.Verdict.checks`), in the order they are printed.
CHECKS = ('c1_equivalence', 'headroom', 'floor', 'seeds')


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One candidate's state in the results: cost (None: no LoRA r4 run finished), the number of r4
  runs it is measured on, the runs still missing, and its scores once none is."""
  name: str
  sweep: str
  cost: float | None
  cost_runs: int
  missing: tuple[str, ...]
  total_runs: int
  scores: regime_rule.RegimeScores | None

  @property
  def finished(self) -> bool:
    return self.scores is not None


def cost_run_command(sweep: sweeps_lib.Sweep) -> str:
  """The runner command of the first LoRA r4 run of `sweep` (one run measures the cost)."""
  first = next(r for r in sweep.runs if r.point == COST_POINT and r.resolved)
  return runner.launch_command(first, sweep)


def read_candidate(name: str, results_dir: str) -> Candidate:
  """`name`'s cost and scores from the result files in `results_dir`."""
  from experiments import report
  sweep = sweeps_lib.get_sweep(f'regime_{name}')
  costs = []
  for run in sweep.runs:
    if run.point == COST_POINT:
      _, res = runner.resolved_result(results_dir, run, sweep)
      if res is not None:
        if 'cpu_time_s' not in res:
          raise ValueError(f'{runner.result_path(results_dir, run)} records no cpu_time_s (an '
                           'older runner wrote it): delete it and run it again')
        costs.append(float(res['cpu_time_s']['total']))
  agg = report.aggregate(sweep, results_dir)
  missing = (*agg['missing'], *agg['unreadable_runs'])
  scores = None
  if not missing:
    per_seed = {field: list(agg['points'][point]['per_seed'][METRIC])
                for field, point in sweeps_lib.REGIME_POINTS.items()}
    scores = regime_rule.RegimeScores(name=name, cost=float(np.median(costs)), **per_seed)
  return Candidate(name=name, sweep=sweep.name, cost=float(np.median(costs)) if costs else None,
                   cost_runs=len(costs), missing=tuple(missing), total_runs=len(sweep.runs),
                   scores=scores)


def decide(candidates: Sequence[Candidate]) -> tuple[dict[str, Any], list[regime_rule.Verdict]]:
  """(the decision, the verdicts of the candidates judged), by the rule: in cost order, the first
  that passes; judged are the finished candidates before the first unfinished one."""
  unmeasured = [c for c in candidates if c.cost is None]
  ordered = sorted((c for c in candidates if c.cost is not None), key=lambda c: c.cost)
  judged = []
  for c in ordered:
    if not c.finished:
      break
    judged.append(c)
  chosen, verdicts = regime_rule.decide([c.scores for c in judged])
  by_name = {c.name: c for c in candidates}
  if unmeasured:
    first = unmeasured[0]
    decision = dict(decision='undecided', next=cost_run_command(sweeps_lib.get_sweep(first.sweep)),
                    why=f'the cost of {", ".join(c.name for c in unmeasured)} is not measured '
                        'yet (no LoRA r4 run finished), so the order is unknown')
    if chosen is not None:
      decision['passing_so_far'] = chosen.name
  elif chosen is not None:
    decision = dict(decision='winner', winner=chosen.name, sweep=by_name[chosen.name].sweep)
  elif len(judged) == len(ordered):
    closest = regime_rule.closest(verdicts)
    decision = dict(decision='none_passes', closest=closest.name,
                    label=f'{closest.name} (failing the pre-registered rule)',
                    failed_checks=[k for k, ok in closest.checks.items() if not ok])
  else:
    nxt = ordered[len(judged)]
    decision = dict(decision='undecided',
                    next=f'python -m experiments.runner --sweep={nxt.sweep}',
                    why=f'{nxt.name} is next in cost order and has {len(nxt.missing)} of '
                        f'{nxt.total_runs} runs unfinished')
  return decision, verdicts


def check_lines(v: regime_rule.Verdict, s: regime_rule.RegimeScores) -> list[tuple[str, str]]:
  """(check, 'its numbers: pass|FAIL') for each of the rule's checks."""
  ok = lambda name: 'pass' if v.checks[name] else 'FAIL'  # noqa: E731
  eq = v.equivalence
  c1 = ('too few seeds for the test' if eq is None else
        f'r32 - r4 = {eq.diff:+.2f}, 90% Welch interval [{eq.interval[0]:+.2f}, '
        f'{eq.interval[1]:+.2f}] vs +-{regime_rule.EQUIVALENCE_MARGIN:g} (TOST p = '
        f'{eq.p_value:.3g})')
  return [
      ('c1_equivalence', f'{c1}: {ok("c1_equivalence")}'),
      ('headroom', f'ceiling {np.mean(s.ceiling):.2f} - r4 {np.mean(s.lora_r4):.2f} = '
                   f'{v.headroom:.2f} vs >= {regime_rule.MIN_HEADROOM:g}: {ok("headroom")}'),
      ('floor', f'{v.floor:.2f} vs < {regime_rule.MAX_FLOOR:g}: {ok("floor")}'),
      ('seeds', f'r4 {len(s.lora_r4)}, r32 {len(s.lora_r32)} vs >= {regime_rule.MIN_SEEDS}: '
                f'{ok("seeds")}'),
  ]


def selection(results_dir: str) -> dict[str, Any]:
  """The whole selection as JSON-able data (what `main` prints and writes)."""
  candidates = [read_candidate(name, results_dir) for name in sweeps_lib.REGIME_CANDIDATES]
  decision, verdicts = decide(candidates)
  by_verdict = {v.name: v for v in verdicts}
  out = []
  for c in sorted(candidates, key=lambda c: (c.cost is None, c.cost or 0.0)):
    entry: dict[str, Any] = dict(name=c.name, sweep=c.sweep, cost_cpu_s=c.cost,
                                 cost_runs=c.cost_runs, finished_runs=c.total_runs - len(c.missing),
                                 total_runs=c.total_runs)
    if c.cost_runs == 0 and c.missing:
      entry['status'] = 'not yet run' if len(c.missing) == c.total_runs else 'cost not measured'
    elif not c.finished:
      entry['status'] = 'unfinished'
    elif c.name in by_verdict:
      v = by_verdict[c.name]
      entry.update(status='passes' if v.passes else 'fails', reasons=list(v.reasons),
                   checks={k: dict(passed=v.checks[k], numbers=line)
                           for k, line in check_lines(v, c.scores)},
                   scores={f: list(map(float, getattr(c.scores, f)))
                           for f in sweeps_lib.REGIME_POINTS})
      if v.equivalence is not None:
        entry['equivalence'] = dataclasses.asdict(v.equivalence)
    else:
      entry['status'] = 'finished, not judged (a cheaper candidate decides first)'
    out.append(entry)
  rule = dict(equivalence_margin=regime_rule.EQUIVALENCE_MARGIN, alpha=regime_rule.ALPHA,
              min_headroom=regime_rule.MIN_HEADROOM, max_floor=regime_rule.MAX_FLOOR,
              min_seeds=regime_rule.MIN_SEEDS)
  return dict(rule=rule, metric=f'test {METRIC} (%)', cost='median CPU seconds of one LoRA r4 run',
              candidates=out, git_revision=runner.git_revision(), **decision)


def format_selection(sel: Mapping[str, Any]) -> str:
  lines = ['Regime selection (experiments/PREREGISTRATION.md), candidates in cost order:']
  for c in sel['candidates']:
    cost = ('cost not measured' if c['cost_cpu_s'] is None else
            f'{c["cost_cpu_s"]:.0f} CPU s per LoRA r4 run ({c["cost_runs"]} measured)')
    lines.append(f'- {c["name"]} ({c["sweep"]}; {cost}; {c["finished_runs"]}/{c["total_runs"]} '
                 f'runs finished): {c["status"]}')
    for name in CHECKS:
      if name in c.get('checks', {}):
        lines.append(f'    {name}: {c["checks"][name]["numbers"]}')
  d = sel['decision']
  if d == 'winner':
    lines.append(f'winner: {sel["winner"]} (the cheapest candidate that passes)')
  elif d == 'none_passes':
    lines.append(f'none passes; closest: {sel["label"]}, failing '
                 f'{", ".join(sel["failed_checks"])}')
  else:
    lines.append(f'undecided: {sel["why"]}; next: {sel["next"]}')
    if sel.get('passing_so_far'):
      lines.append(f'  ({sel["passing_so_far"]} passes so far)')
  return '\n'.join(lines)


def main(argv):
  from absl import flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    runner.usage_error(f'unexpected argument {argv[1]!r} (flags are --name=value)')
  if not os.path.isdir(FLAGS.results_dir):
    runner.usage_error(f'--results_dir={FLAGS.results_dir}: no such directory')
  try:
    sel = selection(FLAGS.results_dir)
  except (runner.UnreadableResultError, ValueError) as e:
    runner.usage_error(str(e))
  print(format_selection(sel))
  out = FLAGS.out or os.path.join(FLAGS.results_dir, OUT)
  runner._write_json(out, sel)
  print(f'written: {out}')
  return 0


def cli():
  from absl import app
  from absl import flags
  flags.DEFINE_string('results_dir', runner.DEFAULT_RESULTS_DIR,
                      "the runner's result files (runs/<key>/result.json)")
  flags.DEFINE_string('out', None, f'where the selection is written (default: <results_dir>/{OUT})')
  app.run(main, flags_parser=lambda argv: runner.parse_flags(argv))


if __name__ == '__main__':
  from experiments import regime_selection as _module  # one copy, not a second as __main__
  _module.cli()
