r"""Evaluate a trained run on a task or mixture with seqio's Evaluator and the tasks' metrics.

  python -m sira_jax.eval --gin_file=runs/eval.gin --gin.MODEL_DIR=/tmp/sira_run \
    --gin.MIXTURE_OR_TASK_NAME=offline_suite_mix

Writes `<MODEL_DIR>/eval/metrics_<task or mixture>_<step>_<split>.json` ({task: {metric: value}})
and TensorBoard scalars `eval/<task>/<metric>` into `<MODEL_DIR>/eval/`.
"""

from __future__ import annotations

if __name__ == '__main__':
  # Run the CLI from the importable module `sira_jax.eval`, so gin registers its configurables once
  # (not a second time as `__main__.*`).
  from sira_jax import eval as _module  # pylint: disable=import-self
  _module.cli()

import json
import os
from typing import Any, Mapping

import gin
import numpy as np
import seqio
from absl import flags

from sira_jax import data as data_lib
from sira_jax import train as train_lib  # imported before gin locks: it registers configurables
from sira_jax import infer as infer_lib


def _scalar(v):
  if isinstance(v, seqio.metrics.Scalar):
    return float(v.value)
  if hasattr(v, 'value'):
    v = v.value
  try:
    return float(np.asarray(v))
  except (TypeError, ValueError):
    return None


@gin.configurable(denylist=['predict'])
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
    predict: Any = None,
) -> dict[str, dict[str, float]]:
  """Decodes `split` of every subtask, computes the tasks' metrics; returns {task: {metric: v}}.

  predict: optional `batch -> tokens [B, L]` used instead of the run's model (step 0).
  """
  data_lib.get_mixture_or_task(mixture_or_task_name)  # clear error for unknown names
  lengths = dict(task_feature_lengths)
  evaluator = seqio.Evaluator(
      mixture_or_task_name=mixture_or_task_name,
      feature_converter=data_lib.feature_converter(False), eval_split=split, use_cached=False,
      seed=0, sequence_length=lengths, num_examples=num_examples, use_memory_cache=True,
      async_compute_metrics=False)
  if predict is None:
    model, variables, _, step = train_lib.load_trained(model_dir, checkpoint_step)
    predict = infer_lib.make_predict_fn(model, variables, max_decode_length=lengths['targets'],
                                        method=decode_method)
  else:
    step = 0
  all_metrics, _ = evaluator.evaluate(
      compute_metrics=True, step=step,
      predict_fn=infer_lib.seqio_predict_fn(predict, batch_size))
  if hasattr(all_metrics, 'result'):  # seqio returns a Future of the metrics
    all_metrics = all_metrics.result()
  evaluator.close()
  results = {}
  for task, metrics in all_metrics.items():
    results[task] = {k: _scalar(v) for k, v in metrics.items() if _scalar(v) is not None}
  output_dir = output_dir or os.path.join(os.path.abspath(model_dir), 'eval')
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, f'metrics_{mixture_or_task_name}_{step}_{split}.json'),
            'w') as f:
    json.dump({'step': step, 'split': split, 'metrics': results}, f, indent=1, sort_keys=True)
  if tensorboard:
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
    writer = metric_writers.create_default_writer(output_dir, asynchronous=False)
    writer.write_scalars(step, {f'eval/{t}/{k}': v for t, m in results.items()
                                for k, v in m.items()})
    writer.flush()
    writer.close()
  return results


def main(argv):
  del argv
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  gin_utils.run_gin_command(
      evaluate, lambda results: print(json.dumps(results, indent=1, sort_keys=True)))



def cli():
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  gin_utils.define_gin_flags()
  gin_utils.run(main)
