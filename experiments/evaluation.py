"""Scoring one trained model for a sweep: decoded metrics, teacher-forced metrics, routing analysis.

Per task of the evaluated mixture (the first `num_examples` examples of each task's split, in
order, so every method is scored on the same examples):
  - decoded (greedy) with seqio's Evaluator and the task's metric functions: sequence accuracy,
    chrF or CER (`sira_jax.eval.evaluate`);
  - teacher-forced token accuracy and cross-entropy over target tokens (no dropout, eval capacity).
`summary` holds the unweighted mean over tasks of each metric.

The routing analysis of a model with routers reads what every adapted projection sows into
'intermediates' (`sira_jax.routing.routing_statistics`): per site and per task the share of routed
choices each expert receives, the gate entropy and router confidence (eval mode), and the fraction
of choices dropped by capacity in training mode (capacity factor and expert dropout as trained) on
mixed batches of the training batch size.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import numpy as np


def subtask_names(mixture: str) -> list[str]:
  import seqio  # pylint: disable=import-outside-toplevel
  from sira_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  mt = data_lib.get_mixture_or_task(mixture)
  return [t.name for t in seqio.get_subtasks(mt)] if isinstance(mt, seqio.Mixture) else [mt.name]


def load_base(base_dir: str):
  """(model, variables, config) of a base checkpoint alone: the frozen base without adapters."""
  from sira_jax import base_checkpoint  # pylint: disable=import-outside-toplevel
  return base_checkpoint.load_base_model(base_dir)


def fitted_batch_size(batch_size: int, num_examples: int | None) -> int:
  """The eval batch size: `batch_size`, or fewer rows when a task gives at most `num_examples`
  examples (rounded up to a multiple of 8), so 50 examples are not padded to 128 rows.

  Eval routing is no-drop and per example (README), so the batch size changes no prediction.
  """
  if num_examples is None:
    return batch_size
  return max(1, min(batch_size, -(-num_examples // 8) * 8))


def _model_batches(task, lengths, split, num_examples, batch_size, *, shuffle=False, seed=0,
                   max_batches=None):
  """[(model-feature batch, number of real rows)] of a task's first `num_examples` examples (at
  most `max_batches` batches).

  Built once per process and key (`data.cached_eval_batches`; preprocessing and seqio's feature
  converter cost about 0.7 s a task here, more than scoring a short model) and reused by every
  run a sweep evaluates. The cache holds the registered task object, so re-registering a task
  under the same name rebuilds.
  """
  from sira_jax import data as data_lib  # pylint: disable=import-outside-toplevel

  def build():
    ds = task.get_dataset(dict(lengths), split=split, shuffle=shuffle, seed=seed, num_epochs=1,
                          use_cached=False)
    if num_examples:
      ds = ds.take(num_examples)
    ds = data_lib.feature_converter(False)(ds, dict(lengths))
    batches = []
    for b in data_lib.eval_batches(ds, batch_size):
      if max_batches is not None and len(batches) >= max_batches:
        break
      n = b.pop('num_real')
      batches.append((b, n))
    return batches
  key = ('model', tuple(sorted(dict(lengths).items())), split, num_examples, batch_size, shuffle,
         seed, max_batches)
  return list(data_lib.cached_eval_batches(task, key, build))


# Jitted once per model (a hashable flax module, static like `decoding.predict_batch`'s), not
# once per call: every run of a sweep with the same network reuses the compiled step.
@functools.partial(jax.jit, static_argnames=('model',))
def _teacher_forced_step(model, variables, batch):
  from sira_jax import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  return trainer_lib.make_eval_step(model, trainer_lib.LossConfig(z_loss=0.0))(variables, batch)


@functools.partial(jax.jit, static_argnames=('model',))
def _routing_forward(model, variables, batch, key=None):
  """The sown 'intermediates' of a forward pass. key None: eval mode. Otherwise train mode with
  `key` as the dropout rng: dropout, expert dropout and capacity as trained, at the end of
  training."""
  from sira_jax import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  from sira_jax.adapters import with_training_progress  # pylint: disable=import-outside-toplevel
  train = key is not None
  if train:
    variables = with_training_progress(variables, 1.0)
  _, mods = model.apply(variables, *trainer_lib.model_inputs(batch), enable_dropout=train,
                        mutable=['intermediates'], rngs={'dropout': key} if train else None)
  return mods['intermediates']


def teacher_forced(model, variables, mixture: str, lengths: Mapping[str, int], split: str, *,
                   num_examples: int | None, batch_size: int) -> dict[str, dict[str, float]]:
  """{task: {'token_accuracy': %, 'cross_entropy': nats/token}} over target tokens."""
  import seqio  # pylint: disable=import-outside-toplevel
  step = functools.partial(_teacher_forced_step, model)
  out = {}
  for name in subtask_names(mixture):
    task = seqio.get_mixture_or_task(name)
    ce = acc = tok = 0.0
    for b, _ in _model_batches(task, lengths, split, num_examples, batch_size):
      m = jax.device_get(step(variables, b))
      n = float(m['target_tokens'])
      ce, acc, tok = ce + float(m['cross_entropy']) * n, acc + float(m['accuracy']) * n, tok + n
    out[name] = dict(token_accuracy=100.0 * acc / max(tok, 1.0), cross_entropy=ce / max(tok, 1.0))
  return out


def evaluate_split(model, variables, mixture: str, lengths: Mapping[str, int], split: str, *,
                   num_examples: int | None, batch_size: int, output_dir: str) -> dict:
  """{'tasks': {task: {metric: value}}, 'summary': {metric: unweighted mean over tasks}}."""
  from sira_jax import eval as eval_lib  # pylint: disable=import-outside-toplevel
  from sira_jax import predict as predict_lib  # pylint: disable=import-outside-toplevel
  batch_size = fitted_batch_size(batch_size, num_examples)
  predict = predict_lib.make_predict_fn(model, variables, max_decode_length=lengths['targets'])
  decoded = eval_lib.evaluate(
      model_dir=output_dir, mixture_or_task_name=mixture, split=split,
      task_feature_lengths=dict(lengths), batch_size=batch_size, num_examples=num_examples,
      output_dir=output_dir, tensorboard=False, progress_bar=False, predict=predict)
  tf = teacher_forced(model, variables, mixture, lengths, split, num_examples=num_examples,
                      batch_size=batch_size)
  tasks = {t: dict(decoded.get(t, {}), **tf[t]) for t in tf}
  summary = {}
  for metric in sorted({k for m in tasks.values() for k in m}):
    vals = [m[metric] for m in tasks.values() if metric in m]
    summary[metric] = float(np.mean(vals))
  return dict(tasks=tasks, summary=summary)


def _flat_stats(intermediates) -> dict[tuple[str, str], np.ndarray]:
  """{(site, stat): value} from the sown 'intermediates' (one value per site per call)."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from sira_jax.losses import ROUTING_STATS  # pylint: disable=import-outside-toplevel
  out = {}
  for path, val in traverse_util.flatten_dict(dict(intermediates)).items():
    if path[-1] in ROUTING_STATS:
      vals = val if isinstance(val, (tuple, list)) else (val,)
      out[('/'.join(path[:-1]), path[-1])] = np.asarray(jax.device_get(vals[0]), np.float64)
  return out


