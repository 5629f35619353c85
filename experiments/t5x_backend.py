r"""The T5X backend of the runner: a pod sweep (`experiments.benchmarks`) as T5X command lines,
printed for a launcher or run here one after another, then collected into result files.

  python -m experiments.runner --backend=t5x --sweep=c3 --benchmark=xtreme_up_multitask \
    --model_size=mt5_base --base_checkpoint=/ckpt/mt5_base/checkpoint_1000000 \
    --vocabulary=/ckpt/mt5_base/spiece.model --data_dir=/data/xtreme-up-v1.1.jsonl \
    --output_root=/shared/sira --finetune_steps=2000 --print_commands [--launch=tpu_vm ...]

Per run (each in its own MODEL_DIR, `PodSpec.model_dir`): the `python -m t5x.train` command (the
run's gin/t5x files and overrides; the floor run trains nothing), then one `python -m t5x.eval`
per evaluated split on the checkpoint the run's selection rule picks (`eval_checkpoint`: the
run's last, `checkpoint_<TRAIN_STEPS>`, as the CPU sweeps evaluate their final step; the floor:
the base checkpoint). A run whose learning rate its point's tuning runs choose (`Run.lr_from`)
gets its commands once they are collected. Commands run from the repository root with the
project importable (`pip install -e .`).

Launch wrappers (`Launch`): 'local' (as is), 'tpu_vm' (every worker of a TPU VM slice runs the
same command: `gcloud compute tpus tpu-vm ssh NAME --worker=all --command='cd REPO && ...'`; the
output root must be storage every worker shares) and 'multiprocess_gpu' (T5X's
`--multiprocess_gpu --coordinator_address --process_count --process_index` on t5x.train, one
process per host, each with its own PROCESS_INDEX; t5x.eval has no such flags: host 0 runs it
while the others go on to the next run's training, which waits for host 0). There is no scheduler: the printed lines go to whatever queue the user has.

`run_sweep` executes the same argv here (subprocesses, in order, resumable: a run with its last
checkpoint is not trained again, a split with its metrics is not evaluated again) and collects
each run as it finishes (`experiments.t5x_collect`), so later runs resolve their rates.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from typing import Callable, Sequence

from experiments import benchmarks
from experiments import sweeps as sweeps_lib

REPO = benchmarks.REPO
# Macros of training only: left off the eval commands (which set CHECKPOINT_PATH instead).
TRAIN_ONLY_MACROS = ('INITIAL_CHECKPOINT_PATH', 'TRAIN_STEPS', 'SMOE_SCHEDULE_STEPS')
# Bindings of t5x.train's own function (e.g. `--binding=train.train_eval_dataset_cfg=None`).
TRAIN_SCRIPT_SELECTORS = ('train.', 'train_script.')


def eval_dir(spec: benchmarks.PodSpec, run: sweeps_lib.Run, split: str) -> str:
  """EVAL_OUTPUT_DIR of `run` on `split` (metrics in `<it>/inference_eval/<task>-metrics.jsonl`)."""
  return os.path.join(spec.model_dir(run), f'eval_{split}')


# ------------------------------------------------------------------------------------------------
# Shell text
# ------------------------------------------------------------------------------------------------
_DOUBLE_QUOTE_SAFE = re.compile(r'[^"$`\\!]*')


def quote(arg: str) -> str:
  """`arg` as one shell word: bare when safe, in double quotes when it holds single quotes (gin's
  string literals: `"--gin.MODEL_DIR='/x'"`) and nothing double quotes expand, else `shlex.quote`.
  `shlex.split` of the result gives `arg` back."""
  if "'" in arg and _DOUBLE_QUOTE_SAFE.fullmatch(arg):
    return f'"{arg}"'
  return shlex.quote(arg)


def command_line(argv: Sequence[str]) -> str:
  return ' '.join(quote(a) for a in argv)


def _macro(binding: str) -> str:
  return binding.split('=', 1)[0].strip()


def _gin_args(files: Sequence[str], bindings: Sequence[str]) -> list[str]:
  return ['--gin_search_paths=gin', *(f'--gin_file={f}' for f in files),
          *(f'--gin.{b.strip()}' for b in bindings)]


def _tfds_flag(spec: benchmarks.PodSpec) -> list[str]:
  return [f'--tfds_data_dir={spec.data_dir}'] if spec.bench.tfds_data_dir and spec.data_dir else []


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def train_argv(run: sweeps_lib.Run, spec: benchmarks.PodSpec, python: str = 'python'
               ) -> list[str]:
  """`python -m t5x.train` for a resolved finetune run: its gin files and bindings, then its
  MODEL_DIR, seed (RANDOM_SEED) and learning rate."""
  if run.kind != 'finetune' or not run.resolved:
    raise ValueError(f'run {run.name!r}: only a resolved finetune run trains')
  per_run = [f"MODEL_DIR='{spec.model_dir(run)}'", f'RANDOM_SEED={run.seed}']
  if run.learning_rate is not None:
    per_run.append(f'LEARNING_RATE={run.learning_rate!r}')
  return [python, '-m', 't5x.train', *_gin_args(run.gin_files, [*run.bindings, *per_run]),
          *_tfds_flag(spec)]


def eval_checkpoint(run: sweeps_lib.Run, spec: benchmarks.PodSpec) -> str:
  """The checkpoint a run is scored on: a finetune run's last (`checkpoint_<TRAIN_STEPS>`, as the
  CPU runs score their final step), the floor's base checkpoint."""
  if run.kind == 'floor':
    return spec.base_checkpoint
  return os.path.join(spec.model_dir(run), f'checkpoint_{spec.train_steps}')


