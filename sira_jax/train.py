r"""Train a T5 with adapters (fine-tuning, frozen base) or without (pretraining), T5X style.

  python -m sira_jax.train \
    --gin_file=models/t5_tiny.gin --gin_file=adapters/sira.gin --gin_file=runs/finetune.gin \
    --gin.MODEL_DIR=/tmp/sira_run --gin.MIXTURE_OR_TASK_NAME=offline_suite_mix --gin.TRAIN_STEPS=300 \
    --gin.INITIAL_CHECKPOINT_PATH=runs/main/base_<hash>   # e.g. the main job's pretrained base

Macros (gin/runs/*.gin): MODEL_DIR, MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, TRAIN_STEPS,
BATCH_SIZE, INITIAL_CHECKPOINT_PATH (a Hugging Face / T5X directory `load_pretrained` accepts, or a
base checkpoint this project wrote: a pretraining run's MODEL_DIR or its `base/` directory).

MODEL_DIR holds run_config.json (the run's fingerprint), config.gin, checkpoints/<step>/ and
TensorBoard events in train/. Re-running the same command resumes from the latest checkpoint; a
MODEL_DIR holding a run with another config is refused unless --overwrite.
"""

from __future__ import annotations

if __name__ == '__main__':
  # Run the CLI from the importable module `sira_jax.train`, so gin registers its configurables once
  # (not a second time as `__main__.*`).
  from sira_jax import train as _module  # pylint: disable=import-self
  _module.cli()

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from sira_jax import checkpoints as ckpt_lib
from sira_jax import data as data_lib
from sira_jax import optim
from sira_jax import partitioning
from sira_jax import trainer as trainer_lib
from sira_jax.adapters import AdapterConfig, trainable_mask
from sira_jax.t5.config import T5Config

# Fields of T5Config that do not change the base params' shapes/meaning (adapters, freezing, dropout).
_NON_BASE_FIELDS = ('adapter', 'adapter_targets', 'adapter_overrides', 'freeze_base', 'dropout_rate',
                    'dtype', 'float32_attention_logits')


class ConfigError(ValueError):
  """A run configuration refused before anything is trained or written."""


# ----------------------------------------------------------------------------------------------
# Config <-> JSON
# ----------------------------------------------------------------------------------------------
def config_to_dict(cfg: T5Config) -> dict:
  d = dataclasses.asdict(cfg)
  d['adapter_overrides'] = [[p, dataclasses.asdict(c)] for p, c in cfg.adapter_overrides]
  return json.loads(json.dumps(d, default=str))


def config_from_dict(d: Mapping[str, Any]) -> T5Config:
  d = dict(d)
  d['adapter'] = AdapterConfig(**d['adapter'])
  d['adapter_overrides'] = tuple((p, AdapterConfig(**c)) for p, c in d.get('adapter_overrides', ()))
  for k in ('mlp_activations', 'adapter_targets'):
    d[k] = tuple(d[k])
  return T5Config(**d)


def base_config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict:
  """Fields that shape the base params and differ: {field: (a, b)}."""
  keys = (set(a) | set(b)) - set(_NON_BASE_FIELDS)
  return {k: (a.get(k), b.get(k)) for k in sorted(keys) if a.get(k) != b.get(k)}


# ----------------------------------------------------------------------------------------------
# Model building, base loading, restoring
# ----------------------------------------------------------------------------------------------
def build_model(cfg: T5Config):
  from sira_jax.t5 import network  # pylint: disable=import-outside-toplevel
  return network.Transformer(cfg)


def init_variables(model, cfg: T5Config, seed: int = 0) -> dict:
  """Fresh variables (params with adapters, plus e.g. 'schedule'), unboxed to plain arrays.

  Cached per (config, seed) within a process: XLA compiles of the init are slow on CPU.
  """
  key = (cfg, seed)
  if key not in _INIT_CACHE:
    _INIT_CACHE[key] = _init_variables(model, seed)
  return dict(_INIT_CACHE[key])


