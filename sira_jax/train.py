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
  from sira_jax import gin_utils as _gin_utils
  _gin_utils.exit_if_help(__doc__, ('models', 'adapters', 'runs/common_train.gin', 'runs/finetune.gin', 'runs/pretrain.gin'))
  _gin_utils.import_tensorflow_quietly()
  from sira_jax import train as _module  # pylint: disable=import-self
  _module.cli()

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any, Collection, Mapping

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

from sira_jax import checkpoints as ckpt_lib
from sira_jax import data as data_lib
from sira_jax import optim
from sira_jax import lru
from sira_jax import partitioning
from sira_jax import trainer as trainer_lib
from sira_jax.adapters import AdapterConfig, trainable_mask
from sira_jax.t5.config import T5Config, with_checkpoint_architecture



class ConfigError(ValueError):
  """A run configuration refused before anything is trained or written."""


def _say(msg: str):
  """A line for the user (stderr, process 0 only): resume, fallbacks, nothing to do."""
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


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


# ----------------------------------------------------------------------------------------------
# Model building and initial variables
# ----------------------------------------------------------------------------------------------
def build_model(cfg: T5Config):
  from sira_jax.t5 import network  # pylint: disable=import-outside-toplevel
  return network.Transformer(cfg)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(params_key, dropout_key) of a run: parameter init and the per-step randomness never share
  a key."""
  params_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
  return params_key, dropout_key


_INIT_LENGTHS = (8, 8)


def _init_fn(model):
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  enc = jnp.ones((1, _INIT_LENGTHS[0]), jnp.int32)
  dec = jnp.ones((1, _INIT_LENGTHS[1]), jnp.int32)

  def init(key):
    variables = model.init({'params': key, 'dropout': jax.random.fold_in(key, 1)}, enc, dec, dec,
                           enable_dropout=False)
    variables = dict(nn.meta.unbox(variables))
    variables.pop('intermediates', None)
    variables.pop('cache', None)
    return variables
  return init


def abstract_params(model) -> dict:
  """Shapes and dtypes of the model's params (jax.ShapeDtypeStruct leaves; nothing compiled)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  return nn.meta.unbox(partitioning.abstract_variables(model))['params']


_INIT_CACHE = lru.Bounded(4)
_INIT_FNS = lru.Bounded(4)


def init_variables(model, cfg: T5Config, seed: int = 0) -> dict:
  """Fresh variables (params with adapters, plus e.g. 'schedule') as plain arrays, from
  `run_keys(seed)[0]`. Cached per (config, seed, devices) within a process, and the compiled init
  per (config, devices), so another seed does not compile again: XLA compiles of the init take
  several seconds on CPU."""
  devices = tuple(d.id for d in jax.devices())
  key = (cfg, seed, devices)
  if key not in _INIT_CACHE:
    fn = _INIT_FNS.get((cfg, devices)) or _INIT_FNS.put((cfg, devices), jax.jit(_init_fn(model)))
    _INIT_CACHE.put(key, fn(run_keys(seed)[0]))
  return dict(_INIT_CACHE[key])


def _is_adapter_path(path: tuple) -> bool:
  from sira_jax import adapters  # pylint: disable=import-outside-toplevel
  names = set(adapters.TRAINABLE_PARAM_NAMES) | {'smoe_router_kernel'}
  return any(n in names for n in path)


# ----------------------------------------------------------------------------------------------
# The base checkpoint: architecture and weights (read and checked before anything is compiled)
# ----------------------------------------------------------------------------------------------
def resolve_base_dir(path: str) -> str | None:
  """A project base checkpoint directory for `path` (itself or `<path>/base`), else None."""
  for cand in (path, os.path.join(path, 'base')):
    if ckpt_lib.is_base_checkpoint(cand):
      return os.path.abspath(cand)
  return None


def checkpoint_architecture(path: str) -> dict[str, Any]:
  """The architecture fields a checkpoint records ({field: value}, `T5Config.architecture`).

  path: a base checkpoint this project wrote (its saved model config), a Hugging Face directory
  (config.json) or a T5X checkpoint (shapes, and a config.json beside it).
  """
  base_dir = resolve_base_dir(path)
  if base_dir is not None:
    return config_from_dict(ckpt_lib.read_base_meta(base_dir)['model_config']).architecture()
  if not os.path.exists(path):
    raise ckpt_lib.CheckpointError(f'INITIAL_CHECKPOINT_PATH {path} does not exist')
  from sira_jax.t5 import loading  # pylint: disable=import-outside-toplevel
  return loading.open_checkpoint(path)[2]