def eval_argv(run: sweeps_lib.Run, spec: benchmarks.PodSpec, split: str,
              eval_num_examples: int | None, python: str = 'python') -> list[str]:
  """`python -m t5x.eval` of `run` on `split`: the run's model, adapter and task files with
  t5x/runs/eval.gin, its bindings (less TRAIN_ONLY_MACROS), the checkpoint `eval_checkpoint`
  and the output dir `eval_dir`; EVALUATOR_NUM_EXAMPLES per task when given."""
  files = [f for f in run.gin_files if not f.startswith('t5x/runs/')]
  task_at = next(i for i, f in enumerate(files) if f.startswith('t5x/tasks/'))
  files.insert(task_at, 't5x/runs/eval.gin')
  bindings = [b for b in run.bindings if _macro(b) not in TRAIN_ONLY_MACROS
              and not _macro(b).startswith(TRAIN_SCRIPT_SELECTORS)]
  bindings += [f"CHECKPOINT_PATH='{eval_checkpoint(run, spec)}'",
               f"EVAL_OUTPUT_DIR='{eval_dir(spec, run, split)}'", f"SPLIT='{split}'"]
  if eval_num_examples is not None:
    bindings.append(f'EVALUATOR_NUM_EXAMPLES={eval_num_examples}')
  return [python, '-m', 't5x.eval', *_gin_args(files, bindings), *_tfds_flag(spec)]


# Each GPU host sets PROCESS_INDEX (0 .. process_count-1); unset, the shell stops with a message.
PROCESS_INDEX = '${PROCESS_INDEX:?set PROCESS_INDEX to the index of this host}'


