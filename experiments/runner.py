r"""Run a sweep locally, in sequence, resumably; or print its launch commands.

  python -m experiments.runner --sweep=c1                      # run (skips finished runs)
  python -m experiments.runner --sweep=c1 --print_commands     # one launch command per run
  python -m experiments.runner --sweep=c1 --run='lora r8-lr0.01-s1'  # one run of the sweep
  python -m experiments.runner --list                          # sweeps and their run counts
  python -m experiments.runner --sweep=c3 --backend=t5x ...    # T5X runs (experiments/t5x_backend.py)

Every run writes `<results_dir>/runs/<run key>/result.json` (config, seed, git revision, hardware,
wall times, parameter counts, metrics per split and task, routing analysis) once it is complete;
a run whose result file exists is skipped, an interrupted run resumes from its last checkpoint in
`<work_dir>/runs/<run key>/`. The frozen base is pretrained once per base config into
`<work_dir>/base_<config hash>/` (or taken from the shipped copy in experiments/base/ when its
recorded config hash matches) and reused by every run.

Gin bindings of a run, in order (gin's last binding wins): the runner's default
INITIAL_CHECKPOINT_PATH (the sweep's base), the run's bindings (the sweep's, then each
`--binding`), then what the runner sets per run: MODEL_DIR, SEED and LEARNING_RATE (the run's
directory, seed and rate). So `--binding=INITIAL_CHECKPOINT_PATH="'/path/to/ckpt'"` fine-tunes
(and the floor run evaluates) that checkpoint and no base is pretrained, while a `--binding` of
MODEL_DIR, SEED or LEARNING_RATE is refused: those are the runs' own. Every `--binding` must be
used by the base's or some run's gin config (a typo is refused, with the closest macros).

Running (or `--build_base`) is refused while a tracked file of the repository is modified, since
a result must name the commit that produced it; `--allow_dirty` runs anyway and the results record
the commit with '+dirty'. A sweep with checkpoint selection (`Sweep.select_checkpoint_every`, the
regime sweeps) keeps each run's checkpoints at every tenth of its steps, scores them on validation
and the best on test (`experiments.checkpoint_selection`).

A user error (an unknown sweep, run or flag, a refused `--binding`, an unreadable result file, a
modified tree) prints one line, `error: ...` naming the flag as typed, on stderr and exits with
status 2.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
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


class UsageError(ValueError):
  """A command-line mistake; the message names the flag as the user typed it."""


class UnreadableResultError(ValueError):
  """A result file that does not parse (not JSON, not UTF-8); names the file and the error."""

  def __init__(self, path: str, error: Exception):
    self.path, self.error = path, f'{type(error).__name__}: {error}'
    super().__init__(f'unreadable result file {path}: {self.error} (delete it and run the sweep '
                     'again to redo that run)')


# ------------------------------------------------------------------------------------------------
# Provenance
# ------------------------------------------------------------------------------------------------
def modified_tracked_files(repo: str | None = None) -> list[str]:
  """The tracked files of the git checkout `repo` (default: this repository) that differ from its
  commit (staged or not; untracked files do not count). Raises OSError or CalledProcessError when
  git cannot read it."""
  out = subprocess.run(['git', '-C', repo or REPO, 'status', '--porcelain', '--untracked-files=no'],
                       capture_output=True, text=True, check=True).stdout
  return [line[3:] for line in out.splitlines() if line.strip()]


def git_revision(repo: str | None = None) -> str:
  """The commit of `repo` (default: this repository), with '+dirty' when a tracked file is
  modified; 'unknown' outside a git checkout."""
  try:
    rev = subprocess.run(['git', '-C', repo or REPO, 'rev-parse', 'HEAD'], capture_output=True,
                         text=True, check=True).stdout.strip()
    return rev + ('+dirty' if modified_tracked_files(repo) else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def check_clean_tree(repo: str | None = None) -> None:
  """Raises UsageError (one line: the problem and the fix) unless `repo` (default: this
  repository) is a git checkout whose tracked files are as committed: a result must name the
  commit that produced it."""
  repo = repo or REPO
  try:
    modified = modified_tracked_files(repo)
  except (OSError, subprocess.CalledProcessError) as e:
    raise UsageError(f'cannot read the git state of {repo} ({type(e).__name__}), so a result '
                     'could name no commit: run from a git checkout, or pass --allow_dirty') from None
  if modified:
    more = f' and {len(modified) - 3} more' if len(modified) > 3 else ''
    raise UsageError(f'the git tree {repo} has modified tracked files ({", ".join(modified[:3])}'
                     f'{more}), so a result would name no commit: commit or stash them, or pass '
                     '--allow_dirty (results then record the commit with +dirty)')


def hardware() -> dict:
  import jax
  load = os.getloadavg() if hasattr(os, 'getloadavg') else None
  return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
              cpu_count=os.cpu_count(), jax_backend=jax.default_backend(),
              devices=[str(d) for d in jax.devices()], load_average=load,
              python=sys.version.split()[0], jax_version=jax.__version__)


def _write_json(path: str, obj) -> None:
  """Writes `obj` to a temporary file beside `path`, then renames it to `path` (atomic): an
  interrupted write leaves no `path` (nor the temporary file), never a half-written one."""
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(obj, f, indent=1, sort_keys=True, default=json_default)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


# ------------------------------------------------------------------------------------------------
# Gin
# ------------------------------------------------------------------------------------------------
def parse_gin(gin_files: Sequence[str], bindings: Sequence[str],
              extra_bindings: Sequence[str] = ()) -> None:
  """Clears gin, parses `gin_files` then `bindings` (the project's search paths) and registers the
  tasks (`gin_utils.parse_and_register`). The `extra_bindings` among `bindings` (a sweep's
  `--binding`s, which `check_extra_bindings` checked against all of its configs) may set a macro
  this one config does not use."""
  from sira_jax import gin_utils
  from sira_jax import train as _  # noqa: F401
  gin_utils.parse_and_register(list(gin_files), list(bindings), ('.', gin_utils.PROJECT_GIN_DIR),
                               check_unused=[b for b in bindings if b not in extra_bindings])


# Macros the runner sets for each run from the run itself -> where their value comes from.
PER_RUN_MACROS = {'MODEL_DIR': '<work_dir>/runs/<run key>', 'SEED': "the run's seed",
                  'LEARNING_RATE': "the run's learning rate"}


def bound_macro(bindings: Sequence[str], name: str) -> str | None:
  """The last of `bindings` that sets macro `name` (`NAME = value`), else None."""
  from sira_jax import gin_utils
  found = [b for b in bindings if gin_utils.binding_macro(b) == name]
  return found[-1] if found else None


def check_extra_bindings(sweep: sweeps_lib.Sweep) -> None:
  """Refuses a `--binding` (`sweep.extra_bindings`) that sets a per-run macro, that gin refuses,
  or whose macro neither the base's nor any run's gin config uses; raises UsageError naming it.
  Parses gin only (no task registration, nothing trained)."""
  import gin
  from sira_jax import gin_utils
  from sira_jax import train as _  # noqa: F401
  extra = list(sweep.extra_bindings)
  if not extra:
    return
  for name in PER_RUN_MACROS:
    b = bound_macro(extra, name)
    if b is not None:
      raise UsageError(f'--binding={b}: the runner sets {name} for every run from the run itself '
                       f"({name}={PER_RUN_MACROS[name]}), so a binding cannot set it")
  configs = [(tuple(sweep.base_gin), (*sweep.base_bindings, "MODEL_DIR='-'"))]
  for r in sweep.runs:
    config = (tuple(r.gin_files), tuple(run_bindings(r, '-', '-')))
    if config not in configs:
      configs.append(config)
  used: set[str] = set()
  try:
    for files, bindings in configs:
      gin.clear_config()
      gin_utils.parse_gin(files, bindings, ('.', gin_utils.PROJECT_GIN_DIR), finalize=False,
                          check_unused=[b for b in bindings if b not in extra])
      used |= gin_utils.referenced_macros()
  except gin_utils.GinConfigError as e:
    if e.binding in extra:
      raise UsageError(f'--binding={e.binding}: {e.reason}') from None
    raise
  finally:
    gin.clear_config()
  for b in extra:
    name = gin_utils.binding_macro(b)
    if name is not None and name not in used:
      raise UsageError(f'--binding={b}: {gin_utils.unused_macro_reason(name, used)} '
                       f'(neither the base nor any run of sweep {sweep.name!r} uses it)')


BASE_TRAIN_ARGS = ('mixture_or_task_name', 'task_feature_lengths', 'train_steps', 'batch_size',
                   'optimizer_name', 'learning_rate', 'schedule', 'warmup_steps', 'weight_decay',
                   'clip_grad_norm', 'seed', 'data_seed', 'pack', 'pretrain',
                   'initial_checkpoint_path')


def _train_arg(name: str):
  """The value gin gives `train.<name>` (macros resolved; the signature default when unbound)."""
  import inspect
  import gin
  from sira_jax import train as train_lib
  try:
    v = gin.query_parameter(f'train.{name}')
  except ValueError:
    return inspect.signature(train_lib.train).parameters[name].default
  return v.scoped_configurable_fn() if isinstance(v, gin.config.ConfigurableReference) else v


def base_config_hash(sweep: sweeps_lib.Sweep) -> tuple[str, dict]:
  """(hash, settings) of what determines the base: its architecture (`T5Config.architecture`), loss
  and pretraining arguments (not checkpointing/logging settings, nor MODEL_DIR), as the base gin
  files set them."""
  import gin
  from sira_jax.losses import LossConfig
  from sira_jax.t5.config import T5Config
  parse_gin(sweep.base_gin, (*sweep.base_bindings, "MODEL_DIR='-'"), sweep.extra_bindings)
  loss = LossConfig()
  key = dict(model=T5Config().architecture(),
             loss=dict(z_loss=loss.z_loss, label_smoothing=loss.label_smoothing),
             train={k: _train_arg(k) for k in BASE_TRAIN_ARGS})
  gin.clear_config()
  key = json.loads(json.dumps(key, default=str))
  return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10], key


def _train(progress_bar: bool):
  """`sira_jax.train.train` under the parsed gin config, as `train_from_gin` calls it."""
  from sira_jax import gin_utils
  from sira_jax import train as train_lib
  from sira_jax.t5.config import T5Config
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
      from sira_jax.run_dir import dict_diff
      diff = dict_diff(prov['settings'], settings)
      log(f'base: the shipped base {name} does not match this config (shipped -> now: '
          f'{diff[:300]}); pretraining instead')
  return None


def ensure_base(sweep: sweeps_lib.Sweep, work_dir: str, *, use_shipped: bool = True,
                log: Callable[[str], None] = print) -> tuple[str, dict]:
  """Pretrains the sweep's base once (or finds it); returns (base checkpoint dir, provenance)."""
  from sira_jax import base_checkpoint
  from sira_jax import run_dir as run_dir_lib
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
  parse_gin(sweep.base_gin, (*sweep.base_bindings, f"MODEL_DIR='{run_dir}'"), sweep.extra_bindings)
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
def run_bindings(run: sweeps_lib.Run, model_dir: str, base_dir: str | None) -> list[str]:
  """The run's gin bindings between what the runner sets (module docstring): first the default
  INITIAL_CHECKPOINT_PATH=`base_dir` (None: none, a binding of the run names the checkpoint), so
  the run's own binding of it wins; last MODEL_DIR, SEED and LEARNING_RATE of the run. A run
  binding one of those raises ValueError naming both."""
  for name in PER_RUN_MACROS:
    b = bound_macro(run.bindings, name)
    if b is not None:
      raise ValueError(f'run {run.name!r} binds {b!r}, but the runner sets {name} '
                       f'({PER_RUN_MACROS[name]})')
  defaults = [] if base_dir is None else [f"INITIAL_CHECKPOINT_PATH='{base_dir}'"]
  per_run = [f"MODEL_DIR='{model_dir}'", f'SEED={run.seed}']
  if run.learning_rate is not None:
    per_run.append(f'LEARNING_RATE={run.learning_rate!r}')
  return [*defaults, *run.bindings, *per_run]


def user_initial_checkpoint(sweep: sweeps_lib.Sweep) -> str | None:
  """The `--binding` of INITIAL_CHECKPOINT_PATH (the runs start from that checkpoint, not from
  the sweep's base, which is then never pretrained), else None."""
  return bound_macro(sweep.extra_bindings, 'INITIAL_CHECKPOINT_PATH')


def launch_command(run: sweeps_lib.Run, sweep: sweeps_lib.Sweep) -> str:
  """A shell command running this one run (and writing its result file) from the repo root, with
  the sweep's `--binding`s (they are part of the run's key)."""
  return ' '.join(['python -m experiments.runner', f'--sweep={sweep.name}',
                   shlex.quote(f'--run={run.name}'),
                   *(shlex.quote(f'--binding={b}') for b in sweep.extra_bindings)])


def trainer_command(run: sweeps_lib.Run, model_dir: str, base_dir: str | None,
                    extra: Sequence[str] = ()) -> str:
  """The project trainer's own command for this run (training only; no result file), with the
  `extra` bindings last (e.g. `selection_bindings`)."""
  files = ' '.join(f'--gin_file={f}' for f in run.gin_files)
  binds = ' '.join(f'--gin.{b}' if '=' in b else b
                   for b in [*run_bindings(run, model_dir, base_dir), *extra])
  return f'python -m sira_jax.train {files} {binds}'


def result_path(results_dir: str, run: sweeps_lib.Run) -> str:
  return os.path.join(results_dir, 'runs', run.key, RESULT)


def load_result(results_dir: str, run: sweeps_lib.Run) -> dict | None:
  """The run's result dict, or None while it is unfinished (or its learning rate unresolved).
  Raises UnreadableResultError (naming the file) for a file that does not parse."""
  if not run.resolved:
    return None
  path = result_path(results_dir, run)
  if not os.path.exists(path):
    return None
  return read_result(path)


def read_result(path: str) -> dict:
  """The result file at `path`; UnreadableResultError (one line: the file, the parse error) when
  it is not UTF-8 JSON."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
    raise UnreadableResultError(path, e) from None


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


def selection_bindings(run: sweeps_lib.Run, sweep: sweeps_lib.Sweep,
                       bindings: Sequence[str]) -> list[str]:
  """The checkpoint bindings a fine-tuning run of a sweep with checkpoint selection trains with
  (`checkpoint_selection.checkpoint_bindings` for its TRAIN_STEPS under `bindings`), else []."""
  from experiments import checkpoint_selection
  if run.kind != 'finetune' or sweep.select_checkpoint_every is None:
    return []
  parse_gin(run.gin_files, bindings, sweep.extra_bindings)
  steps = int(_train_arg('train_steps'))
  return checkpoint_selection.checkpoint_bindings(steps, sweep.checkpoint_interval(steps))


def execute(run: sweeps_lib.Run, sweep: sweeps_lib.Sweep, *, base_dir: str | None,
            base_prov: Mapping,
            work_dir: str, results_dir: str, progress_bar: bool = False,
            log: Callable[[str], None] = print) -> dict:
  """Trains (kind 'finetune') or just loads (kind 'floor') one run, evaluates it, writes its
  result file; returns the result dict. base_dir: the sweep's base (None: a `--binding` names
  INITIAL_CHECKPOINT_PATH); the run starts from the INITIAL_CHECKPOINT_PATH its config resolves
  to, recorded in the result's `base`. Each split is scored on `sweep.num_examples(split)`
  examples per task; under `sweep.select_checkpoint_every` on the checkpoint chosen on
  `sweep.select_split` (`experiments.checkpoint_selection`), else on the last one."""
  from experiments import checkpoint_selection
  from experiments import evaluation
  from sira_jax import restore
  from sira_jax import run_dir
  from sira_jax.adapters import ROUTED_KINDS
  from sira_jax.t5 import param_count
  t0, cpu0 = time.time(), time.process_time()
  model_dir = os.path.join(os.path.abspath(work_dir), 'runs', run.key)
  bindings = run_bindings(run, model_dir, base_dir)
  bindings += selection_bindings(run, sweep, bindings)
  parse_gin(run.gin_files, bindings, sweep.extra_bindings)
  import gin
  config_str = gin.config_str()
  start = _train_arg('initial_checkpoint_path') or base_dir
  train_steps = _train_arg('train_steps') if run.kind == 'finetune' else None
  train_info: dict = {}
  if run.kind == 'floor':
    model, variables, cfg = evaluation.load_base(start)
    mixture = _train_arg('mixture_or_task_name')
    lengths = dict(_train_arg('task_feature_lengths'))
  else:
    r = _train(progress_bar=progress_bar)
    if r.stopped_by != 'done':
      raise RunInterrupted(f'{run.name} stopped at step {r.step}; re-run the sweep to resume it')
    train_info = dict(steps=r.step, wall_time_s=r.wall_time, final_metrics=r.last_metrics,
                      history=r.history, median_step_time_s=r.median_step_time)
    fingerprint = run_dir.read_run_config(model_dir)
    mixture, lengths = fingerprint['mixture_or_task_name'], fingerprint['task_feature_lengths']
  gin.clear_config()
  cpu_train = time.process_time() - cpu0
  t_eval = time.time()

  def score(model, variables, split: str, output_dir: str) -> dict:
    return evaluation.evaluate_split(
        model, variables, mixture, lengths, split, num_examples=sweep.num_examples(split),
        batch_size=sweep.eval_batch_size, output_dir=output_dir)

  metrics, selection = {}, None
  if run.kind == 'finetune' and sweep.select_checkpoint_every is not None:
    selection = checkpoint_selection.select(
        model_dir, train_steps, sweep.checkpoint_interval(train_steps),
        lambda m, v, step: score(m, v, sweep.select_split,
                                 os.path.join(model_dir, 'eval', f'step_{step}')),
        split=sweep.select_split, metric=sweep.metric)
    metrics[sweep.select_split] = dict(selection.scores[selection.chosen_step])
    log(f'{run.name}: {sweep.select_split} {sweep.metric} by step '
        f'{ {s: round(v, 2) for s, v in selection.curve.items()} }: step '
        f'{selection.chosen_step} chosen')
  if run.kind == 'finetune':
    model, variables, cfg, _ = restore.load_trained(
        model_dir, step=selection.chosen_step if selection else None)
  for split in sweep.eval_splits:
    if split not in metrics:
      metrics[split] = score(model, variables, split, os.path.join(model_dir, 'eval'))
  routing = None
  if cfg.adapter.kind in ROUTED_KINDS and run.point in sweep.routing_points:
    # Training-mode statistics on the run's own training batches, eval-mode ones on the
    # evaluation batches (experiments.evaluation's module docstring).
    routing = evaluation.routing_analysis(
        model, variables, mixture, lengths, split=sweep.select_split,
        num_examples=sweep.num_examples(sweep.select_split), batch_size=sweep.eval_batch_size,
        training=evaluation.TrainingStream.of_run(fingerprint))
  counts = trained_counts(param_count.count_parameters(cfg).as_dict(), config_str)
  result = dict(
      run=run.as_dict(), sweep=sweep.name, mixture=mixture, task_feature_lengths=lengths,
      gin_config=config_str, base=dict(
          dir=os.path.relpath(start, REPO) if start.startswith(REPO) else start,
          **(dict(config_hash=base_prov.get('config_hash'), steps=base_prov.get('steps'))
             if start == base_dir else {})),
      git_revision=git_revision(), hardware=hardware(), params=counts, train=train_info,
      metrics=metrics, routing=routing,
      eval_num_examples={split: sweep.num_examples(split) for split in sweep.eval_splits},
      wall_time_s=dict(total=time.time() - t0, eval=time.time() - t_eval,
                       train=train_info.get('wall_time_s', 0.0)),
      cpu_time_s=dict(total=time.process_time() - cpu0, train=cpu_train,
                      eval=time.process_time() - cpu0 - cpu_train),
      finished=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
  if selection is not None:
    result['checkpoint_selection'] = selection.as_dict()
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
  """Run names: done now, skipped (finished before), failed, waiting for their tuning runs
  (pending), and left unfinished for a later call by `limit` (later)."""
  done: list
  skipped: list
  failed: list
  results_dir: str
  pending: list = dataclasses.field(default_factory=list)
  later: list = dataclasses.field(default_factory=list)


def run_sweep(sweep: sweeps_lib.Sweep, *, results_dir: str = DEFAULT_RESULTS_DIR,
              work_dir: str = DEFAULT_WORK_DIR, only: Sequence[str] | None = None,
              use_shipped_base: bool = True, progress_bar: bool = True,
              keep_going: bool = False, limit: int | None = None,
              require_clean_tree: bool = False,
              log: Callable[[str], None] | None = None) -> SweepOutcome:
  """Runs every unfinished run of `sweep` in order (or those named in `only`).

  Finished runs (result file present) are skipped; an interrupted run resumes from its checkpoint.
  A run whose learning rate comes from a point's tuning runs (`Run.lr_from`) gets it when they
  are finished (they come first in every sweep); with `only` or `limit` it may have to wait for a
  later call. keep_going: a failing run is logged and the next one starts (else the error
  propagates). limit: run at most this many unfinished runs now (a sweep in slices).
  require_clean_tree: refuse (UsageError, `check_clean_tree`) to run anything while a tracked file
  of the repository is modified (the command line's default; --allow_dirty lifts it).
  """
  from tqdm import tqdm
  runs = list(sweep.runs)
  if only:
    # A tuned run answers to its sweep name ('...-lrtuned-s1') and, once resolved, to its rate's.
    # (A Run holds dicts, so it is not hashable: names go by position.)
    names = [{r.name, resolved_result(results_dir, r, sweep)[0].name} for r in runs]
    unknown = [n for n in only if n not in set().union(*names)]
    if unknown:
      raise UsageError(f'--run={unknown[0]}: sweep {sweep.name!r} has no run named '
                       f'{unknown[0]!r}; --list_runs shows its {len(runs)} runs')
    runs = [r for r, n in zip(runs, names) if n & set(only)]
  unfinished = [r for r in runs if resolved_result(results_dir, r, sweep)[1] is None]
  todo = unfinished if limit is None else unfinished[:limit]
  bar = tqdm(total=len(runs), initial=len(runs) - len(unfinished), desc=f'sweep {sweep.name}',
             unit='run', disable=not progress_bar, dynamic_ncols=True)
  log = log or (lambda m: bar.write(f'[{time.strftime("%H:%M:%S")}] {m}'))
  outcome = SweepOutcome(done=[], skipped=[r.name for r in runs if r not in unfinished],
                         failed=[], results_dir=results_dir,
                         later=[r.name for r in unfinished[len(todo):]])
  if not todo:
    bar.close()
    return outcome
  try:
    check_extra_bindings(sweep)
    if require_clean_tree:
      check_clean_tree()
  except UsageError:
    bar.close()
    raise
  if user_initial_checkpoint(sweep):
    base_dir, prov = None, {}
  else:
    base_dir, prov = ensure_base(sweep, work_dir, use_shipped=use_shipped_base, log=log)
  # Runs of one seed read the same training batches: one pipeline each, replayed.
  from sira_jax import data as data_lib
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
      except Exception as e:
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
def define_flags() -> None:
  """The runner's flags (absl), defined when its CLI starts (experiments.report, which imports this
  module, defines its own)."""
  from absl import flags
  if 'list_runs' in flags.FLAGS:
    return
  flags.DEFINE_multi_string('sweep', [], f'sweep name(s): {", ".join(sweeps_lib.SWEEPS)}')
  flags.DEFINE_multi_string('run', [], 'only this run (name as --list_runs prints); repeatable')
  flags.DEFINE_string('results_dir', DEFAULT_RESULTS_DIR, 'where result files are written')
  flags.DEFINE_string('work_dir', DEFAULT_WORK_DIR,
                      'checkpoints and the cached base (not committed)')
  flags.DEFINE_bool('list', False, 'list sweeps and how many runs are finished')
  flags.DEFINE_bool('list_runs', False, 'list the runs of --sweep')
  flags.DEFINE_enum('print_commands', None, ('runner', 'trainer'),
                    "print one launch command per unfinished run instead of running: 'runner' "
                    "(writes the result file; what a bare --print_commands means) or 'trainer' "
                    '(sira_jax.train, training only)')
  flags.DEFINE_bool('no_shipped_base', False,
                    'pretrain the base even when a matching shipped copy exists')
  flags.DEFINE_bool('build_base', False,
                    'pretrain (or find) the base of --sweep and copy it into experiments/base/')
  flags.DEFINE_bool('keep_going', False, 'log a failing run and continue')
  flags.DEFINE_bool('allow_dirty', False,
                    'run (or build a base) although tracked files are modified; results then '
                    'record the commit with +dirty (default: refuse, a result must name a commit)')
  flags.DEFINE_integer('limit', None, 'run at most this many unfinished runs now (resume later)',
                       lower_bound=0)
  flags.DEFINE_multi_string(
      'binding', [], 'extra gin binding for every run and the base, e.g. --binding=TRAIN_STEPS=2 '
      "(the runs get other keys: results never mix with the unmodified sweep's); it wins over the "
      "runner's default INITIAL_CHECKPOINT_PATH; MODEL_DIR, SEED and LEARNING_RATE are the runs' "
      'own')
  flags.DEFINE_integer('eval_examples', None,
                       "evaluate at most this many examples per task (default: the sweep's)",
                       lower_bound=1)
  flags.DEFINE_enum('backend', 'cpu', ('cpu', 't5x'),
                    "'cpu': the project's trainer on the bundled benchmark; 't5x': T5X runs of "
                    'the sweep on --benchmark and --model_size (experiments/t5x_backend.py)')
  from experiments import t5x_backend
  t5x_backend.define_flags()


def usage_error(message: str) -> None:
  """A command-line mistake: `error: <message>` (one line) on stderr, exit status 2."""
  print(f'error: {message.splitlines()[0] if message.strip() else message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: Sequence[str], bare: Mapping[str, str] | None = None) -> list[str]:
  """absl `flags_parser` for app.run: a flag error is a `usage_error` (not absl's usage dump).
  bare: {flag: value} a flag given without a value means (`--print_commands` -> 'runner')."""
  from absl import flags
  bare = bare or {}
  argv = [f'{a}={bare[a[2:]]}' if a.startswith('--') and a[2:] in bare else a for a in argv]
  try:
    return flags.FLAGS(list(argv))
  except flags.Error as e:
    usage_error(str(e))


def chosen_sweeps(names: Sequence[str], bindings: Sequence[str],
                  eval_examples: int | None) -> list[sweeps_lib.Sweep]:
  """The sweeps `--sweep` names, with the `--binding`s and `--eval_examples`; UsageError for an
  unknown name."""
  chosen = []
  for name in names:
    if name not in sweeps_lib.SWEEPS:
      raise UsageError(f'--sweep={name}: no such sweep; known: {", ".join(sweeps_lib.SWEEPS)}')
    chosen.append(sweeps_lib.with_overrides(sweeps_lib.SWEEPS[name], bindings, eval_examples))
  return chosen


def main(argv):
  from absl import flags
  from sira_jax import gin_utils
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    usage_error(f'unexpected argument {argv[1]!r} (flags are --name=value)')
  gin_utils.quiet_logs()
  if FLAGS.backend == 't5x':
    from experiments import benchmarks, t5x_backend
    try:
      t5x_backend.main(FLAGS)
    except (benchmarks.SpecError, UsageError) as e:
      usage_error(str(e))
    return 0
  try:
    if FLAGS.list:
      for name, sw in sweeps_lib.SWEEPS.items():
        done = sum(resolved_result(FLAGS.results_dir, r, sw)[1] is not None for r in sw.runs)
        print(f'{name}: {done}/{len(sw.runs)} runs finished  - {sw.claim}')
      return 0
    if not FLAGS.sweep:
      raise UsageError('--sweep is required (or --list); sweeps: '
                       + ', '.join(sweeps_lib.SWEEPS))
    for sweep in chosen_sweeps(FLAGS.sweep, FLAGS.binding, FLAGS.eval_examples):
      _command(sweep, FLAGS)
  except (UsageError, UnreadableResultError) as e:
    usage_error(str(e))
  return 0


def _command(sweep: sweeps_lib.Sweep, FLAGS) -> None:
  """What the flags ask of one sweep: list its runs, build its base, print commands, or run it."""
  if FLAGS.list_runs:
    for r in sweep.runs:
      r, res = resolved_result(FLAGS.results_dir, r, sweep)
      state = 'done' if res is not None else 'todo'
      print(f'{state}  {r.key if r.resolved else "-" * 12}  {r.name}')
    return
  if FLAGS.build_base or FLAGS.print_commands:
    check_extra_bindings(sweep)  # (run_sweep checks them itself)
  if FLAGS.build_base:
    if not FLAGS.allow_dirty:
      check_clean_tree()
    base_dir, prov = ensure_base(sweep, FLAGS.work_dir, use_shipped=False)
    print(ship_base(base_dir, prov, f'base_{prov["config_hash"]}'))
    return
  if FLAGS.print_commands:
    _print_commands(sweep, FLAGS.print_commands, FLAGS.results_dir, FLAGS.work_dir)
    return
  out = run_sweep(sweep, results_dir=FLAGS.results_dir, work_dir=FLAGS.work_dir, only=FLAGS.run,
                  use_shipped_base=not FLAGS.no_shipped_base, keep_going=FLAGS.keep_going,
                  limit=FLAGS.limit, require_clean_tree=not FLAGS.allow_dirty)
  print(f'sweep {sweep.name}: {len(out.done)} run(s) done now, {len(out.skipped)} already '
        f'finished, {len(out.failed)} failed, {len(out.pending)} waiting for tuning runs, '
        f'{len(out.later)} left by --limit; '
        f'report: python -m experiments.report --sweep={sweep.name}')


def _print_commands(sweep: sweeps_lib.Sweep, kind: str, results_dir: str, work_dir: str) -> None:
  """One launch command per unfinished run: the runner's ('runner') or the trainer's."""
  base = None
  if kind == 'trainer':
    if user_initial_checkpoint(sweep):
      print(f'# initial checkpoint: {user_initial_checkpoint(sweep)} (--binding)')
    else:
      key, _ = base_config_hash(sweep)
      shipped = shipped_base(key)
      base = shipped or os.path.join(os.path.abspath(work_dir), f'base_{key}', 'base')
      print(f'# frozen base: {base}' + (' (shipped)' if shipped else
                                       ' (the runner pretrains it on its first run of this sweep)'))
  for r in sweep.runs:
    r, res = resolved_result(results_dir, r, sweep)
    if res is not None:
      continue
    if kind == 'runner':
      print(launch_command(r, sweep))
    elif not r.resolved:
      print(f'# {r.name}: learning rate chosen by the tuning runs of {r.lr_from!r} once they '
            'are finished')
    elif r.kind == 'finetune':
      model_dir = os.path.join(work_dir, 'runs', r.key)
      keep = selection_bindings(r, sweep, run_bindings(r, model_dir, base))
      print(trainer_command(r, model_dir, base, keep))


def cli():
  from absl import app
  define_flags()
  app.run(main, flags_parser=lambda argv: parse_flags(argv, {'print_commands': 'runner'}))


if __name__ == '__main__':
  from experiments import runner as _module  # one copy, not a second as __main__
  _module.cli()