_INIT_CACHE: dict = {}


def _init_variables(model, seed: int, lengths=(8, 8)) -> dict:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  enc = jnp.ones((1, lengths[0]), jnp.int32)
  dec = jnp.ones((1, lengths[1]), jnp.int32)

  @jax.jit
  def _init(key):
    return model.init({'params': key, 'dropout': key}, enc, dec, dec, enable_dropout=False)

  variables = nn.meta.unbox(_init(jax.random.PRNGKey(seed)))
  variables = dict(jax.tree_util.tree_map(lambda x: x, dict(variables)))
  variables.pop('intermediates', None)
  variables.pop('cache', None)
  return variables


def _is_adapter_path(path: tuple) -> bool:
  from sira_jax import adapters  # pylint: disable=import-outside-toplevel
  names = set(getattr(adapters, 'TRAINABLE_PARAM_NAMES', ('lora_a', 'lora_b', 'router_kernel')))
  names |= {'smoe_router_kernel'}
  return any(n in names for n in path)


def resolve_base_dir(path: str) -> str | None:
  """A project base checkpoint directory for `path` (itself or `<path>/base`), else None."""
  for cand in (path, os.path.join(path, 'base')):
    if ckpt_lib.is_base_checkpoint(cand):
      return os.path.abspath(cand)
  return None


def load_base_into(variables: dict, cfg: T5Config, path: str) -> dict:
  """Copies base weights from `path` into `variables['params']` (adapter params stay fresh).

  path: a base checkpoint the project wrote, or anything `sira_jax.load_pretrained` accepts.
  Raises CheckpointError when the checkpoint does not match the model config.
  """
  base_dir = resolve_base_dir(path)
  if base_dir is not None:
    saved_cfg = ckpt_lib.read_base_meta(base_dir)['model_config']
    diff = base_config_diff(saved_cfg, config_to_dict(cfg))
    if diff:
      lines = '; '.join(f'{k}: checkpoint {v[0]!r} vs model {v[1]!r}' for k, v in diff.items())
      raise ckpt_lib.CheckpointError(
          f'base checkpoint {base_dir} was written for another model config ({lines})')
    base, _ = ckpt_lib.load_base_params(base_dir)
  elif os.path.exists(path):
    from sira_jax.t5 import loading  # pylint: disable=import-outside-toplevel
    try:
      _, base = loading.load_pretrained(path, config=cfg)
    except Exception as e:  # pylint: disable=broad-except
      raise ckpt_lib.CheckpointError(f'cannot load pretrained weights from {path}: {e}') from e
  else:
    raise ckpt_lib.CheckpointError(f'INITIAL_CHECKPOINT_PATH {path} does not exist')
  base = optim.to_plain_dict(base)
  base_flat = _drop_adapter_params(base)
  params = ckpt_lib.assign_base_params(variables['params'], base_flat, source=path,
                                       allow_missing=_is_adapter_path)
  return dict(variables, params=params)


def _drop_adapter_params(params):
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not _is_adapter_path(k)})


# ----------------------------------------------------------------------------------------------
# MODEL_DIR bookkeeping
# ----------------------------------------------------------------------------------------------
RUN_CONFIG = 'run_config.json'


def check_model_dir(model_dir: str, fingerprint: Mapping[str, Any], overwrite: bool) -> bool:
  """Refuses a MODEL_DIR that holds a run with another config (unless overwrite, which clears it).

  Returns True when the directory holds this same run (resume).
  """
  path = os.path.join(model_dir, RUN_CONFIG)
  if not os.path.exists(path):
    if os.path.isdir(os.path.join(model_dir, 'checkpoints')) and os.listdir(
        os.path.join(model_dir, 'checkpoints')):
      if not overwrite:
        raise ConfigError(f'MODEL_DIR {model_dir} holds checkpoints but no {RUN_CONFIG}; refusing '
                          'to mix runs. Use another MODEL_DIR or pass --overwrite.')
      _clear_run(model_dir)
    return False
  with open(path) as f:
    old = json.load(f)
  if old == json.loads(json.dumps(fingerprint)):
    return True
  if not overwrite:
    diff = _dict_diff(old, json.loads(json.dumps(fingerprint)))
    raise ConfigError(
        f'MODEL_DIR {model_dir} holds a run with another config ({diff}); refusing to overwrite it. '
        'Use another MODEL_DIR or pass --overwrite to replace that run.')
  _clear_run(model_dir)
  return False


