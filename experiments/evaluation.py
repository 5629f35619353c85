"""Scoring one trained model for a sweep: decoded metrics, teacher-forced metrics, routing analysis.

Per task of the evaluated mixture (the first `num_examples` examples of each task's split, in
order, so every method is scored on the same examples):
  - decoded (greedy) with seqio's Evaluator and the task's metric functions: sequence accuracy,
    chrF or CER (`sira_jax.eval.evaluate`);
  - teacher-forced token accuracy and cross-entropy over target tokens (no dropout, eval capacity).
`summary` holds the unweighted mean over tasks of each metric.

The routing analysis of a model with routers reads what every adapted projection sows into
'intermediates' (`sira_jax.routing.routing_statistics`), in two labelled sets:
  - 'train_batches': training mode (dropout, expert dropout, the training capacity factor, each
    batch with its step's dropout rng) on the first batches of the run's own training stream
    (packed as trained): expert load, dropped fraction, gate mass (the kept top-k gates a token
    receives), gate entropy, aux and router z losses per site. These are the drops training had.
  - 'eval': evaluation mode (no dropout, the eval capacity factor) on each task's evaluation
    batches: the same statistics, and the expert load per task (what specialisation reads).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import numpy as np


def subtask_names(mixture: str) -> list[str]:
  import seqio
  from sira_jax import data as data_lib
  mt = data_lib.get_mixture_or_task(mixture)
  return [t.name for t in seqio.get_subtasks(mt)] if isinstance(mt, seqio.Mixture) else [mt.name]


def load_base(base_dir: str):
  """(model, variables, config) of a base checkpoint alone: the frozen base without adapters."""
  from sira_jax import base_checkpoint
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
  from sira_jax import data as data_lib

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
  from sira_jax import trainer as trainer_lib
  return trainer_lib.make_eval_step(model, trainer_lib.LossConfig(z_loss=0.0))(variables, batch)


@functools.partial(jax.jit, static_argnames=('model',))
def _routing_forward(model, variables, batch, key=None):
  """The sown 'intermediates' of a forward pass. key None: eval mode. Otherwise train mode with
  `key` as the dropout rng: dropout, expert dropout and capacity as trained, at the end of
  training."""
  from sira_jax import trainer as trainer_lib
  from sira_jax.adapters import with_training_progress
  train = key is not None
  if train:
    variables = with_training_progress(variables, 1.0)
  _, mods = model.apply(variables, *trainer_lib.model_inputs(batch), enable_dropout=train,
                        mutable=['intermediates'], rngs={'dropout': key} if train else None)
  return mods['intermediates']


def teacher_forced(model, variables, mixture: str, lengths: Mapping[str, int], split: str, *,
                   num_examples: int | None, batch_size: int) -> dict[str, dict[str, float]]:
  """{task: {'token_accuracy': %, 'cross_entropy': nats/token}} over target tokens."""
  import seqio
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
  from sira_jax import eval as eval_lib
  from sira_jax import predict as predict_lib
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
  from flax import traverse_util
  from sira_jax.losses import ROUTING_STATS
  out = {}
  for path, val in traverse_util.flatten_dict(dict(intermediates)).items():
    if path[-1] in ROUTING_STATS:
      vals = val if isinstance(val, (tuple, list)) else (val,)
      out[('/'.join(path[:-1]), path[-1])] = np.asarray(jax.device_get(vals[0]), np.float64)
  return out


# Sown statistic -> its name in the routing analysis. `router_confidence` (routing.routing_statistics)
# is the total combine weight a token receives: the sum of its kept top-k gates, its gate mass.
SITE_STATS = {'dropped_fraction': 'dropped_fraction', 'router_confidence': 'gate_mass',
              'gate_entropy': 'gate_entropy', 'aux_loss': 'aux_loss',
              'router_z_loss': 'router_z_loss'}


@dataclasses.dataclass(frozen=True)
class TrainingStream:
  """The training batches of a run and the randomness of its steps, as `sira_jax.train.train` made
  them: batch i is batch i of `data.train_batches(mixture, lengths, batch_size, seed=data_seed,
  pack=pack)`, and step i draws its dropout rng from fold_in(run_keys(seed)[1], i)."""
  mixture: str
  lengths: Mapping[str, int]
  batch_size: int
  seed: int
  data_seed: int
  pack: bool

  @classmethod
  def of_run(cls, fingerprint: Mapping[str, Any]) -> 'TrainingStream':
    """The stream of the run whose run_config.json holds `fingerprint` (one process)."""
    seed = int(fingerprint['seed'])
    data_seed = fingerprint.get('data_seed')
    return cls(mixture=fingerprint['mixture_or_task_name'],
               lengths=dict(fingerprint['task_feature_lengths']),
               batch_size=int(fingerprint['batch_size']), seed=seed,
               data_seed=seed if data_seed is None else int(data_seed),
               pack=bool(fingerprint.get('pack', False)))

  def batches(self, num_batches: int) -> list[dict[str, np.ndarray]]:
    """Batches 0 .. num_batches-1 (a sweep's `data.shared_training_streams` replays them)."""
    from sira_jax import data as data_lib
    it = data_lib.train_batches(self.mixture, self.lengths, self.batch_size, seed=self.data_seed,
                                pack=self.pack)
    return [next(it) for _ in range(num_batches)]

  def step_rng(self, step: int) -> jax.Array:
    from sira_jax import model_init
    return jax.random.fold_in(model_init.run_keys(self.seed)[1], step)


def _site_summary(per_call: Mapping[str, Mapping[str, list]], load: Mapping[str, np.ndarray]
                  ) -> dict[str, Any]:
  """{statistic: {site: mean over calls}, 'load': {site: [E shares]}, 'summary': {statistic:
  mean over sites}} (the summary is what the trainer logs: the layer mean)."""
  out: dict[str, Any] = {name: {site: float(np.mean(v)) for site, v in sorted(sites.items())}
                         for name, sites in per_call.items()}
  out['load'] = {site: (u / max(float(np.sum(u)), 1e-12)).tolist()
                 for site, u in sorted(load.items())}
  out['summary'] = {name: float(np.mean(list(v.values()))) for name, v in out.items()
                    if name != 'load' and v}
  return out


def training_routing(model, variables, stream: TrainingStream, num_batches: int = 8
                     ) -> dict[str, Any]:
  """Training-mode routing statistics on the first `num_batches` batches the run trained on.

  Training mode as the train step has it: dropout, expert dropout, router jitter and the training
  capacity factor, with batch i's dropout rng the one step i drew (`TrainingStream.step_rng`),
  on `variables` (the trained model; SMoE-Dropout at the end of its schedule). Returns
  `_site_summary`'s dict plus 'per_batch_dropped_fraction' (the layer mean per batch: what step i
  logs as dropped_fraction when run on `variables`) and the stream's settings.
  """
  forward = functools.partial(_routing_forward, model)
  per_call: dict[str, dict[str, list]] = {name: {} for name in SITE_STATS.values()}
  load: dict[str, np.ndarray] = {}
  per_batch = []
  for i, batch in enumerate(stream.batches(num_batches)):
    stats = _flat_stats(forward(variables, batch, stream.step_rng(i)))
    for (site, stat), v in stats.items():
      if stat == 'expert_usage':
        load[site] = load.get(site, 0.0) + v
      elif stat in SITE_STATS:
        per_call[SITE_STATS[stat]].setdefault(site, []).append(float(v))
    per_batch.append(float(np.mean([float(v) for (_, stat), v in stats.items()
                                     if stat == 'dropped_fraction'])))
  out = _site_summary(per_call, load)
  adapter = model.config.adapter
  out.update(mode='train', num_batches=num_batches, batch_size=stream.batch_size,
             data_seed=stream.data_seed, seed=stream.seed, pack=stream.pack,
             capacity_factor=adapter.capacity_factor, per_batch_dropped_fraction=per_batch)
  return out


def eval_routing(model, variables, mixture: str, lengths: Mapping[str, int], *, split: str,
                 num_examples: int | None, batch_size: int) -> dict[str, Any]:
  """Evaluation-mode routing statistics (no dropout, the eval capacity factor) on each task's
  evaluation batches: `_site_summary`'s dict plus 'usage' {task: {site: [E shares]}} (the
  expert load of each task's real tokens)."""
  import seqio
  forward = functools.partial(_routing_forward, model)
  batch_size = fitted_batch_size(batch_size, num_examples)
  per_call: dict[str, dict[str, list]] = {name: {} for name in SITE_STATS.values()}
  load: dict[str, np.ndarray] = {}
  usage: dict[str, dict[str, list]] = {}
  for name in subtask_names(mixture):
    task = seqio.get_mixture_or_task(name)
    acc: dict[str, np.ndarray] = {}
    for b, n in _model_batches(task, lengths, split, num_examples, batch_size):
      for (site, stat), v in _flat_stats(forward(variables, b)).items():
        if stat == 'expert_usage':
          acc[site] = acc.get(site, 0.0) + v * n
        elif stat in SITE_STATS:
          per_call[SITE_STATS[stat]].setdefault(site, []).append(float(v))
    usage[name] = {s: (u / max(float(np.sum(u)), 1e-12)).tolist() for s, u in sorted(acc.items())}
    for s, u in acc.items():
      load[s] = load.get(s, 0.0) + u
  out = _site_summary(per_call, load)
  out.update(mode='eval', split=split, num_examples=num_examples,
             capacity_factor=model.config.adapter.eval_capacity_factor, usage=usage)
  return out


def routing_analysis(model, variables, mixture: str, lengths: Mapping[str, int], *, split: str,
                     num_examples: int | None, batch_size: int,
                     training: TrainingStream | None = None, train_batches: int = 8
                     ) -> dict[str, Any]:
  """Routing statistics per adapted site, each set labelled with the mode and data it was
  measured in.

  Returns {'sites': [...], 'tasks': [...], 'num_experts': E,
    'eval': `eval_routing` (eval mode on `split`'s evaluation batches: 'usage' per task, 'load',
      'dropped_fraction', 'gate_mass', 'gate_entropy', ... per site, 'summary'),
    'train_batches': `training_routing` (training mode on the run's first `train_batches`
      training batches, the same statistics; absent when `training` is None)}.
  """
  ev = eval_routing(model, variables, mixture, lengths, split=split, num_examples=num_examples,
                    batch_size=batch_size)
  sites = sorted(ev['gate_entropy'])
  out = dict(sites=sites, tasks=list(ev['usage']), num_experts=model.config.adapter.num_experts,
             eval=ev)
  if training is not None:
    out['train_batches'] = training_routing(model, variables, training, train_batches)
  return out