@dataclasses.dataclass(frozen=True)
class Launch:
  """How a command reaches the hardware (module docstring): kind 'local', 'tpu_vm' (tpu_name,
  optional zone and project; remote_repo: the repository on the workers) or
  'multiprocess_gpu' (coordinator_address 'host:port', process_count)."""
  kind: str = 'local'
  tpu_name: str | None = None
  zone: str | None = None
  project: str | None = None
  remote_repo: str = REPO
  coordinator_address: str | None = None
  process_count: int | None = None

  def __post_init__(self):
    if self.kind not in ('local', 'tpu_vm', 'multiprocess_gpu'):
      raise benchmarks.SpecError(f'--launch={self.kind}: one of local, tpu_vm, multiprocess_gpu')
    if self.kind == 'tpu_vm' and not self.tpu_name:
      raise benchmarks.SpecError('--launch=tpu_vm needs --tpu_name (the TPU VM slice)')
    if self.kind == 'multiprocess_gpu' and not (self.coordinator_address and self.process_count):
      raise benchmarks.SpecError('--launch=multiprocess_gpu needs --coordinator_address=HOST:PORT '
                                 'and --process_count=N (one process per host)')

  def _tpu_vm(self, argv: Sequence[str]) -> str:
    ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', self.tpu_name]
    ssh += [f'--{k}={v}' for k, v in (('zone', self.zone), ('project', self.project)) if v]
    repo = self.remote_repo  # '~/x': the worker's home, so the tilde stays unquoted
    repo = '~/' + shlex.quote(repo[2:]) if repo.startswith('~/') else shlex.quote(repo)
    remote = f'cd {repo} && {command_line(argv)}'
    return command_line([*ssh, '--worker=all']) + ' ' + shlex.quote(f'--command={remote}')

  def train(self, argv: Sequence[str]) -> str:
    if self.kind == 'tpu_vm':
      return self._tpu_vm(argv)
    if self.kind == 'multiprocess_gpu':
      flags = ['--multiprocess_gpu', f'--coordinator_address={self.coordinator_address}',
               f'--process_count={self.process_count}']
      return command_line([*argv, *flags]) + f' --process_index="{PROCESS_INDEX}"'
    return command_line(argv)

  def eval(self, argv: Sequence[str]) -> str:
    if self.kind == 'tpu_vm':
      return self._tpu_vm(argv)
    if self.kind == 'multiprocess_gpu':  # host 0 alone; the others go on to the next line
      return f'[ "{PROCESS_INDEX}" != 0 ] || {command_line(argv)}'
    return command_line(argv)


def run_commands(run: sweeps_lib.Run, sweep: sweeps_lib.Sweep, spec: benchmarks.PodSpec,
                 launch: Launch = Launch()) -> list[str]:
  """The lines printed for one run: a comment naming it, its train command (finetune runs), its
  eval command per split; a comment alone while its learning rate waits for tuning runs."""
  head = f'# {sweep.name} / {run.name}'
  if not run.resolved:
    return [f'{head}: learning rate chosen by the tuning runs of {run.lr_from!r} once they are '
            'collected; print the commands again then']
  lines = [f'{head} (run {run.key}, MODEL_DIR {spec.model_dir(run)})']
  if run.kind == 'finetune':
    lines.append(launch.train(train_argv(run, spec)))
  lines += [launch.eval(eval_argv(run, spec, split, sweep.eval_num_examples))
            for split in sweep.eval_splits]
  return lines


def _selected(pending: sweeps_lib.Run, run: sweeps_lib.Run, only: Sequence[str] | None) -> bool:
  """Whether `--run` names select this run (by its sweep name or, resolved, its rate's)."""
  return not only or pending.name in only or run.name in only


def print_commands(sweep: sweeps_lib.Sweep, spec: benchmarks.PodSpec, launch: Launch = Launch(),
                   out: Callable[[str], None] = print, only: Sequence[str] | None = None) -> None:
  """Every uncollected run's lines (`run_commands`), runs resolved from the collected results;
  only the runs `only` names, when given."""
  from experiments import runner
  for pending in sweep.runs:
    r, res = runner.resolved_result(spec.results_dir, pending, sweep)
    if res is None and _selected(pending, r, only):
      for line in run_commands(r, sweep, spec, launch):
        out(line)


# ------------------------------------------------------------------------------------------------
# Running here, one run after another
# ------------------------------------------------------------------------------------------------
class T5XCommandError(RuntimeError):
  """A T5X command exited non-zero; names the command's log file and its last lines."""