def _dict_diff(a, b, prefix=''):
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      sub = _dict_diff(va, vb, f'{prefix}{k}.')
      if sub:
        out.append(sub)
    elif va != vb:
      out.append(f'{prefix}{k}: {va!r} -> {vb!r}')
  return '; '.join(out)


def _clear_run(model_dir: str):
  for name in ('checkpoints', 'train', 'base', 'eval', 'infer', RUN_CONFIG, 'config.gin',
               'train_summary.json'):
    p = os.path.join(model_dir, name)
    if os.path.isdir(p):
      shutil.rmtree(p)
    elif os.path.exists(p):
      os.remove(p)


# ----------------------------------------------------------------------------------------------
# Sharding
# ----------------------------------------------------------------------------------------------
class Placement:
  """Where arrays live: a (data, expert, model) mesh and the shardings of state and batches.

  Params take the shardings their logical axis names get under `partitioning.logical_axis_rules`
  (experts over 'expert', heads/mlp/vocab over 'model'); the trainable/frozen split and the
  optimizer state follow them; batches are split over ('data', 'expert'). The same code runs on
  one device (mesh 1x1x1) or many.

  mesh_shape: {'data': d, 'expert': e, 'model': m}; -1 on one axis takes the remaining devices;
  without -1 the first d*e*m devices are used. Default: every device on 'data'.
  """

  def __init__(self, mesh_shape: Mapping[str, int] | None = None):
    shape = dict(mesh_shape or {'data': -1})
    devices = None
    if -1 not in shape.values():
      devices = jax.devices()[:int(np.prod(list(shape.values())))]
    self.shape = shape
    self.mesh = partitioning.make_mesh(**shape, devices=devices)

  @property
  def batch_divisor(self) -> int:
    return int(self.mesh.shape['data'] * self.mesh.shape['expert'])

  def put_batch(self, batch: Mapping[str, np.ndarray]):
    batch = {k: v for k, v in batch.items() if k != 'num_real'}
    return partitioning.shard_batch(batch, self.mesh, process_local=jax.process_count() > 1)

  def state_shardings(self, model, state: trainer_lib.TrainState, mask) -> trainer_lib.TrainState:
    """A TrainState of NamedShardings matching `state`."""
    var_sh = partitioning.variable_shardings(partitioning.abstract_variables(model), self.mesh)
    trainable_sh, frozen_sh = optim.partition_params(var_sh['params'], mask)
    rep = partitioning.replicated(self.mesh)
    extra_sh = {k: var_sh.get(k, jax.tree_util.tree_map(lambda _: rep, v))
                for k, v in state.extra.items()}
    opt_sh = partitioning.opt_state_shardings(state.opt_state, trainable_sh, self.mesh)
    return trainer_lib.TrainState(step=rep, rng=rep, params=trainable_sh, opt_state=opt_sh,
                                  frozen=frozen_sh, extra=extra_sh)

  def place(self, tree, shardings):
    return partitioning.place(tree, shardings)


# ----------------------------------------------------------------------------------------------
# The training entry point
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainResult:
  model_dir: str
  step: int
  stopped_by: str
  last_metrics: dict
  history: list
  wall_time: float
  base_dir: str | None = None
  state: Any = None


_STEP_CACHE: dict = {}


