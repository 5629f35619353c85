r"""Run a sweep locally, in sequence, resumably; or print its launch commands.

  python -m experiments.runner --sweep=c1                      # run (skips finished runs)
  python -m experiments.runner --sweep=c1 --print_commands     # one launch command per run
  python -m experiments.runner --sweep=c1 --run='lora r8-lr0.01-s1'  # one run of the sweep
  python -m experiments.runner --list                          # sweeps and their run counts

Every run writes `<results_dir>/runs/<run key>/result.json` (config, seed, git revision, hardware,
wall times, parameter counts, metrics per split and task, routing analysis) once it is complete;
a run whose result file exists is skipped, an interrupted run resumes from its last checkpoint in
`<work_dir>/runs/<run key>/`. The frozen base is pretrained once per base config into
`<work_dir>/base_<config hash>/` (or taken from the shipped copy in experiments/base/ when its
recorded config hash matches) and reused by every run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from experiments import sweeps as sweeps_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RESULTS_DIR = os.path.join(REPO, 'experiments', 'results')
DEFAULT_WORK_DIR = os.path.join(REPO, 'runs', 'experiments')
SHIPPED_BASE_DIR = os.path.join(REPO, 'experiments', 'base')
RESULT = 'result.json'


class RunInterrupted(RuntimeError):
  """Training stopped before its last step (SIGTERM); re-running resumes it."""


# ------------------------------------------------------------------------------------------------
# Provenance
# ------------------------------------------------------------------------------------------------
def git_revision() -> str:
  try:
    rev = subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = subprocess.run(['git', '-C', REPO, 'status', '--porcelain', '--untracked-files=no'],
                           capture_output=True, text=True, check=True).stdout.strip()
    return rev + ('+dirty' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def hardware() -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  load = os.getloadavg() if hasattr(os, 'getloadavg') else None
  return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
              cpu_count=os.cpu_count(), jax_backend=jax.default_backend(),
              devices=[str(d) for d in jax.devices()], load_average=load,
              python=sys.version.split()[0], jax_version=jax.__version__)


def _write_json(path: str, obj) -> None:
  """Atomic write (a half-written result file never looks finished)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=json_default)
  os.replace(tmp, path)


def json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


# ------------------------------------------------------------------------------------------------
# Gin
# ------------------------------------------------------------------------------------------------
def parse_gin(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  """Clears gin and parses `gin_files` then `bindings` (the project's search paths)."""
  import gin  # pylint: disable=import-outside-toplevel
  from sira_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  from sira_jax import train as _  # noqa: F401  pylint: disable=import-outside-toplevel
  gin.clear_config()
  data_lib.import_task_modules()
  gin_utils.parse_gin(list(gin_files), list(bindings), ('.', gin_utils.PROJECT_GIN_DIR))
  data_lib.register_after_gin()


BASE_TRAIN_ARGS = ('mixture_or_task_name', 'task_feature_lengths', 'train_steps', 'batch_size',
                   'optimizer_name', 'learning_rate', 'schedule', 'warmup_steps', 'weight_decay',
                   'clip_grad_norm', 'seed', 'data_seed', 'pack', 'pretrain',
                   'initial_checkpoint_path')


def _train_arg(name: str):
  """The value gin gives `train.<name>` (macros resolved; the signature default when unbound)."""
  import inspect  # pylint: disable=import-outside-toplevel
  import gin  # pylint: disable=import-outside-toplevel
  from sira_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  try:
    v = gin.query_parameter(f'train.{name}')
  except ValueError:
    return inspect.signature(train_lib.train).parameters[name].default
  return v.scoped_configurable_fn() if isinstance(v, gin.config.ConfigurableReference) else v


def base_config_hash(sweep: sweeps_lib.Sweep) -> tuple[str, dict]:
  """(hash, settings) of what determines the base: its architecture (`T5Config.architecture`), loss
  and pretraining arguments (not checkpointing/logging settings, nor MODEL_DIR), as the base gin
  files set them."""
  import gin  # pylint: disable=import-outside-toplevel
  from sira_jax.losses import LossConfig  # pylint: disable=import-outside-toplevel
  from sira_jax.t5.config import T5Config  # pylint: disable=import-outside-toplevel
  parse_gin(sweep.base_gin, (*sweep.base_bindings, "MODEL_DIR='-'"))
  loss = LossConfig()
  key = dict(model=T5Config().architecture(),
             loss=dict(z_loss=loss.z_loss, label_smoothing=loss.label_smoothing),
             train={k: _train_arg(k) for k in BASE_TRAIN_ARGS})
  gin.clear_config()
  key = json.loads(json.dumps(key, default=str))
  return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10], key