def _execute(argv: Sequence[str], log_path: str) -> None:
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  with open(log_path, 'w') as f:
    f.write(command_line(argv) + '\n')
    f.flush()
    rc = subprocess.run(list(argv), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                        check=False).returncode
  if rc:
    with open(log_path, errors='replace') as f:
      tail = ''.join(f.readlines()[-20:])
    raise T5XCommandError(f'{argv[2]} exited {rc} (log: {log_path}):\n{tail}')


def run_sweep(sweep: sweeps_lib.Sweep, spec: benchmarks.PodSpec, *, python: str = sys.executable,
              only: Sequence[str] | None = None, log: Callable[[str], None] = print
              ) -> dict[str, list[str]]:
  """Runs every uncollected run of `sweep` (those `only` names, when given) here in order
  (train, eval per split, collect); returns {'done': [...], 'skipped': [...], 'pending': [...]}
  run names. A run whose rate waits for unfinished tuning runs is pending (they come first in
  every sweep, so none is left when all run)."""
  from experiments import runner
  from experiments import t5x_collect
  benchmarks.write_spec(spec)
  out: dict[str, list[str]] = {'done': [], 'skipped': [], 'pending': []}
  for pending in sweep.runs:
    run, res = runner.resolved_result(spec.results_dir, pending, sweep)
    if not _selected(pending, run, only):
      continue
    if res is not None:
      out['skipped'].append(run.name)
      continue
    if not run.resolved:
      out['pending'].append(pending.name)
      continue
    model_dir = spec.model_dir(run)
    if run.kind == 'finetune' and not os.path.isdir(eval_checkpoint(run, spec)):
      log(f'{run.name}: t5x.train -> {model_dir}')
      _execute(train_argv(run, spec, python), os.path.join(model_dir, 'train.log'))
    step = t5x_collect.checkpoint_step_of(eval_checkpoint(run, spec))
    for split in sweep.eval_splits:
      if not t5x_collect.eval_metrics(eval_dir(spec, run, split), step):
        log(f'{run.name}: t5x.eval on {split}')
        _execute(eval_argv(run, spec, split, sweep.eval_num_examples, python),
                 os.path.join(model_dir, f'eval_{split}.log'))
    result = t5x_collect.collect_run(run, sweep, spec)
    s = result['metrics'][sweep.report_split]['summary']
    log(f'{run.name}: {sweep.report_split} {sweep.metric} {s.get(sweep.metric, float("nan")):.2f}')
    out['done'].append(run.name)
  return out


# ------------------------------------------------------------------------------------------------
# Command line (experiments.runner --backend=t5x)
# ------------------------------------------------------------------------------------------------
def define_flags() -> None:
  """The backend's flags (absl), beside the runner's."""
  from absl import flags
  if 'benchmark' in flags.FLAGS:
    return
  flags.DEFINE_enum('benchmark', 'offline_bench', list(benchmarks.BENCHMARKS),
                    '--backend=t5x: the benchmark the sweep runs on')
  flags.DEFINE_string('model_size', 't5_tiny',
                      f'--backend=t5x: gin/t5x/models/<size>.gin, one of '
                      f'{", ".join(benchmarks.model_sizes())}')
  flags.DEFINE_string('base_checkpoint', None,
                      '--backend=t5x: the T5X base checkpoint, .../checkpoint_<step>')
  flags.DEFINE_string('vocabulary', None, '--backend=t5x: local SentencePiece model of the base')
  flags.DEFINE_string('data_dir', None, '--backend=t5x: the benchmark data (XTREME-UP: the '
                      'unpacked release; seqio_mixture: T5X --tfds_data_dir)')
  flags.DEFINE_string('output_root', None, '--backend=t5x: runs and results go to '
                      '<output_root>/<benchmark>/<model_size>/{runs,results}')
  flags.DEFINE_integer('finetune_steps', None, "--backend=t5x: steps after the base's",
                       lower_bound=1)
  flags.DEFINE_string('single_task', None, "--backend=t5x: c2's single task")
  flags.DEFINE_string('mixture', None, '--benchmark=seqio_mixture: the registered mixture')
  flags.DEFINE_multi_string('task_gin', [], '--benchmark=seqio_mixture: gin files registering '
                            'its tasks (e.g. tasks/tfds_task.gin)')
  flags.DEFINE_string('metric', None, '--benchmark=seqio_mixture: the select/report metric key')
  flags.DEFINE_bool('collect', False, '--backend=t5x: collect the runs whose T5X outputs are '
                    'complete into result files (after a launcher ran the printed commands)')
  flags.DEFINE_enum('launch', 'local', ('local', 'tpu_vm', 'multiprocess_gpu'),
                    '--backend=t5x --print_commands: the launch wrapper')
  flags.DEFINE_string('tpu_name', None, '--launch=tpu_vm: the TPU VM slice')
  flags.DEFINE_string('tpu_zone', None, '--launch=tpu_vm: its zone')
  flags.DEFINE_string('tpu_project', None, '--launch=tpu_vm: its project')
  flags.DEFINE_string('remote_repo', REPO, '--launch=tpu_vm: this repository on the workers')
  flags.DEFINE_string('coordinator_address', None, '--launch=multiprocess_gpu: HOST:PORT')
  flags.DEFINE_integer('process_count', None, '--launch=multiprocess_gpu: processes (hosts)',
                       lower_bound=1)


