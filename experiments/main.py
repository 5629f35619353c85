r"""The offline default job: LoRA, a parameter-matched LoRA and SiRA on the bundled benchmark.

  python -m experiments.main                            # gin/main.gin; work dir ./runs/main
  python -m experiments.main --gin.SEEDS='(0, 1, 2)' --gin.FINETUNE_STEPS=1000

The short version of the sweeps in this package (README, "Sweeps and the report"): the methods of
`main_sweep.methods` (macros in gin/main.gin: SEEDS, FINETUNE_STEPS, LEARNING_RATE, EVAL_EXAMPLES,
WORK_DIR) are fine-tuned on the benchmark mixture `offline_bench` from the benchmark's frozen base
(the shipped copy in experiments/base/, else pretrained once and cached in WORK_DIR), one run per
seed, and evaluated on the same test examples (with `main_sweep.floor`, also the frozen base alone).
The table gives the mean and standard deviation over seeds; REPORT.md, plots/ and each run's
result.json are written under WORK_DIR. Re-running skips finished runs and resumes unfinished
ones; changed settings make new runs beside the old ones. Wall time: README, "The main job".
"""

from __future__ import annotations

if __name__ == '__main__':
  # Run the CLI from the importable module `experiments.main`, so gin registers its configurables
  # once (not a second time as `__main__.*`).
  from sira_jax import gin_utils as _gin_utils
  _gin_utils.exit_if_help(__doc__, ('main.gin',))
  _gin_utils.import_tensorflow_quietly()
  from experiments import main as _module
  _module.cli()

import os
import sys
import time
from typing import Mapping, Sequence

import gin
from absl import flags

# Imported before gin parses and locks the config: they register configurables (tasks, the
# trainer's, optimizers', ...) that the runs' gin files bind.
from experiments import report, runner, sweeps
from sira_jax import gin_utils
from sira_jax import train  # noqa: F401
from sira_jax.run_dir import ConfigError


@gin.configurable
def main_sweep(
    *,
    methods: Mapping[str, Sequence[str]] = gin.REQUIRED,
    seeds: Sequence[int] = gin.REQUIRED,
    learning_rate: float = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    finetune_gin: Sequence[str] = gin.REQUIRED,
    eval_split: str = gin.REQUIRED,
    eval_num_examples: int | None = gin.REQUIRED,
    floor: bool = gin.REQUIRED,
    routing_points: Sequence[str] = gin.REQUIRED,
    method_learning_rates: Mapping[str, float] | None = None,
    extra_bindings: Sequence[str] = (),
):
  """The main job as a sweep (experiments.sweeps.Sweep).

  methods: point name -> (adapter gin file, gin bindings...), e.g.
    {'lora r4': ('adapters/lora.gin', 'ADAPTER_RANK=4')}; every method gets the same steps,
    data and seeds, and `learning_rate` unless `method_learning_rates` names a rate for it (e.g.
    the rate a sweep's tuning chose for that method). floor: also evaluate the frozen base alone.
    extra_bindings: gin bindings appended to every run and to the base's pretraining, e.g. tiny
    sizes in tests.
  """
  rates = dict(method_learning_rates or {})
  unknown = sorted(set(rates) - set(methods))
  if unknown:
    raise ValueError(f'main_sweep.method_learning_rates names {unknown}, which are not methods; '
                     f'methods: {sorted(methods)}')
  runs = sweeps.floor_run() if floor else []
  for point, (gin_file, *bindings) in methods.items():
    method = os.path.splitext(os.path.basename(gin_file))[0]
    runs += sweeps.grid(point, (gin_file, *finetune_gin), (*bindings, f'TRAIN_STEPS={train_steps}'),
                        axes={'method': method}, seeds=seeds,
                        learning_rates=(rates.get(point, learning_rate),))
  sweep = sweeps.Sweep(
      'main', 'The main job: LoRA, a parameter-matched LoRA and SiRA on the benchmark.',
      tuple(runs),
      eval_splits=(eval_split,), select_split=eval_split, report_split=eval_split,
      eval_num_examples=eval_num_examples, routing_points=tuple(routing_points))
  return sweeps.with_overrides(sweep, extra_bindings)


@gin.configurable
def run_main(*, work_dir: str = gin.REQUIRED, progress_bar: bool = True) -> dict:
  """Runs the main sweep in `work_dir`, writes its report, prints the table; returns the
  aggregated results (experiments.report.aggregate) with 'report' (path) and 'wall_time' (s)."""
  t0 = time.time()
  work_dir = os.path.abspath(work_dir)
  sweep = main_sweep()
  results_dir = os.path.join(work_dir, 'results')
  out = runner.run_sweep(sweep, results_dir=results_dir, work_dir=work_dir,
                         progress_bar=progress_bar)
  path = report.write_report([sweep], results_dir=results_dir, out_dir=work_dir,
                             title='sira-jax main job')
  agg = report.aggregate(sweep, results_dir)
  print(report.points_table(agg, sweep))
  for a, b in report.claim_comparisons(sweep, agg):
    print('- ' + report.format_comparison(report.compare(agg, a, b, sweep.metric), sweep.metric))
  wall = time.time() - t0
  print(f'{len(out.done)} run(s) trained now, {len(out.skipped)} reused; wall time {wall:.0f}s. '
        f'Report with plots: {path}')
  return dict(agg, report=path, wall_time=wall)


def main(argv):
  del argv
  gin_utils.quiet_logs()
  flags_ = flags.FLAGS
  try:
    gin_utils.parse_and_register(flags_.gin_file or ['main.gin'], flags_.gin_bindings,
                                 flags_.gin_search_paths)
    run_main()
  except (ConfigError, gin_utils.GinConfigError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def cli():
  gin_utils.define_gin_flags()
  gin_utils.run(main)
