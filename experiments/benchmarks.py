"""The paper's sweeps (c1-c7) on a chosen benchmark and model size, as T5X runs.

One definition of each claim's runs: the sweeps of `experiments.sweeps` (methods, ranks, experts,
capacity, k, dropout, seeds, learning-rate grid, `lr_from`), translated run by run onto
  - a benchmark (`BENCHMARKS`): the bundled suite (`offline_bench`, as on CPU), XTREME-UP per task
    family (`xtreme_up_<family>`) or as the multitask mixture (`xtreme_up_multitask`), or a
    multitask mixture of registered seqio tasks (`seqio_mixture`: `--mixture`, `--task_gin`);
  - a model size (`gin/t5x/models/<size>.gin`: mt5_small .. mt5_xxl, t5_1_1_*, flan_t5_*, and the
    tiny CPU sizes), a base checkpoint, a vocabulary, a data directory and an output root, all
    from the command line (`PodSpec`; nothing defaults to a bucket or a hub).
The translated sweep is a `sweeps.Sweep` of the same points, seeds and `lr_from` links, so the
runner's and report's rules (`Sweep.tuning_runs`, `sweeps.chosen_learning_rate`) choose its rates
as they do on CPU. Only the gin files and bindings change (`t5x_run`): the CPU benchmark's files
become T5X's `t5x/models`, `t5x/adapters`, `t5x/runs`, `t5x/tasks` files; bindings map one to one
(`LossConfig.aux_factor` -> AUX_LOSS_FACTOR, the single task of c2 -> TASK_NAME); a binding of
the project trainer alone (`train.*`) is refused.

Directories, keyed by benchmark and model size (never mixed with the CPU results):
`<output_root>/<benchmark>/<model_size>/runs/<run key>/` (each run's T5X MODEL_DIR, its eval
output dirs beside the checkpoints) and `.../results/` (the result files, `experiments.report
--results_dir`; `spec.json` there records the spec the sweeps are rebuilt from).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

from experiments import sweeps as sweeps_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T5X_GIN_DIR = os.path.join(REPO, 'gin', 't5x')
SPEC = 'spec.json'
# The claims with a T5X translation (sira_defaults tunes the project trainer's router rate).
CLAIMS = ('c1', 'c2', 'c3', 'c4', 'c5', 'c6', 'c7')


def model_sizes() -> list[str]:
  """The sizes with a T5X model file (`gin/t5x/models/<size>.gin`)."""
  return sorted(f[:-4] for f in os.listdir(os.path.join(T5X_GIN_DIR, 'models'))
                if f.endswith('.gin') and f not in ('t5_architecture.gin', 'sentencepiece.gin'))


# Sizes whose vocabulary is the bytes (no VOCABULARY_PATH).
BYTE_SIZES = ('t5_tiny', 't5_1_1_tiny')


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """What a sweep trains and scores: T5X task gin files and TASK_NAME (`mixture`), the task c2
  fine-tunes alone (`single_task`; None: `--single_task` names it), the select/report metric
  (a key of the tasks' seqio metrics, higher is better) and how `--data_dir` reaches the tasks:
  a gin macro, or T5X's `--tfds_data_dir` flag."""
  name: str
  task_gin: tuple[str, ...]
  mixture: str
  metric: str
  single_task: str | None = None
  data_dir_macro: str | None = None
  tfds_data_dir: bool = False
  extra_gin: tuple[str, ...] = ()


# XTREME-UP families with generation tasks and one seqio metric key each (`tasks.metrics`): the
# official metric, except transliteration's CER (lower is better: the selection rule takes the
# highest), which selects on `XTREME_UP_SCORE` as the multitask mixture does; retrieval (MRR over
# an index) is no sweep.
XTREME_UP_SCORE = 'xtreme_up_score'
XTREME_UP_METRIC = {'translation': 'chrf', 'transliteration': XTREME_UP_SCORE,
                    'ner': 'span_f1', 'semantic_parsing': 'sequence_accuracy',
                    'qa_in_lang': 'f1', 'qa_cross_lang': 'f1', 'autocomplete': 'accuracy_at_1'}
# Per task, the key of its official metric and its sign for XTREME_UP_SCORE (CER: 100 - CER).
OFFICIAL_KEYS = {'chrf': 1, 'cer': -1, 'span_f1': 1, 'sequence_accuracy': 1, 'f1': 1,
                 'accuracy_at_1': 1, 'top3_accuracy': 1}


def xtreme_up_score(task_metrics: Mapping[str, Mapping[str, float]]) -> float | None:
  """The mean over tasks of each task's official metric on a higher-is-better 0-100 scale
  (CER enters as 100 - CER): what a benchmark with mixed metrics (the multitask mixture,
  transliteration) selects on. None when a task has no official metric."""
  vals = []
  for metrics in task_metrics.values():
    keys = [k for k in OFFICIAL_KEYS if k in metrics]
    if not keys:
      return None
    k = keys[0]
    vals.append(metrics[k] if OFFICIAL_KEYS[k] > 0 else 100.0 - metrics[k])
  return sum(vals) / len(vals) if vals else None


def _xtreme_up(name: str, mixture: str, metric: str) -> Benchmark:
  return Benchmark(name, ('t5x/tasks/xtreme_up.gin',), mixture, metric,
                   data_dir_macro='XTREME_UP_DATA_DIR')


def benchmarks() -> dict[str, Benchmark]:
  """Every benchmark by name (`--benchmark`)."""
  out = {'offline_bench': Benchmark('offline_bench', ('t5x/tasks/offline_suite.gin',),
                                    'offline_bench', 'sequence_accuracy',
                                    single_task='offline_unit_ru')}
  for family, metric in XTREME_UP_METRIC.items():
    out[f'xtreme_up_{family}'] = _xtreme_up(f'xtreme_up_{family}', f'xtreme_up_{family}', metric)
  out['xtreme_up_multitask'] = _xtreme_up('xtreme_up_multitask', 'xtreme_up_multitask',
                                          XTREME_UP_SCORE)
  # A mixture of any registered seqio tasks: --mixture names it, --task_gin adds the gin files
  # that register its tasks (e.g. tasks/tfds_task.gin), --data_dir is T5X's --tfds_data_dir.
  out['seqio_mixture'] = Benchmark('seqio_mixture', ('t5x/tasks/offline_suite.gin',), '',
                                   'sequence_accuracy', tfds_data_dir=True)
  return out


BENCHMARKS = benchmarks()


class SpecError(ValueError):
  """A missing or inconsistent setting; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class PodSpec:
  """Everything a pod sweep takes from the command line.

  benchmark / model_size: names in `BENCHMARKS` / `model_sizes()`. base_checkpoint: a T5X
  checkpoint directory (`.../checkpoint_<step>`; its step starts the run, T5X steps are
  absolute). vocabulary: a local SentencePiece model (not for byte sizes). data_dir: the
  benchmark's data. output_root: where the runs and results go. finetune_steps: steps after the
  base's. single_task: c2's task; mixture / task_gin / metric: the seqio_mixture benchmark's.
  eval_examples: per task and split (None: all). bindings: extra gin bindings for every run.
  """
  benchmark: str
  model_size: str
  base_checkpoint: str
  output_root: str
  finetune_steps: int
  vocabulary: str | None = None
  data_dir: str | None = None
  single_task: str | None = None
  mixture: str | None = None
  task_gin: tuple[str, ...] = ()
  metric: str | None = None
  eval_examples: int | None = None
  bindings: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, 'task_gin', tuple(self.task_gin))
    object.__setattr__(self, 'bindings', tuple(self.bindings))
    if self.benchmark not in BENCHMARKS:
      raise SpecError(f'--benchmark={self.benchmark}: no such benchmark; known: '
                      f'{", ".join(BENCHMARKS)}')
    if self.model_size not in model_sizes():
      raise SpecError(f'--model_size={self.model_size}: no gin/t5x/models/{self.model_size}.gin;'
                      f' known: {", ".join(model_sizes())}')
    for flag, value in (('base_checkpoint', self.base_checkpoint),
                        ('output_root', self.output_root)):
      if not value:
        raise SpecError(f'--{flag} is required with --backend=t5x (nothing defaults to a bucket '
                        'or a hub)')
    if not self.finetune_steps or self.finetune_steps < 1:
      raise SpecError('--finetune_steps is required with --backend=t5x (fine-tuning steps after '
                      "the base checkpoint's)")
    if self.model_size not in BYTE_SIZES and not self.vocabulary:
      raise SpecError(f'--vocabulary is required for --model_size={self.model_size}: the local '
                      "SentencePiece model of the base checkpoint (its 'spiece.model')")
    if BENCHMARKS[self.benchmark].data_dir_macro and not self.data_dir:
      raise SpecError(f'--data_dir is required for --benchmark={self.benchmark} (e.g. the '
                      'unpacked xtreme-up-v1.1.jsonl release)')
    if self.benchmark == 'seqio_mixture' and not self.mixture:
      raise SpecError('--mixture is required for --benchmark=seqio_mixture (a registered seqio '
                      'mixture; --task_gin adds the gin files that register its tasks)')
    checkpoint_step(self.base_checkpoint)

  @property
  def bench(self) -> Benchmark:
    b = BENCHMARKS[self.benchmark]
    if self.benchmark == 'seqio_mixture':
      b = dataclasses.replace(b, mixture=self.mixture, metric=self.metric or b.metric,
                              extra_gin=self.task_gin)
    if self.single_task:
      b = dataclasses.replace(b, single_task=self.single_task)
    return b

  @property
  def root(self) -> str:
    """`<output_root>/<benchmark>/<model_size>`: this spec's runs and results."""
    name = self.benchmark if self.benchmark != 'seqio_mixture' else f'seqio_{self.mixture}'
    return os.path.join(os.path.abspath(self.output_root), name, self.model_size)

  @property
  def results_dir(self) -> str:
    return os.path.join(self.root, 'results')

  def model_dir(self, run: sweeps_lib.Run) -> str:
    return os.path.join(self.root, 'runs', run.key)

  @property
  def base_step(self) -> int:
    return checkpoint_step(self.base_checkpoint)

  @property
  def train_steps(self) -> int:
    """T5X's absolute TRAIN_STEPS: the base's step + `finetune_steps`."""
    return self.base_step + self.finetune_steps

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'PodSpec':
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def checkpoint_step(path: str) -> int:
  """The step of a T5X checkpoint directory `.../checkpoint_<step>`; SpecError otherwise."""
  m = re.fullmatch(r'checkpoint_(\d+)', os.path.basename(os.path.normpath(path)))
  if not m:
    raise SpecError(f'--base_checkpoint={path}: expected a T5X checkpoint directory '
                    "'.../checkpoint_<step>' (T5X steps are absolute: fine-tuning continues "
                    'from that step)')
  return int(m.group(1))


# ------------------------------------------------------------------------------------------------
# Translating a CPU run into a T5X run
# ------------------------------------------------------------------------------------------------
# The CPU benchmark's run files -> T5X's (the model and task files are added per spec).
T5X_RUN_GIN = {sweeps_lib.FINETUNE_GIN: 't5x/runs/finetune.gin',
               sweeps_lib.FULL_FINETUNE_GIN: 't5x/runs/full_finetune.gin'}
T5X_ADAPTER_GIN = {f: f't5x/{f}' for f in sweeps_lib.ADAPTER_GIN.values()}
# Project-trainer bindings -> T5X macro (the rest are macros or AdapterConfig bindings both read).
RENAMED = {'LossConfig.aux_factor': 'AUX_LOSS_FACTOR'}


def _translate_binding(b: str, bench: Benchmark, run_name: str) -> str:
  name, value = (s.strip() for s in b.split('=', 1))
  if name == 'MIXTURE_OR_TASK_NAME':  # c2's single task
    if not bench.single_task:
      raise SpecError(f'run {run_name!r} trains a single task: --single_task names it for '
                      f'--benchmark={bench.name}')
    return f"TASK_NAME='{bench.single_task}'"
  if name in RENAMED:
    return f'{RENAMED[name]}={value}'
  if name.startswith('train.'):
    raise SpecError(f'run {run_name!r} binds {b!r}, a setting of the project trainer with no '
                    'T5X equivalent')
  return f'{name}={value}'


def t5x_run(run: sweeps_lib.Run, spec: PodSpec) -> sweeps_lib.Run:
  """`run` (a CPU sweep's) with T5X gin files and bindings: model size, adapter, run and task
  files; its bindings translated (`_translate_binding`), the spec's bindings (vocabulary, data
  directory, task, base checkpoint, steps) first so the run's own win. Same point, seed, learning
  rate, axes, kind and `lr_from`."""
  bench = spec.bench
  files = [f't5x/models/{spec.model_size}.gin']
  adapter = None
  for f in run.gin_files:
    if f in T5X_ADAPTER_GIN:
      adapter = f
      files.append(T5X_ADAPTER_GIN[f])
  if run.kind == 'finetune':
    runs_gin = [T5X_RUN_GIN[(f,)] for f in run.gin_files if (f,) in T5X_RUN_GIN]
    if len(runs_gin) != 1:
      raise SpecError(f'run {run.name!r}: no T5X run file for {run.gin_files}')
    files += runs_gin
  files += [*bench.task_gin, *bench.extra_gin]
  common = [f"TASK_NAME='{bench.mixture}'"]
  if spec.vocabulary:
    common.append(f"VOCABULARY_PATH='{spec.vocabulary}'")
  if bench.data_dir_macro and spec.data_dir:
    common.append(f"{bench.data_dir_macro}='{spec.data_dir}'")
  if run.kind == 'finetune':
    common += [f"INITIAL_CHECKPOINT_PATH='{spec.base_checkpoint}'",
               f'TRAIN_STEPS={spec.train_steps}']
    if adapter == sweeps_lib.ADAPTER_GIN['smoe_dropout']:
      common.append(f'SMOE_SCHEDULE_STEPS={spec.finetune_steps}')
  own = [_translate_binding(b, bench, run.name) for b in run.bindings]
  if any(b.startswith('TASK_NAME=') for b in own):  # c2: the single task, not the mixture
    common = common[1:]
  bindings = [*common, *own, *spec.bindings]
  return dataclasses.replace(run, gin_files=tuple(files), bindings=tuple(bindings))


def pod_sweep(name: str, spec: PodSpec) -> sweeps_lib.Sweep:
  """Claim `name`'s sweep (`sweeps.SWEEPS`) on the spec's benchmark and size: the same points,
  seeds, rates and rules, T5X runs (`t5x_run`), the benchmark's metric, no CPU base."""
  if name not in CLAIMS:
    raise SpecError(f'--sweep={name}: the T5X backend runs the claims {", ".join(CLAIMS)}')
  cpu = sweeps_lib.get_sweep(name)
  return dataclasses.replace(
      cpu, runs=tuple(t5x_run(r, spec) for r in cpu.runs), base_gin=(), base_bindings=(),
      metric=spec.bench.metric, eval_num_examples=spec.eval_examples,
      extra_bindings=spec.bindings)


def write_spec(spec: PodSpec) -> str:
  """Records `spec` in its results dir (what `experiments.report` rebuilds the sweeps from)."""
  path = os.path.join(spec.results_dir, SPEC)
  os.makedirs(spec.results_dir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(spec.as_dict(), f, indent=1, sort_keys=True)
  return path


def read_spec(results_dir: str) -> PodSpec | None:
  """The spec recorded in `results_dir` (a pod sweep's), else None (a CPU results dir)."""
  path = os.path.join(results_dir, SPEC)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return PodSpec.from_dict(json.load(f))




# ------------------------------------------------------------------------------------------------
# Cost of a sweep (the README's table)
# ------------------------------------------------------------------------------------------------
def train_flops_per_example(cfg, input_length: int, target_length: int, full: bool) -> float:
  """Training FLOPs of one example (`cfg` a `T5Config`): forward 2 x (encoder weights x input
  tokens + decoder weights and the logits projection x target tokens); the backward pass doubles
  it for the activation gradients and, in full fine-tuning only, again for the weight gradients
  (adapters: a frozen base, their own work is under 1% and left out). Attention scores and the
  embedding lookup are left out."""
  attn = 4 * cfg.d_model * cfg.num_heads * cfg.d_kv
  mlp = (len(cfg.mlp_activations) + 1) * cfg.d_model * cfg.d_ff
  encoder = cfg.num_encoder_layers * (attn + mlp)
  decoder = cfg.num_decoder_layers * (2 * attn + mlp) + cfg.d_model * cfg.vocab_size
  forward = 2 * (encoder * input_length + decoder * target_length)
  return forward * (3 if full else 2)


def sweep_device_hours(sweep: sweeps_lib.Sweep, cfg, *, batch_size: int, input_length: int,
                       target_length: int, finetune_steps: int,
                       flops_per_s: float, utilization: float) -> float:
  """Device-hours of a sweep's training runs (`train_flops_per_example` x batch x steps per run,
  full fine-tuning for the ceiling's runs; floor runs and evaluation not counted) at
  `utilization` x `flops_per_s` per device."""
  total = 0.0
  for run in sweep.runs:
    if run.kind != 'finetune':
      continue
    full = any(f in (sweeps_lib.FULL_FINETUNE_GIN[0], T5X_RUN_GIN[sweeps_lib.FULL_FINETUNE_GIN])
               for f in run.gin_files)
    total += (train_flops_per_example(cfg, input_length, target_length, full) * batch_size *
              finetune_steps)
  return total / (flops_per_s * utilization) / 3600.0
