r"""Write predictions of a trained run for a task/mixture split as JSONL.

  python -m sira_jax.infer --gin_file=runs/infer.gin --gin.MODEL_DIR=/tmp/sira_run \
    --gin.MIXTURE_OR_TASK_NAME=offline_suite_mix --gin.SPLIT=test

One line per example: {"task", "index", "inputs", "targets", "prediction"} (decoded text), written to
`<output_dir or MODEL_DIR/infer>/<task>_<split>_<step>.jsonl` (`-2`, `-3`, ... before `.jsonl`
when that name is taken: no earlier output is overwritten). The model is the run's: a model or
adapter setting given here that disagrees with it is refused, as is a checkpoint holding NaN or
inf. A user error prints one line and exits 2.
"""

from __future__ import annotations

if __name__ == '__main__':
  # Run the CLI from the importable module `sira_jax.infer`, so gin registers its configurables once
  # (not a second time as `__main__.*`).
  from sira_jax import gin_utils as _gin_utils
  _gin_utils.exit_if_help(__doc__, ('runs/infer.gin',))
  _gin_utils.import_tensorflow_quietly()
  from sira_jax import infer as _module
  _module.cli()

import json
import os
import sys
from typing import Any, Callable, Collection, Mapping

import gin
import numpy as np
import seqio

from sira_jax import data as data_lib
from sira_jax import predict as predict_lib
from tasks import truncation


def _strip(tokens) -> list[int]:
  """Tokens up to (excluding) the first EOS (1) or padding (0)."""
  res = []
  for t in np.asarray(tokens).tolist():
    if t in (0, 1):
      break
    res.append(int(t))
  return res


def _task_vocab(task: seqio.Task) -> seqio.Vocabulary:
  return task.output_features['targets'].vocabulary


@gin.configurable(denylist=['predict', 'configured_fields'])
def infer(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    split: str = 'test',
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    batch_size: int = 16,
    checkpoint_step: int | None = None,
    output_dir: str | None = None,
    num_examples: int | None = None,
    decode_method: str = 'greedy',
    progress_bar: bool = True,
    predict: Any = None,
    configured_fields: Collection[str] = (),
) -> list[str]:
  """Writes one JSONL file per task of the mixture; returns their paths.

  Shows a progress bar over examples (its total grows as each task is read), prints a summary,
  and warns when predictions are empty or examples were truncated to `task_feature_lengths`.
  The output directory is checked before the model is loaded; an existing file of the same name
  is kept (the new one is `<task>_<split>_<step>-2.jsonl`, ...). predict: optional
  `batch -> tokens [B, L]` used instead of the run's model (step 0). configured_fields: T5Config
  fields set in gin, which must agree with the run.
  """
  from tqdm.auto import tqdm
  output_dir = output_dir or os.path.join(model_dir, 'infer')
  predict_lib.check_output_dir(output_dir, 'the infer output directory')
  run = predict_lib.load_predictor(model_dir, mixture_or_task_name, task_feature_lengths,
                                   checkpoint_step=checkpoint_step, decode_method=decode_method,
                                   predict=predict, configured_fields=configured_fields)
  lengths, step = run.lengths, run.step
  os.makedirs(output_dir, exist_ok=True)
  subtasks = [t for t in seqio.get_subtasks(run.mixture) if split in t.splits]
  before = truncation.snapshot()
  paths, empty = [], {}
  with tqdm(total=0, desc=f'infer {split}', unit='ex', disable=not progress_bar) as bar:
    for task in subtasks:
      path = predict_lib.unique_path(os.path.join(output_dir, f'{task.name}_{split}_{step}.jsonl'))
      empty[task.name] = _write_predictions(task, split, lengths, num_examples, batch_size,
                                            run.predict, path, bar)
      paths.append(path)
  predict_lib.warn_truncated(before, lengths, f'infer {mixture_or_task_name}')
  predict_lib.warn_empty(empty, f'infer {mixture_or_task_name} {split}')
  n_empty, n = sum(e for e, _ in empty.values()), sum(t for _, t in empty.values())
  print(f'infer: {n} predictions of {len(paths)} tasks ({split}, step {step}) in {output_dir}; '
        f'{n_empty} empty', file=sys.stderr)
  return paths


def _write_predictions(task: seqio.Task, split: str, lengths: Mapping[str, int],
                       num_examples: int | None, batch_size: int, predict: Callable,
                       path: str, bar) -> tuple[int, int]:
  """Writes one task's predictions as JSONL; returns (empty predictions, predictions).

  bar: a tqdm progress bar; its total grows by the task's examples, then it advances per batch.
  """
  ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1, use_cached=False)
  if num_examples:
    ds = ds.take(num_examples)
  examples = list(ds.as_numpy_iterator())
  bar.total += len(examples)
  bar.refresh()
  model_ds = data_lib.feature_converter(False)(ds, lengths)
  vocab = _task_vocab(task)
  n_empty = i = 0
  with open(path, 'w') as f:
    for batch in data_lib.eval_batches(model_ds, batch_size):
      n = batch.pop('num_real')
      for t in predict(batch)[:n]:
        ex = examples[i]
        prediction = vocab.decode(_strip(t))
        n_empty += not prediction
        rec = dict(task=task.name, index=i, inputs=_text(ex, 'inputs', vocab),
                   targets=_text(ex, 'targets', vocab), prediction=prediction)
        f.write(json.dumps(rec, ensure_ascii=False) + '\n')
        i += 1
      bar.update(n)
  return n_empty, i


def _text(ex, key, vocab):
  pre = ex.get(f'{key}_pretokenized')
  if pre is not None:
    return pre.decode('utf-8') if isinstance(pre, bytes) else str(pre)
  return vocab.decode(_strip(ex[key]))


def main(argv):
  del argv
  from sira_jax import gin_utils
  from sira_jax.t5.config import T5Config
  gin_utils.run_gin_command(lambda: infer(configured_fields=gin_utils.bound_parameters(T5Config)),
                            lambda paths: print('\n'.join(paths)))



def cli():
  from sira_jax import gin_utils
  gin_utils.define_gin_flags()
  gin_utils.run(main)
