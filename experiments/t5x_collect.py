"""Read a T5X run's outputs back into the result file the CPU sweeps write (`experiments.runner`).

What T5X wrote, per run (`experiments.t5x_backend` lays it out):
  - `<MODEL_DIR>/config.gin`: the operative gin config (`t5x.gin_utils.summarize_gin_config`);
    its macros give the task, lengths, seed, learning rate and adapter settings;
  - `<MODEL_DIR>/train/events.out.tfevents.*`: train summaries (loss, cross_entropy, accuracy,
    the routing metrics aux_loss, router_z_loss, dropped_fraction, gate_entropy,
    router_confidence, expert_usage_min/max; timing/*), one record per logged step;
  - `<MODEL_DIR>/checkpoint_<step>/`: the checkpoints;
  - `<MODEL_DIR>/model-info.txt` (t5x.train) or `<eval dir>/model-info.txt` (t5x.eval): every
    variable with its size, optimizer states under `param_states/`;
  - `<eval dir>/inference_eval/<task>-metrics.jsonl`: seqio's JSONLogger, one line per evaluated
    step, `{"step": N, "<metric>": value, ...}` per task.
`collect_run` turns these into the runner's result dict (run, config, seed, metrics per split and
task with the summary as the unweighted mean over tasks, parameter counts, the train history and
its routing metrics, wall times, provenance) and writes `<results_dir>/runs/<key>/result.json`,
so `experiments.report` reads it as a CPU run's. No number is computed that T5X did not log,
except the summaries (means over tasks), `benchmarks.xtreme_up_score` for XTREME-UP and the
parameter counts (sums of model-info.txt's sizes).
"""
from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import re
import time
from typing import Any, Mapping

import numpy as np

from experiments import benchmarks
from experiments import sweeps as sweeps_lib

CHECKPOINT_RE = re.compile(r'checkpoint_(\d+)')


class MissingOutputError(FileNotFoundError):
  """A T5X output a result needs is absent; names the path and the command that writes it."""


def checkpoint_step_of(path: str) -> int:
  return benchmarks.checkpoint_step(path)


def checkpoint_steps(model_dir: str) -> list[int]:
  """The steps of `model_dir`'s checkpoint directories (T5X's in-progress temporaries aside)."""
  if not os.path.isdir(model_dir):
    return []
  return sorted(int(m.group(1)) for m in map(CHECKPOINT_RE.fullmatch, os.listdir(model_dir))
                if m and os.path.isdir(os.path.join(model_dir, m.group(0))))


def metrics_files(eval_output_dir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(eval_output_dir, 'inference_eval', '*-metrics.jsonl')))


