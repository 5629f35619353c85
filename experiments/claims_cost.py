r"""What the claims c1-c7 cost in a regime candidate: CPU hours, estimated before they run.

  python -m experiments.claims_cost                          # every candidate, experiments/results
  python -m experiments.claims_cost --candidate=near_base --lora_r4_cpu_s=480

The estimate counts the runs of the candidate's claim sweeps (`sweeps.claim_sweeps`, 'c1@<name>'
.. 'c7@<name>') that are not runs of its selection sweep (`regime_<name>`, trained before a regime
is chosen), each distinct run once (a run in several sweeps, or a seed whose rate is chosen by the
same tuning runs, is one run), and prices each as

  CPU s = calibration x factor(method) x cpu_per_wall x (steps x train_s_per_step
                                                         + examples scored x eval_s_per_example)

- train_s_per_step, eval_s_per_example: the wall seconds of c3's LoRA r4 runs as first run (their
  `wall_time_s.train` over 600 steps, `wall_time_s.eval` over the 3,000 examples they scored:
  50 per task and split), medians over the committed result files;
- examples scored: per task, validation at every checkpoint the scoring keeps
  (`checkpoint_selection.scored_steps`) and test once (every test example where the sweep says
  None); the floor scores each split once and does not train;
- factor(method): the median `wall_time_s.total` of c3's runs of the method over LoRA r4's
  (`measured_rates`; LoRA of another rank: c3's LoRA r32; every SiRA ablation and SMoE-Dropout:
  SiRA's; AdaMix: c3's first AdaMix runs, `first_adamix_runs`). Every one of these ran on
  2026-11-29, on one machine, between 11:00 and 12:31 UTC;
- cpu_per_wall: the median `cpu_time_s.total` / `wall_time_s.total` of the committed result
  files that record both (the runner records CPU time since the sira_defaults runs; c3's files
  have wall time only). On this 2-core machine a run keeps both cores busy, so wall hours of the
  machine = CPU hours / cpu_per_wall;
- calibration: the candidate's measured LoRA r4 cost (`regime_selection`'s: the median
  `cpu_time_s.total` of its finished LoRA r4 runs) over the cost this model predicts for that run;
  1 until one is measured (or `--lora_r4_cpu_s` gives it).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np

from experiments import checkpoint_selection
from experiments import runner
from experiments import sweeps as sweeps_lib

# The macros of gin/benchmark/finetune.gin a run's bindings may override.
FINETUNE_DEFAULTS = {'TRAIN_STEPS': '600', 'MIXTURE_OR_TASK_NAME': "'offline_bench'"}
# c3 as first run: what the factors and the per-step and per-example costs are measured on.
REFERENCE_SWEEP = 'c3'
REFERENCE_STEPS = 600
# cost class -> c3's point it is measured on (`cost_class`).
REFERENCE_POINTS = {'floor': 'floor (frozen base)', 'lora r4': f'lora r{sweeps_lib.RANK}',
                    'lora': f'lora r{sweeps_lib.RANK * sweeps_lib.SIRA_E} '
                            f'(params of E={sweeps_lib.SIRA_E})',
                    'sira': sweeps_lib.SIRA, 'molora': f'molora E{sweeps_lib.SIRA_E}',
                    'adamix': f'adamix E{sweeps_lib.SIRA_E}',
                    'full_ft': 'ceiling (full fine-tuning)'}
COST_CLASSES = tuple(REFERENCE_POINTS)


def cost_class(run: sweeps_lib.Run) -> str:
  """The measured method a run is priced as (`COST_CLASSES`)."""
  method = run.axes.get('method')
  if run.kind == 'floor':
    return 'floor'
  if method == 'lora':
    return 'lora r4' if run.axes.get('rank', sweeps_lib.RANK) == sweeps_lib.RANK else 'lora'
  if method in ('sira', 'smoe_dropout'):
    return 'sira'
  if method in COST_CLASSES:
    return method
  raise ValueError(f'run {run.name!r}: no cost class for method {method!r}')


@dataclasses.dataclass(frozen=True)
class Rates:
  """What the estimate is built from (module docstring), all measured from result files."""
  factors: Mapping[str, float]
  train_s_per_step: float
  eval_s_per_example: float
  cpu_per_wall: float
  measured_on: Mapping[str, int]   # result files per cost class; 'cpu_per_wall': files


def _finished(sweep: sweeps_lib.Sweep, results_dir: str) -> list[tuple[sweeps_lib.Run, dict]]:
  out = []
  for run in sweep.runs:
    run, res = runner.resolved_result(results_dir, run, sweep)
    if res is not None:
      out.append((run, res))
  return out


def reference_results(results_dir: str) -> dict[str, list[tuple[sweeps_lib.Run, dict]]]:
  """The finished runs the rates are measured on, per cost class: REFERENCE_SWEEP's points of
  REFERENCE_POINTS, AdaMix's first runs (`first_adamix_runs`) in place of the sweep's own."""
  by_point: dict[str, list] = {}
  found = [(r, res) for r, res in _finished(sweeps_lib.get_sweep(REFERENCE_SWEEP), results_dir)
           if r.point != REFERENCE_POINTS['adamix']]
  for run, res in found + _finished(first_adamix_runs(), results_dir):
    by_point.setdefault(run.point, []).append((run, res))
  missing = [p for p in REFERENCE_POINTS.values() if p not in by_point]
  if missing:
    raise ValueError(f'{results_dir}: no finished {REFERENCE_SWEEP} runs of {missing}: the cost '
                     'factors are measured on them')
  return {c: by_point[p] for c, p in REFERENCE_POINTS.items()}


def measured_rates(results_dir: str = runner.DEFAULT_RESULTS_DIR) -> Rates:
  """`Rates` from the result files of REFERENCE_SWEEP (`reference_results`) and, for
  cpu_per_wall, every result file in `results_dir` that records CPU time."""
  found = reference_results(results_dir)

  def wall(cost_class: str, part: str) -> float:
    return float(np.median([res['wall_time_s'][part] for _, res in found[cost_class]]))

  factors = {c: wall(c, 'total') / wall('lora r4', 'total') for c in COST_CLASSES}
  sweep = sweeps_lib.get_sweep(REFERENCE_SWEEP)
  r4_run = found['lora r4'][0][0]
  examples = sum(examples_scored(r4_run, sweep, splits=(s,)) for s in sweep.eval_splits)
  ratios = []
  for name in sorted(os.listdir(os.path.join(results_dir, 'runs'))):
    path = os.path.join(results_dir, 'runs', name, runner.RESULT)
    if os.path.exists(path):
      res = runner.read_result(path)
      if 'cpu_time_s' in res and res['wall_time_s']['total'] > 0:
        ratios.append(res['cpu_time_s']['total'] / res['wall_time_s']['total'])
  if not ratios:
    raise ValueError(f'{results_dir}: no result file records cpu_time_s (CPU per wall second)')
  return Rates(factors=factors, train_s_per_step=wall('lora r4', 'train') / REFERENCE_STEPS,
               eval_s_per_example=wall('lora r4', 'eval') / examples,
               cpu_per_wall=float(np.median(ratios)),
               measured_on=dict({c: len(v) for c, v in found.items()}, cpu_per_wall=len(ratios)))


def first_adamix_runs() -> sweeps_lib.Sweep:
  """c3's first AdaMix runs (independent draws per expert, outside the sweep today): AdaMix's
  factor is measured on them. They ran on 2026-11-29 with every other c3 run; the sweep's own
  AdaMix runs (IDENTICAL_EXPERT_INIT) ran on 2026-12-05 on a machine about 2x slower per step
  (experiments/results/BENCHMARKS.md), so their wall time measures the machine, not AdaMix."""
  return sweeps_lib.Sweep('c3 first adamix', 'AdaMix as first run in c3', tuple(
      sweeps_lib.method_runs('adamix', REFERENCE_POINTS['adamix'],
                             (f'NUM_EXPERTS={sweeps_lib.SIRA_E}',))))


def _macro(bindings: Sequence[str], name: str) -> str:
  """The value the last binding of macro `name` gives it (FINETUNE_DEFAULTS where none does)."""
  values = [b.split('=', 1)[1].strip() for b in bindings if b.split('=', 1)[0].strip() == name]
  return values[-1] if values else FINETUNE_DEFAULTS[name]


def _tasks(mixture: str) -> list:
  import seqio
  import tasks  # noqa: F401  (registers the offline suite)
  task = seqio.get_mixture_or_task(mixture.strip("'\""))
  return list(getattr(task, 'tasks', [task]))   # a mixture's tasks, or the task itself


def examples_scored(run: sweeps_lib.Run, sweep: sweeps_lib.Sweep,
                    splits: Sequence[str] | None = None) -> int:
  """Examples a run decodes and scores on `splits` (default: the sweep's eval_splits): per task,
  validation at each scored checkpoint (once for the floor and without checkpoint choice), test
  once."""
  steps = int(_macro(run.bindings, 'TRAIN_STEPS'))
  interval = sweep.checkpoint_interval(steps)
  times = {s: 1 for s in (sweep.eval_splits if splits is None else splits)}
  if interval is not None and run.kind == 'finetune' and sweep.select_split in times:
    times[sweep.select_split] = len(checkpoint_selection.scored_steps(steps, interval))
  total = 0
  for task in _tasks(_macro(run.bindings, 'MIXTURE_OR_TASK_NAME')):
    for split, n in times.items():
      have = task.num_input_examples(split)
      want = sweep.num_examples(split)
      total += n * (have if want is None else min(want, have))
  return total


def run_cpu_s(run: sweeps_lib.Run, sweep: sweeps_lib.Sweep, rates: Rates) -> float:
  """The modelled CPU seconds of one run (calibration 1)."""
  steps = int(_macro(run.bindings, 'TRAIN_STEPS')) if run.kind == 'finetune' else 0
  wall = steps * rates.train_s_per_step + examples_scored(run, sweep) * rates.eval_s_per_example
  factor = 1.0 if run.kind == 'floor' else rates.factors[cost_class(run)]
  return factor * wall * rates.cpu_per_wall


def identity(run: sweeps_lib.Run, sweep: sweeps_lib.Sweep) -> tuple:
  """What makes two runs one (one result file): their key once resolved; a run waiting for its
  rate is the same run as another with equal content whose rate the same tuning runs choose."""
  if run.resolved:
    return ('key', run.key)
  tuning = tuple(sorted(r.key for r in sweep.tuning_runs(run.lr_from)))
  content = dataclasses.replace(run, lr_from=None, learning_rate=0.0, point='', axes={})
  return ('tuned', content.key, tuning)


@dataclasses.dataclass(frozen=True)
class SweepCost:
  name: str
  runs: int
  new_runs: int        # distinct runs in neither the selection sweep nor an earlier claim's
  cpu_s: float         # of its new runs, calibrated


@dataclasses.dataclass(frozen=True)
class Estimate:
  candidate: str
  lora_r4_cpu_s: float            # the calibrated cost of one selection LoRA r4 run
  lora_r4_source: str             # 'measured, <n> runs', 'given' or 'modelled'
  sweeps: tuple[SweepCost, ...]
  distinct_new_runs: int
  cpu_s: float                    # every distinct new run once
  wall_s: float                   # cpu_s / cpu_per_wall


def estimate(candidate: str, rates: Rates, lora_r4_cpu_s: float | None = None,
             source: str = 'given', claims: Sequence[str] = tuple(sweeps_lib.CLAIMS)) -> Estimate:
  """The claims' cost in `candidate` (module docstring); lora_r4_cpu_s: its measured LoRA r4 cost
  (None: the model's own prediction, calibration 1)."""
  selection = sweeps_lib.get_sweep(f'regime_{candidate}')
  r4 = next(r for r in selection.runs if r.point == 'lora r4' and r.resolved)
  predicted_r4 = run_cpu_s(r4, selection, rates)
  calibration = 1.0 if lora_r4_cpu_s is None else lora_r4_cpu_s / predicted_r4
  done = {identity(r, selection) for r in selection.runs}
  out = []
  for claim in claims:
    sweep = sweeps_lib.get_sweep(f'{claim}@{candidate}')
    new = {}
    for r in sweep.runs:
      new.setdefault(identity(r, sweep), r)
    new = {i: r for i, r in new.items() if i not in done}
    done |= set(new)
    cost = calibration * sum(run_cpu_s(r, sweep, rates) for r in new.values())
    out.append(SweepCost(sweep.name, len(sweep.runs), len(new), cost))
  total = sum(s.cpu_s for s in out)
  return Estimate(candidate=candidate, lora_r4_cpu_s=calibration * predicted_r4,
                  lora_r4_source='modelled' if lora_r4_cpu_s is None else source,
                  sweeps=tuple(out), distinct_new_runs=sum(s.new_runs for s in out), cpu_s=total,
                  wall_s=total / rates.cpu_per_wall)


def format_estimate(e: Estimate) -> str:
  lines = [f'{e.candidate}: one LoRA r4 run {e.lora_r4_cpu_s:.0f} CPU s ({e.lora_r4_source})',
           '  sweep               runs  new  CPU h (new: in neither the selection nor an earlier '
           'claim)']
  lines += [f'  {s.name:<18} {s.runs:>5} {s.new_runs:>4}  {s.cpu_s / 3600:6.1f}' for s in e.sweeps]
  lines.append(f'  c1-c7: {e.distinct_new_runs} new runs, '
               f'{e.cpu_s / 3600:.1f} CPU h = {e.wall_s / 3600:.1f} h of this 2-core machine')
  return '\n'.join(lines)


def format_rates(rates: Rates) -> str:
  factors = ', '.join(f'{c} {f:.2f}' for c, f in rates.factors.items())
  return (f'measured on {REFERENCE_SWEEP} as first run ({dict(rates.measured_on)} result files): '
          f'train {rates.train_s_per_step:.3f} wall s/step, eval {rates.eval_s_per_example:.4f} '
          f'wall s/example, {rates.cpu_per_wall:.2f} CPU s per wall s; run cost / LoRA r4: '
          f'{factors}')


def main(argv):
  from absl import flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    runner.usage_error(f'unexpected argument {argv[1]!r} (flags are --name=value)')
  candidates = FLAGS.candidate or list(sweeps_lib.REGIME_CANDIDATES)
  unknown = [c for c in candidates if c not in sweeps_lib.REGIME_CANDIDATES]
  if unknown:
    runner.usage_error(f'--candidate={unknown[0]}: no such candidate; known: '
                       f'{", ".join(sweeps_lib.REGIME_CANDIDATES)}')
  from experiments import regime_selection
  try:
    rates = measured_rates(FLAGS.results_dir)
    print(format_rates(rates))
    for c in candidates:
      given, source = FLAGS.lora_r4_cpu_s, 'given'
      if given is None:
        measured = regime_selection.read_candidate(c, FLAGS.results_dir)
        if measured.cost is not None:
          given, source = measured.cost, f'measured, {measured.cost_runs} runs'
      print(format_estimate(estimate(c, rates, given, source)))
  except (ValueError, runner.UnreadableResultError) as e:
    runner.usage_error(str(e))
  return 0


def cli():
  from absl import app
  from absl import flags
  flags.DEFINE_multi_string('candidate', [], 'regime candidate(s) (default: every one)')
  flags.DEFINE_string('results_dir', runner.DEFAULT_RESULTS_DIR, 'the result files')
  flags.DEFINE_float('lora_r4_cpu_s', None, "one LoRA r4 run's CPU seconds in the candidate "
                     "(default: the selection's measured median, else the model's prediction)",
                     lower_bound=1.0)
  app.run(main, flags_parser=runner.parse_flags)


if __name__ == '__main__':
  from experiments import claims_cost as _module  # one copy, not a second as __main__
  _module.cli()