@gin.configurable(denylist=['overwrite', 'on_step'])
def train(
    *,
    model_dir: str = gin.REQUIRED,
    mixture_or_task_name: str = gin.REQUIRED,
    task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    train_steps: int = gin.REQUIRED,
    batch_size: int = gin.REQUIRED,
    model_config: T5Config = gin.REQUIRED,
    initial_checkpoint_path: str | None = None,
    pretrain: bool = False,
    optimizer_name: str = 'adafactor',
    learning_rate: float = 1e-3,
    schedule: str = 'constant',
    warmup_steps: int = 0,
    weight_decay: float = 0.0,
    clip_grad_norm: float | None = None,
    loss_config: trainer_lib.LossConfig = trainer_lib.LossConfig(),
    seed: int = 0,
    data_seed: int | None = None,
    checkpoint_every: int = 100,
    keep_checkpoints: int = 3,
    full_checkpoints: bool = False,
    log_every: int = 10,
    mesh_shape: Mapping[str, int] | None = None,
    pack: bool = False,
    progress_bar: bool = True,
    tensorboard: bool = True,
    overwrite: bool = False,
    on_step: Any = None,
) -> TrainResult:
  """Trains and checkpoints; returns when `train_steps` are done or on SIGTERM (after saving).

  pretrain=True trains every parameter (build the model with kind 'none', freeze_base=False) and
  exports the final params as a base checkpoint in MODEL_DIR/base. Otherwise only adapter/router
  params are trained (`trainable_mask`) on top of INITIAL_CHECKPOINT_PATH's frozen base.
  """
  t_start = time.time()
  model_dir = os.path.abspath(model_dir)
  task_feature_lengths = dict(task_feature_lengths)
  # ---- validation: everything below raises before anything is written ----
  data_lib.get_mixture_or_task(mixture_or_task_name)
  if train_steps < 1 or batch_size < 1:
    raise ConfigError(f'TRAIN_STEPS and BATCH_SIZE must be >= 1 (got {train_steps}, {batch_size})')
  if pretrain:
    if model_config.adapted_sites():
      raise ConfigError('pretraining trains a plain T5: use adapter kind "none" (no adapters/gin)')
    model_config = model_config.replace(freeze_base=False)
  elif not model_config.adapted_sites():
    raise ConfigError('fine-tuning needs an adapter (include an adapters/*.gin file), or set '
                      'train.pretrain = True to train every parameter')
  placement = Placement(mesh_shape)
  n_proc, proc = jax.process_count(), jax.process_index()
  if batch_size % placement.batch_divisor != 0:
    raise ConfigError(f'BATCH_SIZE {batch_size} is not divisible by the mesh batch axes '
                      f'data*expert={placement.batch_divisor}')
  model = build_model(model_config)
  variables = init_variables(model, model_config, seed)
  base_source = None
  if initial_checkpoint_path:
    variables = load_base_into(variables, model_config, initial_checkpoint_path)
    base_source = os.path.abspath(initial_checkpoint_path)
  elif not pretrain:
    logging.warning('fine-tuning without INITIAL_CHECKPOINT_PATH: the frozen base is random')
  lr = optim.make_schedule(schedule, learning_rate, warmup_steps, train_steps)
  tx = optim.make_optimizer(optimizer_name, lr, weight_decay=weight_decay,
                            clip_grad_norm=clip_grad_norm)
  fingerprint = dict(
      model_config=config_to_dict(model_config), mixture_or_task_name=mixture_or_task_name,
      task_feature_lengths=task_feature_lengths, batch_size=batch_size, pretrain=pretrain,
      initial_checkpoint_path=base_source, optimizer=dict(
          name=optimizer_name, learning_rate=learning_rate, schedule=schedule,
          warmup_steps=warmup_steps, weight_decay=weight_decay, clip_grad_norm=clip_grad_norm),
      loss=dataclasses.asdict(loss_config), seed=seed, data_seed=data_seed, pack=pack,
      full_checkpoints=full_checkpoints)
  resume = check_model_dir(model_dir, fingerprint, overwrite)
  # ---- from here on MODEL_DIR is ours ----
  os.makedirs(model_dir, exist_ok=True)
  if proc == 0:
    with open(os.path.join(model_dir, RUN_CONFIG), 'w') as f:
      json.dump(fingerprint, f, indent=1, sort_keys=True)
    with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
      f.write(gin.config_str())

  mask = None if pretrain else trainable_mask(variables['params'])
  state = trainer_lib.create_state(variables, tx, trainable_mask=mask,
                                   rng=jax.random.PRNGKey(seed))
  del variables
  state_sh = placement.state_shardings(model, state, mask)
  state = placement.place(state, state_sh)
  mngr = ckpt_lib.CheckpointManager(os.path.join(model_dir, 'checkpoints'),
                                    save_every=checkpoint_every, keep=keep_checkpoints)
  meta = dict(base_path=base_source, includes_base=bool(full_checkpoints or pretrain),
              pretrain=pretrain, model_config=fingerprint['model_config'])

  def saved_tree(s: trainer_lib.TrainState):
    tree = dict(step=s.step, rng=s.rng, params=s.params, opt_state=s.opt_state)
    if full_checkpoints or pretrain:
      tree['frozen'] = s.frozen
    return tree

  if resume and mngr.latest_step() is not None:
    restored, old_meta = mngr.restore(saved_tree(state))
    if old_meta.get('base_path') != base_source:
      raise ConfigError(f'checkpoint in {model_dir} was trained on base {old_meta.get("base_path")}, '
                        f'not {base_source}')
    state = state.replace(**restored)
    logging.info('resumed from step %d', int(state.step))
  start_step = int(state.step)

  def save_fn(s, force):
    step = int(s.step)
    if on_step is not None and not force:
      on_step(step)
    if mngr.save(step, saved_tree(s), meta, force=force) and progress_bar is False:
      logging.info('saved checkpoint at step %d', step)

  writer = None
  if tensorboard:
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
    writer = metric_writers.create_default_writer(
        os.path.join(model_dir, 'train'), just_logging=proc != 0, asynchronous=False)
  batches = data_lib.train_batches(
      mixture_or_task_name, task_feature_lengths, batch_size // n_proc,
      seed=seed if data_seed is None else data_seed, start_step=start_step, pack=pack,
      shard_index=proc, num_shards=n_proc)
  step_key = (model_config, tuple(sorted(placement.shape.items())), optimizer_name, learning_rate,
              schedule, warmup_steps, weight_decay, clip_grad_norm, loss_config,
              None if schedule == 'constant' else train_steps)
  step_fn = _STEP_CACHE.get(step_key)
  if step_fn is None:  # reuse compiled steps across runs of one process (tests, main job)
    step_fn = jax.jit(trainer_lib.make_train_step(model, tx, loss_config),
                      out_shardings=(state_sh, partitioning.replicated(placement.mesh)))
    _STEP_CACHE[step_key] = step_fn
  with placement.mesh:
    result = trainer_lib.train_loop(
        state, step_fn, batches, total_steps=train_steps, put_batch=placement.put_batch,
        save_fn=save_fn, writer=writer, log_every=log_every, learning_rate=lr,
        progress_bar=progress_bar, desc='pretrain' if pretrain else 'train')
  mngr.close()
  summary_path = os.path.join(model_dir, 'train_summary.json')
  if result.history and proc == 0:
    with open(summary_path, 'w') as f:
      json.dump(dict(step=int(result.state.step), last_metrics=result.last_metrics,
                     history=result.history), f, indent=1)
  elif not result.history and os.path.exists(summary_path):  # the run was already complete
    with open(summary_path) as f:
      summary = json.load(f)
    result.last_metrics, result.history = summary['last_metrics'], summary['history']
  base_dir = None
  if pretrain and result.stopped_by == 'done' and proc == 0:
    params = optim.merge_params(result.state.params, result.state.frozen)
    base_dir = ckpt_lib.save_base_params(os.path.join(model_dir, 'base'), jax.device_get(params),
                                         fingerprint['model_config'])
  return TrainResult(model_dir=model_dir, step=int(result.state.step), stopped_by=result.stopped_by,
                     last_metrics=result.last_metrics, history=result.history,
                     wall_time=time.time() - t_start, base_dir=base_dir, state=result.state)