def _train(progress_bar: bool):
  """`sira_jax.train.train` under the parsed gin config, as `train_from_gin` calls it."""
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  from sira_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  from sira_jax.t5.config import T5Config  # pylint: disable=import-outside-toplevel
  return train_lib.train(progress_bar=progress_bar,
                         configured_fields=gin_utils.bound_parameters(T5Config))


# ------------------------------------------------------------------------------------------------
# The frozen base
# ------------------------------------------------------------------------------------------------
def shipped_base(config_hash: str, settings: Mapping[str, Any] | None = None,
                 shipped_dir: str = SHIPPED_BASE_DIR,
                 log: Callable[[str], None] = print) -> str | None:
  """A base shipped in the repository whose provenance records `config_hash`, else None (and,
  given `settings`, a log line naming what differs from each shipped base)."""
  if not os.path.isdir(shipped_dir):
    return None
  for name in sorted(os.listdir(shipped_dir)):
    prov_path = os.path.join(shipped_dir, name, 'provenance.json')
    if not os.path.isfile(prov_path):
      continue
    with open(prov_path) as f:
      prov = json.load(f)
    if prov.get('config_hash') == config_hash:
      return os.path.join(shipped_dir, name)
    if settings is not None and prov.get('settings'):
      from sira_jax.run_dir import dict_diff  # pylint: disable=import-outside-toplevel
      diff = dict_diff(prov['settings'], settings)
      log(f'base: the shipped base {name} does not match this config (shipped -> now: '
          f'{diff[:300]}); pretraining instead')
  return None


def ensure_base(sweep: sweeps_lib.Sweep, work_dir: str, *, use_shipped: bool = True,
                log: Callable[[str], None] = print) -> tuple[str, dict]:
  """Pretrains the sweep's base once (or finds it); returns (base checkpoint dir, provenance)."""
  from sira_jax import base_checkpoint  # pylint: disable=import-outside-toplevel
  from sira_jax import run_dir as run_dir_lib  # pylint: disable=import-outside-toplevel
  key, settings = base_config_hash(sweep)
  if use_shipped:
    found = shipped_base(key, settings, log=log)
    if found:
      with open(os.path.join(found, 'provenance.json')) as f:
        prov = json.load(f)
      log(f'base: the shipped pretrained base {os.path.relpath(found, REPO)} (config {key})')
      return found, prov
  run_dir = os.path.join(os.path.abspath(work_dir), f'base_{key}')
  prov_path = os.path.join(run_dir, 'provenance.json')
  base_dir = base_checkpoint.resolve_base_dir(run_dir)
  if base_dir is not None and os.path.exists(prov_path):
    log(f'base: reusing the cached pretrained base {run_dir}')
    with open(prov_path) as f:
      return base_dir, json.load(f)
  parse_gin(sweep.base_gin, (*sweep.base_bindings, f"MODEL_DIR='{run_dir}'"))
  log(f'base: pretraining {sweep.base_gin} -> {run_dir}')
  r = _train(progress_bar=True)
  if r.stopped_by != 'done':
    raise RunInterrupted(f'base pretraining stopped at step {r.step}; re-run to resume')
  fingerprint = run_dir_lib.read_run_config(run_dir)
  prov = dict(config_hash=key, settings=settings, gin_files=list(sweep.base_gin),
              bindings=list(sweep.base_bindings),
              steps=r.step, final_metrics=r.last_metrics, wall_time_s=r.wall_time,
              git_revision=git_revision(), hardware=hardware(), fingerprint=fingerprint,
              created=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
              command='python -m experiments.runner --sweep=' + sweep.name + ' --build_base')
  _write_json(prov_path, prov)
  return r.base_dir, prov