def spec_from_flags(FLAGS) -> benchmarks.PodSpec:
  return benchmarks.PodSpec(
      benchmark=FLAGS.benchmark, model_size=FLAGS.model_size,
      base_checkpoint=FLAGS.base_checkpoint, output_root=FLAGS.output_root,
      finetune_steps=FLAGS.finetune_steps, vocabulary=FLAGS.vocabulary, data_dir=FLAGS.data_dir,
      single_task=FLAGS.single_task, mixture=FLAGS.mixture, task_gin=tuple(FLAGS.task_gin),
      metric=FLAGS.metric, eval_examples=FLAGS.eval_examples, bindings=tuple(FLAGS.binding))


def main(FLAGS) -> None:
  """`experiments.runner --backend=t5x`: print the sweeps' commands or run them here. Raises
  benchmarks.SpecError (a usage error) for a missing or bad setting."""
  spec = spec_from_flags(FLAGS)
  launch = Launch(FLAGS.launch, FLAGS.tpu_name, FLAGS.tpu_zone, FLAGS.tpu_project,
                  FLAGS.remote_repo, FLAGS.coordinator_address, FLAGS.process_count)
  sweeps = [benchmarks.pod_sweep(name, spec) for name in FLAGS.sweep]
  if FLAGS.list_runs:
    from experiments import runner
    for sweep in sweeps:
      for pending in sweep.runs:
        r, res = runner.resolved_result(spec.results_dir, pending, sweep)
        print(f'{"done" if res is not None else "todo"}  {r.key if r.resolved else "-" * 12}  '
              f'{sweep.name} / {r.name}')
    return
  if FLAGS.print_commands:
    benchmarks.write_spec(spec)
    for sweep in sweeps:
      print_commands(sweep, spec, launch, only=FLAGS.run)
    return
  if FLAGS.collect:
    from experiments import t5x_collect
    for sweep in sweeps:
      out = t5x_collect.collect_sweep(sweep, spec)
      print(f'sweep {sweep.name}: {len(out["collected"])} run(s) collected, '
            f'{len(out["missing"])} without complete T5X outputs; report: python -m '
            f'experiments.report --results_dir={spec.results_dir} --sweep={sweep.name}')
    return
  if launch.kind != 'local':
    raise benchmarks.SpecError(f'--launch={launch.kind} only prints commands: add '
                               '--print_commands (runs here use --launch=local)')
  for sweep in sweeps:
    try:
      out = run_sweep(sweep, spec, only=FLAGS.run)
    except T5XCommandError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)
    print(f'sweep {sweep.name} ({spec.benchmark}, {spec.model_size}): {len(out["done"])} run(s) '
          f'done now, {len(out["skipped"])} already collected, {len(out["pending"])} waiting; '
          f'report: python -m experiments.report --results_dir={spec.results_dir} '
          f'--sweep={sweep.name}')