# ----------------------------------------------------------------------------------------------
# Restoring a trained model (eval / infer)
# ----------------------------------------------------------------------------------------------
def load_trained(model_dir: str, step: int | None = None, model_config: T5Config | None = None):
  """(model, variables, model_config, step) of a run in `model_dir` (latest checkpoint by default).

  The model config comes from the run's run_config.json unless given; the frozen base is re-read
  from the base path in the checkpoint's metadata unless the checkpoint holds it.
  """
  model_dir = os.path.abspath(model_dir)
  run_cfg_path = os.path.join(model_dir, RUN_CONFIG)
  if not os.path.exists(run_cfg_path):
    raise ckpt_lib.CheckpointError(f'{model_dir} holds no training run ({RUN_CONFIG} missing)')
  with open(run_cfg_path) as f:
    fingerprint = json.load(f)
  if model_config is None:
    model_config = config_from_dict(fingerprint['model_config'])
  model = build_model(model_config)
  variables = init_variables(model, model_config)
  mngr = ckpt_lib.CheckpointManager(os.path.join(model_dir, 'checkpoints'))
  meta = mngr.read_meta(step)
  if not meta.get('includes_base') and meta.get('base_path'):
    variables = load_base_into(variables, model_config, meta['base_path'])
  pretrain = bool(meta.get('pretrain'))
  mask = None if pretrain else trainable_mask(variables['params'])
  trainable, frozen = optim.partition_params(variables['params'], mask)
  target = dict(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0), params=trainable)
  if meta.get('includes_base') and frozen:
    target['frozen'] = frozen
  # Optimizer state is not needed for inference: restore only the listed items.
  restored = _restore_partial(mngr, target, step)
  frozen = restored.get('frozen', frozen)
  params = optim.merge_params(restored['params'], frozen)
  variables = dict(variables, params=params)
  mngr.close()
  return model, variables, model_config, int(restored['step'])