def resolve_model_config(cfg: T5Config, path: str | None,
                         configured: Collection[str] | None = None) -> T5Config:
  """The model to fine-tune: `cfg` with the architecture of the checkpoint at `path`.

  configured: the T5Config fields the user set (gin bindings); they must agree with the
  checkpoint, and the others are taken from it. None: every field of `cfg` must agree.
  """
  if not path:
    return cfg
  return with_checkpoint_architecture(cfg, checkpoint_architecture(path), source=path,
                                      configured=configured)


def read_base_params(path: str, cfg: T5Config, abstract: Mapping[str, Any]) -> dict:
  """The base weights at `path` for the model `cfg`: {param path tuple: np.ndarray}, every one
  checked against `abstract` (the model's param shapes) and every non-adapter param present.

  Raises CheckpointError naming the parameter, the checkpoint and both shapes.
  Either layout of the layer stacks is read into `cfg.scan_layers`' (`sira_jax.t5.scan_layout`).
  """
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  from sira_jax.t5 import scan_layout  # pylint: disable=import-outside-toplevel
  base_dir = resolve_base_dir(path)
  if base_dir is not None:
    base, _ = ckpt_lib.load_base_params(base_dir)
  else:  # Hugging Face / T5X files name every layer: read them unscanned.
    from sira_jax.t5 import loading  # pylint: disable=import-outside-toplevel
    reader = loading.open_checkpoint(path)[0]
    unscanned = scan_layout.to_layout(abstract, scanned=False)
    base = traverse_util.unflatten_dict(
        reader.read(cfg, traverse_util.flatten_dict(unscanned, sep='/')), sep='/')
  base = scan_layout.to_layout(optim.to_plain_dict(base), cfg.scan_layers)
  flat = traverse_util.flatten_dict(base)
  flat = {k: v for k, v in flat.items() if not _is_adapter_path(k)}
  return ckpt_lib.check_base_params(abstract, flat, source=path, allow_missing=_is_adapter_path)


