r"""Evaluate a trained run on a task or mixture with seqio's Evaluator and the tasks' metrics.

  python -m sira_jax.eval --gin_file=runs/eval.gin --gin.MODEL_DIR=/tmp/sira_run \
    --gin.MIXTURE_OR_TASK_NAME=offline_suite_mix

Writes `<MODEL_DIR>/eval/metrics_<task or mixture>_<step>_<split>.json` ({task: {metric: value}},
plus the summary: each metric's mean over tasks and per task family; a later evaluation of the same
step and split writes `..._<split>-2.json`, `-3`, ...: no metrics file is overwritten) and TensorBoard scalars
`eval/<task>/<metric>` into `<MODEL_DIR>/eval/`. Shows a progress bar over the examples, prints a
summary line, and warns when predictions are empty or examples were truncated to the lengths.
The tasks are registered as the training run registered them (its run_config.json), and the model
is the run's: a model or adapter setting given here (gin file or binding) that disagrees with the
run is refused, as is a checkpoint holding NaN or inf. A user error prints one line and exits 2.
"""

from __future__ import annotations

if __name__ == '__main__':
  # Run the CLI from the importable module `sira_jax.eval`, so gin registers its configurables once
  # (not a second time as `__main__.*`).
  from sira_jax import gin_utils as _gin_utils
  _gin_utils.exit_if_help(__doc__, ('runs/eval.gin',))
  _gin_utils.import_tensorflow_quietly()
  from sira_jax import eval as _module
  _module.cli()

import functools
import json
import os
import sys
from typing import Any, Collection, Mapping

import gin
import numpy as np
import seqio

import tasks
from sira_jax import data as data_lib
from sira_jax import predict as predict_lib
from tasks import truncation


def _scalar(v):
  if isinstance(v, seqio.metrics.Scalar):
    return float(v.value)
  if hasattr(v, 'value'):
    v = v.value
  try:
    return float(np.asarray(v))
  except (TypeError, ValueError):
    return None


def summarize(results: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
  """{'mean': {metric: mean over tasks}, 'families': {family: {metric: mean over its tasks}}}.

  Each mean is over the tasks that report that metric; families come from `tasks.family`.
  """
  def means(names):
    by_metric = {}
    for name in names:
      for k, v in results[name].items():
        by_metric.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in sorted(by_metric.items())}

  families = {}
  for name in results:
    families.setdefault(tasks.family(name), []).append(name)
  return {'num_tasks': len(results), 'mean': means(results),
          'families': {f: means(names) for f, names in sorted(families.items())}}


def summary_line(summary: Mapping[str, Any]) -> str:
  """One line: 'mean over N tasks: m=v ... | family: m=v ...; ...'."""
  def fmt(m):
    return ' '.join(f'{k}={v:.2f}' for k, v in m.items())
  families = '; '.join(f'{f}: {fmt(m)}' for f, m in summary['families'].items())
  return f"mean over {summary['num_tasks']} tasks: {fmt(summary['mean'])} | {families}"


def _empty_predictions(all_output) -> dict[str, tuple[int, int]]:
  """{task: (empty, total)} of the decoded predictions (empty: EOS or padding first)."""
  out = {}
  for task, outputs in all_output.items():
    preds = outputs.get(seqio.metrics.ModelOutputType.PREDICTION)
    if preds is None:
      continue
    rows = [np.asarray(p[1] if isinstance(p, tuple) else p).reshape(-1) for p in preds]
    out[task] = (sum(1 for r in rows if not r.size or r[0] in (0, 1)), len(rows))
  return out


def cached_evaluator(mixture_or_task_name: str, split: str, lengths: Mapping[str, int],
                     num_examples: int | None) -> seqio.Evaluator:
  """A seqio.Evaluator for these examples, built once per process and reused (as T5X reuses one
  Evaluator for every evaluation of a run).

  Building one preprocesses, tokenizes and caches every subtask's examples and targets (about 20 s
  for the 30-task benchmark here, most of a short model's evaluation); a sweep evaluates every run
  on the same examples. The key holds the registered mixture and subtask objects (which the
  cached Evaluator keeps alive), so re-registering a task under the same name builds a new one.
  Metrics are computed synchronously: there is nothing to close.
  """
  mixture = data_lib.get_mixture_or_task(mixture_or_task_name)
  registered = tuple(id(t) for t in [mixture, *seqio.get_subtasks(mixture)])
  return _evaluator(mixture_or_task_name, registered, split, tuple(sorted(dict(lengths).items())),
                    num_examples)