def _restore_partial(mngr: ckpt_lib.CheckpointManager, target: dict, step: int | None) -> dict:
  """Restores only the keys of `target` from the 'state' item (no optimizer state)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  step = mngr.latest_step() if step is None else step
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  out = mngr._mngr.restore(step, args=ocp.args.Composite(  # pylint: disable=protected-access
      state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)))
  return out['state']


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _define_flags():
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  gin_utils.define_gin_flags()
  if 'overwrite' not in flags.FLAGS:
    flags.DEFINE_bool('overwrite', False, 'Replace a run with another config in MODEL_DIR.')


def train_from_gin(gin_files, gin_bindings=(), *, overwrite: bool = False,
                   search_paths=None) -> TrainResult:
  """Parses gin (files, then bindings) and runs `train`: what the CLI does, callable in-process."""
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  data_lib.import_task_modules()
  gin_utils.parse_gin(gin_files, gin_bindings, search_paths or ('.', gin_utils.PROJECT_GIN_DIR))
  data_lib.register_after_gin()
  return train(overwrite=overwrite)


def main(argv):
  del argv
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  gin_utils.quiet_logs()
  FLAGS = flags.FLAGS
  try:
    result = train_from_gin(FLAGS.gin_file, FLAGS.gin_bindings, overwrite=FLAGS.overwrite,
                            search_paths=FLAGS.gin_search_paths)
  except trainer_lib.NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(3)
  except (ConfigError, ckpt_lib.CheckpointError, gin_utils.GinConfigError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'{result.stopped_by}: step {result.step} in {result.wall_time:.1f}s; '
        f'loss {result.last_metrics.get("loss", float("nan")):.4f}; model_dir {result.model_dir}',
        flush=True)


def cli():
  _define_flags()
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  gin_utils.run(main)