def with_base(variables: dict, base: Mapping[tuple, Any]) -> dict:
  """`variables` with the (checked) base weights in place of the fresh ones."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  flat = traverse_util.flatten_dict(optim.to_plain_dict(variables['params']))
  for k, v in base.items():
    flat[k] = jnp.asarray(v, flat[k].dtype)
  return dict(variables, params=traverse_util.unflatten_dict(flat))


def load_base_into(variables: dict, cfg: T5Config, path: str) -> dict:
  """Copies the base weights at `path` into `variables['params']` (adapter params stay fresh)."""
  model = build_model(cfg)
  return with_base(variables, read_base_params(path, cfg, abstract_params(model)))


# ----------------------------------------------------------------------------------------------
# MODEL_DIR bookkeeping
# ----------------------------------------------------------------------------------------------
RUN_CONFIG = 'run_config.json'
SUMMARY = 'train_summary.json'
DAMAGED = 'damaged_checkpoints'


def check_model_dir_path(model_dir: str):
  """MODEL_DIR must be a directory or creatable as one."""
  p = model_dir
  while not os.path.exists(p):
    parent = os.path.dirname(p)
    if parent == p:
      break
    p = parent
  if not os.path.isdir(p):
    what = 'MODEL_DIR' if p == model_dir else f'MODEL_DIR {model_dir}: its parent'
    raise ConfigError(f'{what} {p} is a file, not a directory; choose a directory path for '
                      'MODEL_DIR (it holds checkpoints, config and logs).')
  if not os.access(p, os.W_OK):
    raise ConfigError(f'MODEL_DIR {model_dir}: {p} is not writable')


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
    old = _with_new_config_fields(json.load(f))
  if old == json.loads(json.dumps(fingerprint)):
    return True
  if not overwrite:
    diff = _dict_diff(old, json.loads(json.dumps(fingerprint)))
    raise ConfigError(
        f'MODEL_DIR {model_dir} holds a run with another config ({diff}); refusing to overwrite it. '
        'Use another MODEL_DIR or pass --overwrite to replace that run.')
  _clear_run(model_dir)
  return False


def _with_new_config_fields(recorded: dict) -> dict:
  """A run_config.json as this version writes it: T5Config fields added since the run was
  recorded (e.g. scan_layers, remat_policy) take their defaults, which are what that run used."""
  model_config = recorded.get('model_config')
  if not isinstance(model_config, dict):
    return recorded
  defaults = config_to_dict(T5Config())
  added = {k: v for k, v in defaults.items() if k not in model_config}
  return dict(recorded, model_config={**added, **model_config})


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
  for name in ('checkpoints', 'train', 'base', 'eval', 'infer', RUN_CONFIG, 'config.gin', SUMMARY):
    p = os.path.join(model_dir, name)
    if os.path.isdir(p):
      shutil.rmtree(p)
    elif os.path.exists(p):
      os.remove(p)


def write_run_files(model_dir: str, fingerprint: Mapping[str, Any]):
  """run_config.json and config.gin: written once every input has been validated."""
  os.makedirs(model_dir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(model_dir, RUN_CONFIG), 'w') as f:
      json.dump(fingerprint, f, indent=1, sort_keys=True)
    with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
      f.write(gin.config_str())


def write_summary(model_dir: str, loop: trainer_lib.LoopResult, start_step: int
                  ) -> tuple[dict, list]:
  """Appends this session's history to MODEL_DIR/train_summary.json (history before
  `start_step` kept across resumes); returns (last_metrics, full history)."""
  path = os.path.join(model_dir, SUMMARY)
  old = dict(last_metrics={}, history=[])
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  history = [h for h in old['history'] if h['step'] <= start_step] + loop.history
  last = loop.last_metrics or old['last_metrics']
  if loop.history and jax.process_index() == 0:
    with open(path, 'w') as f:
      json.dump(dict(step=int(loop.state.step), last_metrics=last, history=history), f, indent=1)
  return last, history


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

  @property
  def key(self) -> tuple:
    """Identifies the mesh (axis sizes and device ids) in compile caches."""
    return (tuple(self.mesh.shape.items()), tuple(int(d.id) for d in self.mesh.devices.flat))

  def check_batch_size(self, batch_size: int):
    if batch_size % self.batch_divisor != 0:
      raise ConfigError(f'BATCH_SIZE {batch_size} is not divisible by the mesh batch axes '
                        f'data*expert={self.batch_divisor}')

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


_STEP_CACHE = lru.Bounded(4)


def compiled_train_step(model, tx, optimizer: Mapping[str, Any], loss_config, placement,
                        state_sh, cache_key: tuple):
  """The jitted train step, reused across runs of one process with the same (model config,
  optimizer, loss, mesh and devices) `cache_key` (at most 4 kept)."""
  key = (cache_key, tuple(sorted(optimizer.items())), loss_config, placement.key)
  if key not in _STEP_CACHE:
    _STEP_CACHE.put(key, jax.jit(trainer_lib.make_train_step(model, tx, loss_config),
                                 out_shardings=(state_sh, partitioning.replicated(placement.mesh))))
  return _STEP_CACHE[key]


# ----------------------------------------------------------------------------------------------
# Checkpoints of a run
# ----------------------------------------------------------------------------------------------
class RunCheckpoints:
  """The train-state checkpoints of one run in MODEL_DIR/checkpoints (what is saved, the meta)."""

  def __init__(self, model_dir: str, *, base_source: str | None, includes_base: bool,
               pretrain: bool, model_config: Mapping[str, Any], every: int, keep: int):
    self.directory = os.path.join(model_dir, 'checkpoints')
    self.model_dir = model_dir
    self.includes_base = includes_base
    self.every, self.keep = every, keep
    self.meta = dict(base_path=base_source, includes_base=includes_base, pretrain=pretrain,
                     model_config=model_config)
    self._mngr = None
    self._damaged: list[int] = []

  def tree(self, s: trainer_lib.TrainState) -> dict:
    tree = dict(step=s.step, rng=s.rng, params=s.params, opt_state=s.opt_state)
    if self.includes_base:
      tree['frozen'] = s.frozen
    return tree

  def restore(self, state: trainer_lib.TrainState, fallback: bool) -> trainer_lib.TrainState:
    """`state` from the newest intact checkpoint (writes nothing; damaged steps are noted)."""
    if not os.path.isdir(self.directory):
      return state
    mngr = ckpt_lib.CheckpointManager(self.directory, create=False)
    try:
      if mngr.latest_step() is None:
        return state
      restored, meta, self._damaged = mngr.restore_intact(self.tree(state), fallback=fallback,
                                                          log=_say)
    finally:
      mngr.close()
    if meta.get('base_path') != self.meta['base_path']:
      raise ConfigError(f'checkpoint in {self.model_dir} was trained on base '
                        f'{meta.get("base_path")}, not {self.meta["base_path"]}')
    return state.replace(**restored)

  def open(self):
    """Opens for writing; damaged steps found by `restore` are moved to MODEL_DIR/DAMAGED."""
    self._mngr = ckpt_lib.CheckpointManager(self.directory, save_every=self.every, keep=self.keep)
    for step in self._damaged:
      dest = self._mngr.set_aside(step, os.path.join(self.model_dir, DAMAGED))
      _say(f'moved the damaged checkpoint step {step} to {dest}')

  def save(self, s: trainer_lib.TrainState, force: bool) -> bool:
    return self._mngr.save(int(s.step), self.tree(s), self.meta, force=force)

  def close(self):
    if self._mngr is not None:
      self._mngr.close()


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

  @property
  def median_step_time(self) -> float | None:
    """Median seconds per step over the logged windows, compile step excluded."""
    times = [h['step_time'] for h in self.history if 'step_time' in h]
    return float(np.median(times)) if times else None


@gin.configurable(denylist=['overwrite', 'on_step', 'configured_fields'])
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
    fallback_to_intact_checkpoint: bool = True,
    log_every: int = 10,
    mesh_shape: Mapping[str, int] | None = None,
    pack: bool = False,
    progress_bar: bool = True,
    tensorboard: bool = True,
    overwrite: bool = False,
    on_step: Any = None,
    configured_fields: Collection[str] | None = None,
) -> TrainResult:
  """Trains and checkpoints; returns when `train_steps` are done or on SIGTERM (after saving).

  pretrain=True trains every parameter (build the model with kind 'none', freeze_base=False) and
  exports the final params as a base checkpoint in MODEL_DIR/base. Otherwise only adapter/router
  params are trained (`trainable_mask`) on top of INITIAL_CHECKPOINT_PATH's frozen base, whose
  architecture the model takes (`resolve_model_config`; configured_fields: the T5Config fields
  set in gin, which must agree with it; None: all of model_config's).

  Every input is checked (task, sizes, MODEL_DIR, the checkpoint's architecture and shapes, the
  checkpoint to resume) before anything is written to MODEL_DIR or compiled. A damaged latest
  checkpoint is reported and the newest intact one resumed (fallback_to_intact_checkpoint=False:
  stop with an error instead).
  """
  t_start = time.time()
  partitioning.enable_compilation_cache()
  model_dir = os.path.abspath(model_dir)
  # 1. Inputs, checked before anything is written or compiled.
  model_config = _check_inputs(model_dir, mixture_or_task_name, train_steps, batch_size,
                               model_config, pretrain, initial_checkpoint_path, configured_fields)
  placement = Placement(mesh_shape)
  placement.check_batch_size(batch_size)
  model = build_model(model_config)
  base = None
  if initial_checkpoint_path:
    base = read_base_params(initial_checkpoint_path, model_config, abstract_params(model))
  base_source = os.path.abspath(initial_checkpoint_path) if initial_checkpoint_path else None
  optimizer = dict(name=optimizer_name, learning_rate=learning_rate, schedule=schedule,
                   warmup_steps=warmup_steps, weight_decay=weight_decay,
                   clip_grad_norm=clip_grad_norm)
  fingerprint = dict(
      model_config=config_to_dict(model_config), mixture_or_task_name=mixture_or_task_name,
      task_feature_lengths=dict(task_feature_lengths), batch_size=batch_size, pretrain=pretrain,
      initial_checkpoint_path=base_source, optimizer=optimizer,
      loss=dataclasses.asdict(loss_config), seed=seed, data_seed=data_seed, pack=pack,
      full_checkpoints=full_checkpoints, **data_lib.task_registration())
  resume = check_model_dir(model_dir, fingerprint, overwrite)

  # 2. The initial state, or the newest intact checkpoint's.
  lr = optim.make_schedule(schedule, learning_rate, warmup_steps, train_steps)
  tx = optim.make_optimizer(optimizer_name, lr, weight_decay=weight_decay,
                            clip_grad_norm=clip_grad_norm)
  state, state_sh = initial_state(model, model_config, seed, base, tx, placement, pretrain)
  ckpts = RunCheckpoints(model_dir, base_source=base_source,
                         includes_base=full_checkpoints or pretrain, pretrain=pretrain,
                         model_config=fingerprint['model_config'], every=checkpoint_every,
                         keep=keep_checkpoints)
  if resume:
    state = ckpts.restore(state, fallback=fallback_to_intact_checkpoint)
  start_step = int(state.step)

  # 3. MODEL_DIR is ours from here on.
  write_run_files(model_dir, fingerprint)
  ckpts.open()
  if start_step >= train_steps:
    _say(f'{model_dir} already holds step {start_step} >= TRAIN_STEPS {train_steps}: nothing to '
         'train (raise TRAIN_STEPS to train further).')
  elif start_step:
    _say(f'resuming from step {start_step} of {train_steps} ({model_dir})')

  def save_fn(s, force):
    if on_step is not None and not force:
      on_step(int(s.step))
    if ckpts.save(s, force) and progress_bar is False:
      logging.info('saved checkpoint at step %d', int(s.step))

  n_proc, proc = jax.process_count(), jax.process_index()
  batches = data_lib.train_batches(
      mixture_or_task_name, task_feature_lengths, batch_size // n_proc,
      seed=seed if data_seed is None else data_seed, start_step=start_step, pack=pack,
      shard_index=proc, num_shards=n_proc)
  step_fn = compiled_train_step(
      model, tx, optimizer, loss_config, placement, state_sh,
      cache_key=(model_config, None if schedule == 'constant' else train_steps))
  with partitioning.activate(placement.mesh):  # mesh + logical axis rules while the step traces
    loop = trainer_lib.train_loop(
        state, step_fn, batches, total_steps=train_steps, put_batch=placement.put_batch,
        save_fn=save_fn, writer=_metric_writer(model_dir, tensorboard), log_every=log_every,
        learning_rate=lr, progress_bar=progress_bar, desc='pretrain' if pretrain else 'train')
  ckpts.close()

  # 4. Record: the summary (history across resumes) and, after pretraining, the base checkpoint.
  last_metrics, history = write_summary(model_dir, loop, start_step)
  base_dir = None
  if pretrain and loop.stopped_by == 'done' and proc == 0:
    params = optim.merge_params(loop.state.params, loop.state.frozen)
    base_dir = ckpt_lib.save_base_params(os.path.join(model_dir, 'base'), jax.device_get(params),
                                         fingerprint['model_config'])
  return TrainResult(model_dir=model_dir, step=int(loop.state.step), stopped_by=loop.stopped_by,
                     last_metrics=last_metrics, history=history,
                     wall_time=time.time() - t_start, base_dir=base_dir, state=loop.state)


def initial_state(model, cfg: T5Config, seed: int, base: Mapping[tuple, Any] | None, tx,
                  placement: Placement, pretrain: bool):
  """(state, its shardings): fresh params (the checked `base` weights in place), the trainable
  part's optimizer state, placed on the mesh. Pretraining trains every parameter."""
  variables = init_variables(model, cfg, seed)
  if base is not None:
    variables = with_base(variables, base)
  mask = None if pretrain else trainable_mask(variables['params'])
  state = trainer_lib.create_state(variables, tx, trainable_mask=mask, rng=run_keys(seed)[1])
  state_sh = placement.state_shardings(model, state, mask)
  return placement.place(state, state_sh), state_sh


def _check_inputs(model_dir, mixture_or_task_name, train_steps, batch_size, model_config,
                  pretrain, initial_checkpoint_path, configured_fields) -> T5Config:
  """Raises ConfigError / CheckpointError / ValueError for bad inputs; returns the model config
  to train (the checkpoint's architecture, `freeze_base=False` when pretraining)."""
  check_model_dir_path(model_dir)
  task = data_lib.get_mixture_or_task(mixture_or_task_name)
  if train_steps < 1 or batch_size < 1:
    raise ConfigError(f'TRAIN_STEPS and BATCH_SIZE must be >= 1 (got {train_steps}, {batch_size})')
  if pretrain:
    if model_config.adapted_sites():
      raise ConfigError('pretraining trains a plain T5: use adapter kind "none" (no adapters/gin)')
    model_config = model_config.replace(freeze_base=False)
  else:
    if not model_config.adapted_sites():
      raise ConfigError('fine-tuning needs an adapter (include an adapters/*.gin file), or set '
                        'train.pretrain = True to train every parameter')
    if not initial_checkpoint_path:
      logging.warning('fine-tuning without INITIAL_CHECKPOINT_PATH: the frozen base is random')
    model_config = resolve_model_config(model_config, initial_checkpoint_path, configured_fields)
  check_vocabulary(task, model_config)
  return model_config


def check_vocabulary(task, cfg: T5Config):
  """The task's token ids must fit the model's embedding (an id past it would be clamped)."""
  for name, feature in task.output_features.items():
    size = feature.vocabulary.vocab_size
    if size > cfg.vocab_size:
      raise ConfigError(
          f'task {task.name!r} feature {name!r} has a vocabulary of {size} ids but the model '
          f'embeds {cfg.vocab_size}: use the model\'s own vocabulary '
          '(--gin.get_vocabulary.spm_path=<checkpoint>/spiece.model) or a model of that vocabulary')


def _metric_writer(model_dir: str, tensorboard: bool):
  if not tensorboard:
    return None
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  return metric_writers.create_default_writer(
      os.path.join(model_dir, 'train'), just_logging=jax.process_index() != 0, asynchronous=False)


# ----------------------------------------------------------------------------------------------
# Restoring a trained model (eval / infer)
# ----------------------------------------------------------------------------------------------
def load_trained(model_dir: str, step: int | None = None, model_config: T5Config | None = None):
  """(model, variables, model_config, step) of a run in `model_dir` (latest intact checkpoint
  by default; a damaged one is reported and skipped, an explicit `step` must be intact).

  The model config comes from the run's run_config.json unless given; the frozen base is re-read
  from the base path in the checkpoint's metadata unless the checkpoint holds it. Frozen params
  that neither holds (SMoE-Dropout's fixed router; a random base) are re-created from the run's
  own seed, as training created them. The checkpoints hold the layer layout the run trained
  with (its recorded `scan_layers`); a `model_config` of the other layout gets them converted.
  """
  model_dir = os.path.abspath(model_dir)
  run_cfg_path = os.path.join(model_dir, RUN_CONFIG)
  if not os.path.exists(run_cfg_path):
    raise ckpt_lib.CheckpointError(f'{model_dir} holds no training run ({RUN_CONFIG} missing)')
  with open(run_cfg_path) as f:
    fingerprint = json.load(f)
  if model_config is None:
    model_config = config_from_dict(fingerprint['model_config'])
  wanted_config = model_config
  model_config = model_config.replace(  # the layout the run's checkpoints hold
      scan_layers=bool(fingerprint['model_config'].get('scan_layers', False)))
  model = build_model(model_config)
  mngr = ckpt_lib.CheckpointManager(os.path.join(model_dir, 'checkpoints'), create=False)
  steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
  if not steps:
    raise ckpt_lib.CheckpointError(f'no checkpoint in {mngr.directory}')
  try:
    for i, s in enumerate(steps):
      try:
        meta = mngr.read_meta(s)
        variables = init_variables(model, model_config, int(fingerprint.get('seed', 0)))
        if not meta.get('includes_base') and meta.get('base_path'):
          variables = load_base_into(variables, model_config, meta['base_path'])
        mask = None if meta.get('pretrain') else trainable_mask(variables['params'])
        trainable, frozen = optim.partition_params(variables['params'], mask)
        # Optimizer state is not needed for inference: restore only the listed items.
        target = dict(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0), params=trainable)
        if meta.get('includes_base') and frozen:
          target['frozen'] = frozen
        restored, _ = mngr.restore(target, s, partial=True)
        break
      except ckpt_lib.DamagedCheckpointError as e:
        if i + 1 == len(steps):
          raise
        _say(f'warning: {e}; trying the previous checkpoint')
  finally:
    mngr.close()
  params = optim.merge_params(restored['params'], restored.get('frozen', frozen))
  variables = dict(variables, params=params)
  if wanted_config.scan_layers != model_config.scan_layers:
    from sira_jax.t5 import scan_layout  # pylint: disable=import-outside-toplevel
    variables = scan_layout.variables_to_layout(variables, wanted_config.scan_layers)
  return build_model(wanted_config), variables, wanted_config, int(restored['step'])


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
  return train(overwrite=overwrite,
               configured_fields=gin_utils.bound_parameters(T5Config))


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
  step_ms = result.median_step_time
  print(f'{result.stopped_by}: step {result.step} in {result.wall_time:.1f}s; '
        f'loss {result.last_metrics.get("loss", float("nan")):.4f}; '
        + (f'median step {1000 * step_ms:.0f} ms (compile excluded); ' if step_ms else '')
        + f'model_dir {result.model_dir}', flush=True)


def cli():
  _define_flags()
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  gin_utils.run(main)