def routing_analysis(model, variables, mixture: str, lengths: Mapping[str, int], *, split: str,
                     num_examples: int | None, batch_size: int, train_batch_size: int = 32,
                     train_batches: int = 8, seed: int = 0) -> dict[str, Any]:
  """Per adapted site: expert load per task, gate entropy, router confidence, dropped fraction.

  Returns {'sites': [...], 'tasks': [...], 'usage': {task: {site: [E shares]}},
  'gate_entropy': {site: nats}, 'router_confidence': {site: v}, 'dropped_fraction_train':
  {site: fraction}, 'num_experts': E}.
  """
  import seqio  # pylint: disable=import-outside-toplevel
  forward = functools.partial(_routing_forward, model)
  batch_size = fitted_batch_size(batch_size, num_examples)
  key = jax.random.PRNGKey(seed)
  usage: dict[str, dict[str, np.ndarray]] = {}
  entropy: dict[str, list] = {}
  confidence: dict[str, list] = {}
  names = subtask_names(mixture)
  for name in names:
    task = seqio.get_mixture_or_task(name)
    acc: dict[str, np.ndarray] = {}
    for b, n in _model_batches(task, lengths, split, num_examples, batch_size):
      for (site, stat), v in _flat_stats(forward(variables, b)).items():
        if stat == 'expert_usage':
          acc[site] = acc.get(site, 0.0) + v * n
        elif stat == 'gate_entropy':
          entropy.setdefault(site, []).append(float(v))
        elif stat == 'router_confidence':
          confidence.setdefault(site, []).append(float(v))
    usage[name] = {s: (u / max(float(np.sum(u)), 1e-12)).tolist() for s, u in acc.items()}
  dropped: dict[str, list] = {}
  mt = seqio.get_mixture_or_task(mixture)
  batches = _model_batches(mt, lengths, split, None, train_batch_size, shuffle=True, seed=seed,
                           max_batches=train_batches)
  for i, (b, _) in enumerate(batches):
    for (site, stat), v in _flat_stats(forward(variables, b, jax.random.fold_in(key, i))
                                       ).items():
      if stat == 'dropped_fraction':
        dropped.setdefault(site, []).append(float(v))
  sites = sorted(entropy)
  return dict(sites=sites, tasks=names, usage=usage,
              num_experts=len(next(iter(next(iter(usage.values())).values()))) if usage else 0,
              gate_entropy={s: float(np.mean(v)) for s, v in entropy.items()},
              router_confidence={s: float(np.mean(v)) for s, v in confidence.items()},
              dropped_fraction_train={s: float(np.mean(v)) for s, v in dropped.items()})
