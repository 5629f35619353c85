"""Prediction shared by eval and infer: a run's model as `batch -> tokens`, batching for seqio,
and the setup and warnings both commands share.

  run = load_predictor(model_dir, 'offline_suite_mix', {'inputs': 128, 'targets': 160})
  tokens = run.predict(batch)      # [B, targets length], 0-padded after EOS
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Collection, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from absl import logging

import tasks
from sira_jax import data as data_lib
from sira_jax import restore
from sira_jax import run_dir
from tasks import truncation

PyTree = Any


@dataclasses.dataclass
class RunPredictor:
  """A run's model ready to predict on a task or mixture (eval and infer's common setup)."""
  mixture: seqio.Task | seqio.Mixture
  lengths: dict[str, int]
  predict: Callable[[Mapping[str, np.ndarray]], np.ndarray]
  step: int


def load_predictor(model_dir: str, mixture_or_task_name: str,
                   task_feature_lengths: Mapping[str, int], *, checkpoint_step: int | None = None,
                   decode_method: str = 'greedy', predict: Callable | None = None,
                   configured_fields: Collection[str] = ()) -> RunPredictor:
  """Registers the run's tasks as training registered them (its run_config.json), looks up the
  mixture (a clear error for unknown names), reads every data file it reads (`tasks.check_data`)
  and restores the run's model at `checkpoint_step` (latest intact by default; a non-finite one is
  refused). configured_fields: the T5Config fields the user set in gin; each must agree with the
  run (`check_model_settings`). predict: `batch -> tokens [B, L]` to use instead (step 0)."""
  data_lib.register_run_tasks(os.path.join(model_dir, run_dir.RUN_CONFIG))
  mixture = data_lib.get_mixture_or_task(mixture_or_task_name)
  tasks.check_data(mixture_or_task_name)
  if predict is None:
    check_model_settings(model_dir, configured_fields)
  lengths = dict(task_feature_lengths)
  step = 0
  if predict is None:
    model, variables, _, step = restore.load_trained(model_dir, checkpoint_step)
    predict = make_predict_fn(model, variables, max_decode_length=lengths['targets'],
                              method=decode_method)
  return RunPredictor(mixture=mixture, lengths=lengths, predict=predict, step=step)


def check_model_settings(model_dir: str, configured_fields: Collection[str]):
  """Refuses model settings given to eval or infer (gin files or bindings of T5Config: a model or
  adapter gin file, a macro such as NUM_EXPERTS) that disagree with the trained run: eval and
  infer take the model from the run, so such a setting would be silently ignored. ConfigError
  names each field with the run's and the given value."""
  if not configured_fields:
    return
  from sira_jax import model_init
  from sira_jax.t5.config import T5Config
  run = run_dir.read_run_config(model_dir)['model_config']
  given = model_init.config_to_dict(T5Config())  # gin's bindings applied
  fields = sorted(configured_fields)
  diff = run_dir.dict_diff({f: run.get(f) for f in fields}, {f: given.get(f) for f in fields})
  if diff:
    raise run_dir.ConfigError(
        f'the model settings given disagree with the run in {model_dir} (run -> given): {diff}. '
        'Eval and infer take the model from the run: drop these settings (no model or adapter '
        'gin file is needed), or train a run with them.')


def check_output_dir(path: str, what: str):
  """An output directory must be a directory or creatable as one (checked before any model is
  loaded); `what` names it in the error."""
  run_dir.check_dir_path(os.path.abspath(path), what)


def unique_path(path: str) -> str:
  """`path`, or when a file of that name exists `<stem>-2<ext>`, `<stem>-3<ext>`, ...: the first
  name not taken, so no earlier result is overwritten."""
  stem, ext = os.path.splitext(path)
  n = 1
  while os.path.exists(path):
    n += 1
    path = f'{stem}-{n}{ext}'
  return path


def warn_truncated(before: Mapping[str, Any], lengths: Mapping[str, int], where: str
                   ) -> str | None:
  """Warns (and returns the message) when examples were truncated to `lengths` since the
  `tasks.truncation.snapshot()` `before`."""
  cut = truncation.message(truncation.since(before), lengths, where)
  if cut:
    logging.warning('%s', cut)
  return cut


def make_predict_fn(model, variables: Mapping[str, Any], *, max_decode_length: int,
                    method: str = 'greedy', num_beams: int = 4
                    ) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
  """`batch -> predicted target tokens [B, max_decode_length]` (0-padded after EOS).

  Uses the network's cached decoding (`sira_jax.t5.decoding.predict_batch`, jitted there); routing
  runs in eval mode (eval capacity factor, no expert dropout).
  """
  from sira_jax.t5 import decoding
  variables = {k: v for k, v in variables.items() if k not in ('cache', 'intermediates')}

  def predict(batch):
    out = decoding.predict_batch(
        model, variables, {'encoder_input_tokens': jnp.asarray(batch['encoder_input_tokens'])},
        max_decode_length=max_decode_length, method=method, num_beams=num_beams)
    return np.asarray(jax.device_get(out))

  return predict


def seqio_predict_fn(predict: Callable, batch_size: int,
                     on_batch: Callable[[int], Any] | None = None):
  """Adapts `predict` to seqio.Evaluator: enumerated dataset -> [(index, tokens [L])].

  on_batch(n) is called after each batch of n real examples (a progress bar's update). The
  numpy batches of a dataset are read once per process (`_padded_batches`): a cached Evaluator
  passes the same datasets to every run of a sweep.
  """

  def fn(ds, model_feature_shapes=None):
    del model_feature_shapes
    out = []
    for idx, feats, n in _padded_batches(ds, batch_size):
      toks = predict(feats)[:n]
      for i, t in zip(idx, toks):
        # Fixed-length rows (0 after EOS): seqio needs equal-length arrays and cuts at EOS itself.
        out.append((int(i), np.asarray(t)))
      if on_batch is not None:
        on_batch(n)
    return out

  return fn


def _padded_batches(ds, batch_size: int) -> list[tuple[np.ndarray, dict[str, np.ndarray], int]]:
  """[(example indices, features padded to `batch_size` rows, number of real rows)] of a finite
  enumerated dataset, read-only and cached per dataset object and batch size
  (`data.cached_eval_batches`), so a dataset an Evaluator caches is batched once (a new tf.data
  iterator per task costs ~0.1 s)."""
  def build():
    batches = []
    for idx, feats in ds.batch(batch_size).as_numpy_iterator():
      feats = data_lib.pad_rows(feats, batch_size)
      for v in (idx, *feats.values()):
        v.setflags(write=False)
      batches.append((idx, feats, len(idx)))
    return batches
  return data_lib.cached_eval_batches(ds, ('padded', batch_size), build)


def warn_empty(empty: Mapping[str, tuple[int, int]], where: str) -> str | None:
  """Warns (and returns the message) when any task has empty predictions."""
  bad = {t: c for t, c in empty.items() if c[0]}
  if not bad:
    return None
  n, total = sum(c[0] for c in bad.values()), sum(c[1] for c in empty.values())
  shown = ', '.join(f'{t} {e}/{n_t}' for t, (e, n_t) in sorted(bad.items())[:10])
  msg = (f'{where}: {n} of {total} predictions are empty ({shown}'
         f'{", ..." if len(bad) > 10 else ""}): the model emits EOS first; it may need more '
         'training or a base checkpoint.')
  logging.warning('%s', msg)
  return msg