def ship_base(base_dir: str, prov: Mapping[str, Any], name: str,
              shipped_dir: str = SHIPPED_BASE_DIR) -> str:
  """Copies a base checkpoint and its provenance into the repository (experiments/base/<name>)."""
  dest = os.path.join(shipped_dir, name)
  if os.path.exists(dest):
    raise FileExistsError(f'{dest} exists; remove it first to replace the shipped base')
  shutil.copytree(base_dir, dest)
  _write_json(os.path.join(dest, 'provenance.json'), dict(prov))
  return dest


# ------------------------------------------------------------------------------------------------
# One run
# ------------------------------------------------------------------------------------------------
def run_bindings(run: sweeps_lib.Run, model_dir: str, base_dir: str) -> list[str]:
  """The run's gin bindings plus what the runner sets (model dir, seed, learning rate, base)."""
  extra = [f"MODEL_DIR='{model_dir}'", f'SEED={run.seed}',
           f"INITIAL_CHECKPOINT_PATH='{base_dir}'"]
  if run.learning_rate is not None:
    extra.append(f'LEARNING_RATE={run.learning_rate!r}')
  return [*run.bindings, *extra]


def launch_command(run: sweeps_lib.Run, sweep: sweeps_lib.Sweep) -> str:
  """A shell command running this one run (and writing its result file) from the repo root."""
  return (f'python -m experiments.runner --sweep={sweep.name} '
          f"--run='{run.name}'")


def trainer_command(run: sweeps_lib.Run, model_dir: str, base_dir: str) -> str:
  """The project trainer's own command for this run (training only; no result file)."""
  files = ' '.join(f'--gin_file={f}' for f in run.gin_files)
  binds = ' '.join(f'--gin.{b}' if '=' in b else b for b in run_bindings(run, model_dir, base_dir))
  return f'python -m sira_jax.train {files} {binds}'


def result_path(results_dir: str, run: sweeps_lib.Run) -> str:
  return os.path.join(results_dir, 'runs', run.key, RESULT)


def load_result(results_dir: str, run: sweeps_lib.Run) -> dict | None:
  """The run's result dict, or None while it is unfinished (or its learning rate unresolved)."""
  if not run.resolved:
    return None
  path = result_path(results_dir, run)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def full_finetuning(gin_config: str) -> bool:
  """Whether a run's gin config trains every parameter (`train.pretrain = True`)."""
  return 'train.pretrain = True' in gin_config


def trained_counts(counts: dict, gin_config: str) -> dict:
  """Parameter counts as trained: a run that trains every parameter (full fine-tuning) has no
  frozen part, whatever its adapter config says."""
  if full_finetuning(gin_config):
    return dict(counts, trainable=counts['total'], frozen=0)
  return counts


def resolve(run: sweeps_lib.Run, sweep: sweeps_lib.Sweep, results_dir: str
            ) -> sweeps_lib.Run | None:
  """`run` with its learning rate chosen by the tuning runs of `run.lr_from` (validation metric
  of the tuning seeds, `sweeps.chosen_learning_rate`); None while one of them is unfinished."""
  if run.resolved:
    return run
  by_lr: dict[float, list] = {}
  for t in sweep.tuning_runs(run.lr_from):
    res = load_result(results_dir, t)
    if res is None:
      return None
    by_lr.setdefault(t.learning_rate, []).append((t, res))
  return run.with_learning_rate(sweeps_lib.chosen_learning_rate(sweep, run.lr_from, by_lr)[0])