def eval_metrics(eval_output_dir: str, step: int) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} of the last line for `step` of each `<task>-metrics.jsonl` (numbers
  only; {} when none has that step)."""
  out = {}
  for path in metrics_files(eval_output_dir):
    task = os.path.basename(path)[:-len('-metrics.jsonl')]
    with open(path, encoding='utf-8') as f:
      rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r.get('step') == step]
    if rows:
      out[task] = {k: float(v) for k, v in rows[-1].items()
                   if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool)}
  return out


def train_summaries(model_dir: str) -> tuple[dict[str, dict[int, float]], list[str]]:
  """({tag: {step: value}} of the scalar train summaries, the event files read). T5X writes the
  gin config there too, as text: skipped."""
  import tensorflow as tf
  paths = sorted(glob.glob(os.path.join(model_dir, 'train', 'events.out.tfevents.*')))
  out: dict[str, dict[int, float]] = {}
  for path in paths:
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        value = tf.make_ndarray(v.tensor) if v.HasField('tensor') else np.float32(v.simple_value)
        if value.dtype.kind in 'fiu' and value.size == 1:
          out.setdefault(v.tag, {})[int(event.step)] = float(value)
  return out, paths


def gin_macros(config_gin: str) -> dict[str, Any]:
  """The literal macros of an operative config (`NAME = <python literal>` lines; references such
  as `@seqio.ByteVocabulary()` are left out)."""
  out = {}
  for name, value in re.findall(r'^([A-Z][A-Z0-9_]*) = (.+)$', config_gin, re.M):
    try:
      out[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      continue
  return out


def gin_bindings(config_gin: str, selector: str) -> dict[str, Any]:
  """{parameter: value} of `selector`'s bindings ('scope/Name') in an operative config, whose
  configurable names may carry their module ('adapter/sira_jax.adapters.AdapterConfig'), macros
  resolved (values that are neither a literal nor a literal macro are left out)."""
  scope, _, name = selector.rpartition('/')
  pattern = rf'^{re.escape(scope + "/" if scope else "")}(?:[\w.]+\.)?{re.escape(name)}\.(\w+) = (.+)$'
  macros = gin_macros(config_gin)
  out = {}
  for param, value in re.findall(pattern, config_gin, re.M):
    if value.startswith('%'):
      if value[1:] in macros:
        out[param] = macros[value[1:]]
      continue
    try:
      out[param] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      continue
  return out


def param_counts(model_info: str, adapter: Mapping[str, Any]) -> dict[str, int]:
  """The runner's parameter counts (`sira_jax.t5.param_count` definitions) from model-info.txt's
  variable sizes: total (every variable outside the optimizer state and the step), trainable
  (those with optimizer state under `param_states/`: the adapter-only optimizer keeps none for
  the frozen base; every parameter when there is no optimizer state, as in t5x.eval's file,
  only adapters count), active per token (experts scaled by the share one token reaches,
  `param_count._active_experts` of the run's `adapter` settings)."""
  from sira_jax.adapters import AdapterConfig, is_adapter_param
  from sira_jax.t5.param_count import _active_experts
  sizes = {name: int(size) for name, size in
           re.findall(r'^Variable (\S+)\s+size (\d+)', model_info, re.M)}
  params = {k: v for k, v in sizes.items() if not k.startswith('param_states/') and k != 'step'}
  with_state = {k.split('/', 1)[1].rsplit('/', 1)[0] for k in sizes if k.startswith('param_states/')}
  if with_state:
    trainable = sum(v for k, v in params.items() if k in with_state)
  else:
    trainable = sum(v for k, v in params.items() if is_adapter_param(k, trainable=True))
  fields = {k: v for k, v in adapter.items() if k in ('kind', 'num_experts', 'top_k',
                                                       'smoe_eval_num_experts')}
  share = _active_experts(AdapterConfig(**fields)) if fields.get('kind') else 1.0
  experts = sum(v for k, v in params.items() if k.rsplit('/', 1)[-1] in ('lora_a', 'lora_b'))
  adapters = sum(v for k, v in params.items() if is_adapter_param(k))
  total = sum(params.values())
  active = total - experts + int(round(experts * share))
  return dict(total=total, trainable=trainable, frozen=total - trainable,
              active_per_token=active, adapter_total=adapters,
              adapter_active_per_token=adapters - experts + int(round(experts * share)))


def _history(summaries: Mapping[str, Mapping[int, float]]) -> list[dict[str, float]]:
  steps = sorted({s for v in summaries.values() for s in v})
  return [dict(step=s, **{t: v[s] for t, v in summaries.items() if s in v}) for s in steps]


def split_metrics(tasks: Mapping[str, Mapping[str, float]], benchmark: str
                  ) -> dict[str, Any]:
  """{'tasks': ..., 'summary': {metric: unweighted mean over the tasks that have it}}, as
  `experiments.evaluation.evaluate_split` writes; XTREME-UP adds `benchmarks.XTREME_UP_SCORE`."""
  summary = {}
  for metric in sorted({k for m in tasks.values() for k in m}):
    summary[metric] = float(np.mean([m[metric] for m in tasks.values() if metric in m]))
  if benchmark.startswith('xtreme_up'):
    score = benchmarks.xtreme_up_score(tasks)
    if score is not None:
      summary[benchmarks.XTREME_UP_SCORE] = score
  return dict(tasks={t: dict(m) for t, m in tasks.items()}, summary=summary)


def _read(path: str, writer: str) -> str:
  if not os.path.exists(path):
    raise MissingOutputError(f'{path} is missing: {writer} writes it')
  with open(path, encoding='utf-8') as f:
    return f.read()


def collect_run(run: sweeps_lib.Run, sweep: sweeps_lib.Sweep, spec: benchmarks.PodSpec,
                write: bool = True) -> dict:
  """The result dict of one T5X run (module docstring), written to its result file when `write`.
  Raises MissingOutputError naming the first absent output (config.gin, a split's metrics for the
  evaluated checkpoint)."""
  from experiments import runner
  from experiments import t5x_backend
  model_dir = spec.model_dir(run)
  ckpt = t5x_backend.eval_checkpoint(run, spec)
  step = checkpoint_step_of(ckpt)
  metrics, files = {}, {}
  for split in sweep.eval_splits:
    out_dir = t5x_backend.eval_dir(spec, run, split)
    tasks = eval_metrics(out_dir, step)
    if not tasks:
      raise MissingOutputError(
          f'{out_dir}/inference_eval/ has no metrics for step {step} ({ckpt}): t5x.eval writes '
          f'them (python -m experiments.runner --backend=t5x --print_commands prints it)')
    metrics[split] = split_metrics(tasks, spec.benchmark)
    files[split] = metrics_files(out_dir)
  first_eval = t5x_backend.eval_dir(spec, run, sweep.eval_splits[0])
  if run.kind == 'finetune':
    config = _read(os.path.join(model_dir, 'config.gin'), 't5x.train')
    model_info = _read(os.path.join(model_dir, 'model-info.txt'), 't5x.train')
    summaries, events = train_summaries(model_dir)
  else:  # the floor: t5x.eval's own config and model info
    config = _read(os.path.join(first_eval, 'config.gin'), 't5x.eval')
    model_info = _read(os.path.join(first_eval, 'model-info.txt'), 't5x.eval')
    summaries, events = {}, []
  macros = gin_macros(config)
  adapter = gin_bindings(config, 'adapter/AdapterConfig')
  history = _history(summaries)
  steps_per_s = list(summaries.get('timing/steps_per_second', {}).values())
  uptime = summaries.get('timing/uptime', {})
  train = {}
  if run.kind == 'finetune':
    last = max(summaries.get('loss', {0: 0}))
    train = dict(steps=last, start_step=spec.base_step, history=history,
                 final_metrics=history[-1] if history else {},
                 wall_time_s=uptime[max(uptime)] if uptime else None,
                 median_step_time_s=float(np.median(1.0 / np.asarray(steps_per_s)))
                 if steps_per_s else None,
                 routing={k: summaries[k][last] for k in (
                     'aux_loss', 'router_z_loss', 'dropped_fraction', 'gate_entropy',
                     'router_confidence', 'expert_usage_min', 'expert_usage_max')
                          if last in summaries.get(k, {})})
  counts = param_counts(model_info, adapter)
  result = dict(
      run=run.as_dict(), sweep=sweep.name, mixture=macros.get('TASK_NAME'),
      task_feature_lengths=macros.get('TASK_FEATURE_LENGTHS'), gin_config=config,
      base=dict(dir=spec.base_checkpoint, step=spec.base_step),
      git_revision=runner.git_revision(), hardware=None, params=counts, train=train,
      metrics=metrics, routing=None,
      wall_time_s=dict(train=train.get('wall_time_s') or 0.0),
      backend='t5x', benchmark=spec.benchmark, model_size=spec.model_size,
      provenance=dict(
          backend='t5x', model_dir=model_dir, evaluated_checkpoint=ckpt, evaluated_step=step,
          checkpoint_steps=checkpoint_steps(model_dir), metrics_files=files,
          train_event_files=events,
          config_gin_sha1=hashlib.sha1(config.encode()).hexdigest(),
          seed=macros.get('RANDOM_SEED'), learning_rate=macros.get('LEARNING_RATE'),
          git_revision='of the checkout that collected the run (T5X records none)',
          collected=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())),
      finished=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(max(
          os.path.getmtime(p) for ps in files.values() for p in ps))))
  if write:
    runner._write_json(runner.result_path(spec.results_dir, run), result)
  return result


def collect_sweep(sweep: sweeps_lib.Sweep, spec: benchmarks.PodSpec) -> dict[str, list[str]]:
  """Collects every run of `sweep` whose outputs are complete (in order, so runs whose rate the
  tuning runs choose resolve); returns {'collected': [...], 'missing': [...]} run names."""
  from experiments import runner
  benchmarks.write_spec(spec)
  out: dict[str, list[str]] = {'collected': [], 'missing': []}
  for pending in sweep.runs:
    run, res = runner.resolved_result(spec.results_dir, pending, sweep)
    if res is not None:
      out['collected'].append(run.name)
      continue
    if not run.resolved:
      out['missing'].append(pending.name)
      continue
    try:
      collect_run(run, sweep, spec)
      out['collected'].append(run.name)
    except MissingOutputError:
      out['missing'].append(run.name)
  return out