@functools.lru_cache(maxsize=4)
def _evaluator(mixture_or_task_name: str, registered: tuple[int, ...], split: str,
               lengths: tuple[tuple[str, int], ...], num_examples: int | None) -> seqio.Evaluator:
  del registered  # in the key only: the ids of the registered objects the Evaluator keeps alive
  return seqio.Evaluator(
      mixture_or_task_name=mixture_or_task_name,
      feature_converter=data_lib.feature_converter(False), eval_split=split, use_cached=False,
      seed=0, sequence_length=dict(lengths), num_examples=num_examples, use_memory_cache=True,
      async_compute_metrics=False)


@gin.configurable(denylist=['predict', 'configured_fields'])
def evaluate(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    split: str = 'validation',
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = 16,
    checkpoint_step: int | None = None,
    num_examples: int | None = None,
    decode_method: str = 'greedy',
    output_dir: str | None = None,
    tensorboard: bool = True,
    progress_bar: bool = True,
    predict: Any = None,
    configured_fields: Collection[str] = (),
) -> dict[str, dict[str, float]]:
  """Decodes `split` of every subtask, computes the tasks' metrics; returns {task: {metric: v}}.

  Every evaluation writes its own metrics file (`metrics_path`: an earlier one is never
  overwritten). predict: optional `batch -> tokens [B, L]` used instead of the run's model (step
  0). configured_fields: T5Config fields set in gin, which must agree with the run.
  """
  output_dir = output_dir or os.path.join(os.path.abspath(model_dir), 'eval')
  predict_lib.check_output_dir(output_dir, 'the eval output directory')
  run = predict_lib.load_predictor(model_dir, mixture_or_task_name, task_feature_lengths,
                                   checkpoint_step=checkpoint_step, decode_method=decode_method,
                                   predict=predict, configured_fields=configured_fields)
  lengths, step = run.lengths, run.step
  before = truncation.snapshot()
  evaluator = cached_evaluator(mixture_or_task_name, split, lengths, num_examples)
  from tqdm.auto import tqdm
  total = sum(int(ds.cardinality()) for ds in evaluator.cached_task_datasets.values())
  with tqdm(total=total if total >= 0 else None, desc=f'eval {split}', unit='ex',
            disable=not progress_bar) as bar:
    all_metrics, all_output = evaluator.evaluate(
        compute_metrics=True, step=step,
        predict_fn=predict_lib.seqio_predict_fn(run.predict, batch_size, on_batch=bar.update))
  if hasattr(all_metrics, 'result'):  # seqio returns a Future of the metrics
    all_metrics = all_metrics.result()
  predict_lib.warn_truncated(before, lengths, f'eval {mixture_or_task_name}')
  predict_lib.warn_empty(_empty_predictions(all_output), f'eval {mixture_or_task_name} {split}')
  results = {}
  for task, metrics in all_metrics.items():
    results[task] = {k: _scalar(v) for k, v in metrics.items() if _scalar(v) is not None}
  os.makedirs(output_dir, exist_ok=True)
  with open(metrics_path(output_dir, mixture_or_task_name, step, split), 'x') as f:
    json.dump({'step': step, 'split': split, 'metrics': results, 'summary': summarize(results)},
              f, indent=1, sort_keys=True)
  if tensorboard:
    from clu import metric_writers
    writer = metric_writers.create_default_writer(output_dir, asynchronous=False)
    writer.write_scalars(step, {f'eval/{t}/{k}': v for t, m in results.items()
                                for k, v in m.items()})
    writer.flush()
    writer.close()
  return results


def metrics_path(output_dir: str, mixture_or_task_name: str, step: int, split: str) -> str:
  """Where an evaluation writes its metrics: `metrics_<task or mixture>_<step>_<split>.json`, or
  for a later evaluation of the same step and split `..._<split>-2.json`, `-3`, ... (the first
  free name): every evaluation keeps its own file."""
  return predict_lib.unique_path(
      os.path.join(output_dir, f'metrics_{mixture_or_task_name}_{step}_{split}.json'))


def _report(results):
  print(json.dumps(results, indent=1, sort_keys=True))
  print(summary_line(summarize(results)), file=sys.stderr)


def main(argv):
  del argv
  from sira_jax import gin_utils
  from sira_jax.t5.config import T5Config
  gin_utils.run_gin_command(
      lambda: evaluate(configured_fields=gin_utils.bound_parameters(T5Config)), _report)



def cli():
  from sira_jax import gin_utils
  gin_utils.define_gin_flags()
  gin_utils.run(main)