def resolved_result(results_dir: str, run: sweeps_lib.Run, sweep: sweeps_lib.Sweep
                    ) -> tuple[sweeps_lib.Run, dict | None]:
  """(the run with its rate resolved where possible, its result or None)."""
  r = resolve(run, sweep, results_dir)
  return (run, None) if r is None else (r, load_result(results_dir, r))


def execute(run: sweeps_lib.Run, sweep: sweeps_lib.Sweep, *, base_dir: str, base_prov: Mapping,
            work_dir: str, results_dir: str, progress_bar: bool = False,
            log: Callable[[str], None] = print) -> dict:
  """Trains (kind 'finetune') or just loads (kind 'floor') one run, evaluates it, writes its
  result file; returns the result dict."""
  from experiments import evaluation  # pylint: disable=import-outside-toplevel
  from sira_jax import restore  # pylint: disable=import-outside-toplevel
  from sira_jax import run_dir  # pylint: disable=import-outside-toplevel
  from sira_jax.adapters import ROUTED_KINDS  # pylint: disable=import-outside-toplevel
  from sira_jax.t5 import param_count  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  model_dir = os.path.join(os.path.abspath(work_dir), 'runs', run.key)
  parse_gin(run.gin_files, run_bindings(run, model_dir, base_dir))
  import gin  # pylint: disable=import-outside-toplevel
  config_str = gin.config_str()
  train_info: dict = {}
  if run.kind == 'floor':
    model, variables, cfg = evaluation.load_base(base_dir)
    mixture = _train_arg('mixture_or_task_name')
    lengths = dict(_train_arg('task_feature_lengths'))
  else:
    r = _train(progress_bar=progress_bar)
    if r.stopped_by != 'done':
      raise RunInterrupted(f'{run.name} stopped at step {r.step}; re-run the sweep to resume it')
    train_info = dict(steps=r.step, wall_time_s=r.wall_time, final_metrics=r.last_metrics,
                      history=r.history, median_step_time_s=r.median_step_time)
    model, variables, cfg, _ = restore.load_trained(model_dir)
    fingerprint = run_dir.read_run_config(model_dir)
    mixture, lengths = fingerprint['mixture_or_task_name'], fingerprint['task_feature_lengths']
  gin.clear_config()
  t_eval = time.time()
  metrics = {}
  for split in sweep.eval_splits:
    metrics[split] = evaluation.evaluate_split(
        model, variables, mixture, lengths, split, num_examples=sweep.eval_num_examples,
        batch_size=sweep.eval_batch_size, output_dir=os.path.join(model_dir, 'eval'))
  routing = None
  if cfg.adapter.kind in ROUTED_KINDS and run.point in sweep.routing_points:
    # Training-mode statistics on the run's own training batches, eval-mode ones on the
    # evaluation batches (experiments.evaluation's module docstring).
    routing = evaluation.routing_analysis(
        model, variables, mixture, lengths, split=sweep.select_split,
        num_examples=sweep.eval_num_examples, batch_size=sweep.eval_batch_size,
        training=evaluation.TrainingStream.of_run(fingerprint))
  counts = trained_counts(param_count.count_parameters(cfg).as_dict(), config_str)
  result = dict(
      run=run.as_dict(), sweep=sweep.name, mixture=mixture, task_feature_lengths=lengths,
      gin_config=config_str, base=dict(dir=os.path.relpath(base_dir, REPO) if base_dir.startswith(
          REPO) else base_dir, config_hash=base_prov.get('config_hash'),
          steps=base_prov.get('steps')),
      git_revision=git_revision(), hardware=hardware(), params=counts, train=train_info,
      metrics=metrics, routing=routing,
      wall_time_s=dict(total=time.time() - t0, eval=time.time() - t_eval,
                       train=train_info.get('wall_time_s', 0.0)),
      finished=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
  _write_json(result_path(results_dir, run), result)
  s = metrics[sweep.report_split]['summary']
  log(f'{run.name}: {sweep.report_split} sequence accuracy {s["sequence_accuracy"]:.2f}, '
      f'token accuracy {s["token_accuracy"]:.2f} ({time.time() - t0:.0f}s)')
  return result


# ------------------------------------------------------------------------------------------------
# A sweep
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SweepOutcome:
  done: list
  skipped: list
  failed: list
  results_dir: str
  pending: list = dataclasses.field(default_factory=list)


def run_sweep(sweep: sweeps_lib.Sweep, *, results_dir: str = DEFAULT_RESULTS_DIR,
              work_dir: str = DEFAULT_WORK_DIR, only: Sequence[str] | None = None,
              use_shipped_base: bool = True, progress_bar: bool = True,
              keep_going: bool = False, limit: int | None = None,
              log: Callable[[str], None] | None = None) -> SweepOutcome:
  """Runs every unfinished run of `sweep` in order (or those named in `only`).

  Finished runs (result file present) are skipped; an interrupted run resumes from its checkpoint.
  A run whose learning rate comes from a point's tuning runs (`Run.lr_from`) gets it when they
  are finished (they come first in every sweep); with `only` or `limit` it may have to wait for a
  later call. keep_going: a failing run is logged and the next one starts (else the error
  propagates). limit: run at most this many unfinished runs now (a sweep in slices).
  """
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  runs = list(sweep.runs)
  if only:
    # A tuned run answers to its sweep name ('...-lrtuned-s1') and, once resolved, to its rate's.
    # (A Run holds dicts, so it is not hashable: names go by position.)
    names = [{r.name, resolved_result(results_dir, r, sweep)[0].name} for r in runs]
    unknown = sorted(set(only) - set().union(*names))
    if unknown:
      raise ValueError(f'sweep {sweep.name!r} has no run named {unknown}; '
                       f'`--list_runs` shows its {len(runs)} runs')
    runs = [r for r, n in zip(runs, names) if n & set(only)]
  todo = [r for r in runs if resolved_result(results_dir, r, sweep)[1] is None]
  if limit is not None:
    todo = todo[:limit]
  bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f'sweep {sweep.name}',
             unit='run', disable=not progress_bar, dynamic_ncols=True)
  log = log or (lambda m: bar.write(f'[{time.strftime("%H:%M:%S")}] {m}'))
  outcome = SweepOutcome(done=[], skipped=[r.name for r in runs if r not in todo], failed=[],
                         results_dir=results_dir)
  if not todo:
    bar.close()
    return outcome
  base_dir, prov = ensure_base(sweep, work_dir, use_shipped=use_shipped_base, log=log)
  # Runs of one seed read the same training batches: one pipeline each, replayed.
  from sira_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  with data_lib.shared_training_streams():
    for run in todo:
      bar.set_postfix_str(run.name)
      pending = run
      run, res = resolved_result(results_dir, pending, sweep)
      if res is not None:   # its rate resolved to a run that is already finished
        outcome.skipped.append(run.name)
        bar.update(1)
        continue
      if not run.resolved:
        log(f'{pending.name}: waits for the tuning runs of {pending.lr_from!r} (not finished); '
            'run the sweep again')
        outcome.pending.append(pending.name)
        continue
      try:
        execute(run, sweep, base_dir=base_dir, base_prov=prov, work_dir=work_dir,
                results_dir=results_dir, progress_bar=False, log=log)
        outcome.done.append(run.name)
      except RunInterrupted:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if not keep_going:
          bar.close()
          raise
        log(f'{run.name} FAILED: {type(e).__name__}: {e}')
        outcome.failed.append(run.name)
      bar.update(1)
  bar.close()
  return outcome


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def main(argv=None):
  import argparse  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--sweep', action='append', help=f'sweep name(s): {", ".join(sweeps_lib.SWEEPS)}')
  p.add_argument('--run', action='append', help='only this run (name as --list_runs prints)')
  p.add_argument('--results_dir', default=DEFAULT_RESULTS_DIR)
  p.add_argument('--work_dir', default=DEFAULT_WORK_DIR,
                 help='checkpoints and the cached base (not committed)')
  p.add_argument('--list', action='store_true', help='list sweeps and how many runs are finished')
  p.add_argument('--list_runs', action='store_true', help='list the runs of --sweep')
  p.add_argument('--print_commands', choices=('runner', 'trainer'), nargs='?', const='runner',
                 help="print one launch command per unfinished run instead of running: 'runner' "
                      "(writes the result file) or 'trainer' (sira_jax.train, training only)")
  p.add_argument('--no_shipped_base', action='store_true',
                 help='pretrain the base even when a matching shipped copy exists')
  p.add_argument('--build_base', action='store_true',
                 help='pretrain (or find) the base of --sweep and copy it into experiments/base/')
  p.add_argument('--keep_going', action='store_true', help='log a failing run and continue')
  p.add_argument('--limit', type=int, default=None,
                 help='run at most this many unfinished runs now (resume later)')
  p.add_argument('--binding', action='append', default=[],
                 help="extra gin binding for every run and the base, e.g. --binding=TRAIN_STEPS=2 "
                      "(the runs get other keys: results never mix with the unmodified sweep's)")
  p.add_argument('--eval_examples', type=int, default=None,
                 help='evaluate at most this many examples per task (default: the sweep\'s)')
  args = p.parse_args(argv)
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  gin_utils.quiet_logs()
  if args.list:
    for name, sw in sweeps_lib.SWEEPS.items():
      done = sum(resolved_result(args.results_dir, r, sw)[1] is not None for r in sw.runs)
      print(f'{name}: {done}/{len(sw.runs)} runs finished  - {sw.claim}')
    return 0
  if not args.sweep:
    p.error('--sweep is required (or --list)')
  try:
    chosen = [sweeps_lib.with_overrides(sweeps_lib.get_sweep(s), args.binding, args.eval_examples)
              for s in args.sweep]
  except ValueError as e:
    p.error(str(e))
  for sweep in chosen:
    if args.list_runs:
      for r in sweep.runs:
        r, res = resolved_result(args.results_dir, r, sweep)
        state = 'done' if res is not None else 'todo'
        print(f'{state}  {r.key if r.resolved else "-" * 12}  {r.name}')
      continue
    if args.build_base:
      base_dir, prov = ensure_base(sweep, args.work_dir, use_shipped=False)
      print(ship_base(base_dir, prov, f'base_{prov["config_hash"]}'))
      continue
    if args.print_commands:
      key, _ = base_config_hash(sweep)
      shipped = shipped_base(key)
      base = shipped or os.path.join(os.path.abspath(args.work_dir), f'base_{key}', 'base')
      if args.print_commands == 'trainer':
        print(f'# frozen base: {base}' + (' (shipped)' if shipped else
                                         ' (the runner pretrains it on its first run of this sweep)'))
      for r in sweep.runs:
        r, res = resolved_result(args.results_dir, r, sweep)
        if res is not None:
          continue
        if args.print_commands == 'runner':
          print(launch_command(r, sweep))
        elif not r.resolved:
          print(f'# {r.name}: learning rate chosen by the tuning runs of {r.lr_from!r} once they '
                'are finished')
        elif r.kind == 'finetune':
          print(trainer_command(r, os.path.join(args.work_dir, 'runs', r.key), base))
      continue
    out = run_sweep(sweep, results_dir=args.results_dir, work_dir=args.work_dir, only=args.run,
                    use_shipped_base=not args.no_shipped_base, keep_going=args.keep_going,
                    limit=args.limit)
    print(f'sweep {sweep.name}: {len(out.done)} run(s) done now, {len(out.skipped)} already '
          f'finished, {len(out.failed)} failed, {len(out.pending)} waiting for tuning runs; '
          f'report: python -m experiments.report --sweep={sweep.name}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
