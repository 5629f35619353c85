r"""Write predictions of a trained run for a task/mixture split as JSONL.

  python -m sira_jax.infer --gin_file=runs/infer.gin --gin.MODEL_DIR=/tmp/sira_run \
    --gin.MIXTURE_OR_TASK_NAME=offline_suite_mix --gin.SPLIT=test

One line per example: {"task", "index", "inputs", "targets", "prediction"} (decoded text), written to
`<output_dir or MODEL_DIR/infer>/<task>_<split>_<step>.jsonl`.
"""

from __future__ import annotations

if __name__ == '__main__':
  # Run the CLI from the importable module `sira_jax.infer`, so gin registers its configurables once
  # (not a second time as `__main__.*`).
  from sira_jax import infer as _module  # pylint: disable=import-self
  _module.cli()

import json
import os
from typing import Any, Callable, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
from absl import flags

from sira_jax import data as data_lib
from sira_jax import train as train_lib  # imported before gin locks: it registers configurables

PyTree = Any


def make_predict_fn(model, variables: Mapping[str, Any], *, max_decode_length: int,
                    method: str = 'greedy', num_beams: int = 4
                    ) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
  """`batch -> predicted target tokens [B, max_decode_length]` (0-padded after EOS).

  Uses the network's cached decoding (`sira_jax.t5.decoding.predict_batch`, jitted there); routing
  runs in eval mode (eval capacity factor, no expert dropout).
  """
  from sira_jax.t5 import decoding  # pylint: disable=import-outside-toplevel
  variables = {k: v for k, v in variables.items() if k not in ('cache', 'intermediates')}

  def predict(batch):
    out = decoding.predict_batch(
        model, variables, {'encoder_input_tokens': jnp.asarray(batch['encoder_input_tokens'])},
        max_decode_length=max_decode_length, method=method, num_beams=num_beams)
    return np.asarray(jax.device_get(out))

  return predict


def seqio_predict_fn(predict: Callable, batch_size: int):
  """Adapts `predict` to seqio.Evaluator: enumerated dataset -> [(index, tokens [L])]."""

  def fn(ds, model_feature_shapes=None):
    del model_feature_shapes
    out = []
    for batch in ds.batch(batch_size).as_numpy_iterator():
      idx, feats = batch
      n = len(idx)
      feats = {k: v for k, v in feats.items()}
      if n < batch_size:
        feats = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
                 for k, v in feats.items()}
      toks = predict(feats)[:n]
      for i, t in zip(idx, toks):
        # Fixed-length rows (0 after EOS): seqio needs equal-length arrays and cuts at EOS itself.
        out.append((int(i), np.asarray(t)))
    return out

  return fn


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


@gin.configurable
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
) -> list[str]:
  """Writes one JSONL file per task of the mixture; returns their paths."""
  mt = data_lib.get_mixture_or_task(mixture_or_task_name)
  model, variables, _, step = train_lib.load_trained(model_dir, checkpoint_step)
  lengths = dict(task_feature_lengths)
  predict = make_predict_fn(model, variables, max_decode_length=lengths['targets'],
                            method=decode_method)
  output_dir = output_dir or os.path.join(model_dir, 'infer')
  os.makedirs(output_dir, exist_ok=True)
  tasks = seqio.get_subtasks(mt)
  paths = []
  conv = data_lib.feature_converter(False)
  for task in tasks:
    if split not in task.splits:
      continue
    ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1, use_cached=False)
    if num_examples:
      ds = ds.take(num_examples)
    examples = list(ds.as_numpy_iterator())
    model_ds = conv(ds, lengths)
    vocab = _task_vocab(task)
    path = os.path.join(output_dir, f'{task.name}_{split}_{step}.jsonl')
    with open(path, 'w') as f:
      i = 0
      for batch in data_lib.eval_batches(model_ds, batch_size):
        n = batch.pop('num_real')
        toks = predict(batch)[:n]
        for t in toks:
          ex = examples[i]
          rec = dict(task=task.name, index=i, inputs=_text(ex, 'inputs', vocab),
                     targets=_text(ex, 'targets', vocab), prediction=vocab.decode(_strip(t)))
          f.write(json.dumps(rec, ensure_ascii=False) + '\n')
          i += 1
    paths.append(path)
  return paths


def _text(ex, key, vocab):
  pre = ex.get(f'{key}_pretokenized')
  if pre is not None:
    return pre.decode('utf-8') if isinstance(pre, bytes) else str(pre)
  return vocab.decode(_strip(ex[key]))


def main(argv):
  del argv
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  gin_utils.run_gin_command(infer, lambda paths: print('\n'.join(paths)))



def cli():
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  gin_utils.define_gin_flags()
  gin_utils.run(main)
