r"""Train a T5 with adapters (fine-tuning, frozen base) or without (pretraining), T5X style.

  python -m sira_jax.train \
    --gin_file=models/t5_tiny.gin --gin_file=adapters/sira.gin --gin_file=runs/finetune.gin \
    --gin.MODEL_DIR=/tmp/sira_run --gin.MIXTURE_OR_TASK_NAME=offline_suite_mix --gin.TRAIN_STEPS=300 \
    --gin.INITIAL_CHECKPOINT_PATH=runs/main/base_<hash>   # e.g. the main job's pretrained base

Macros (gin/runs/*.gin): MODEL_DIR, MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, TRAIN_STEPS,
BATCH_SIZE, INITIAL_CHECKPOINT_PATH (a Hugging Face / T5X directory `load_pretrained` accepts, or a
base checkpoint this project wrote: a pretraining run's MODEL_DIR or its `base/` directory).

MODEL_DIR holds run_config.json (the run's fingerprint), config.gin, checkpoints/<step>/ and
TensorBoard events in train/ (`run_dir`). Re-running the same command resumes from the latest
checkpoint; a MODEL_DIR holding a run with another config is refused unless --overwrite.

Several processes (one per host of a pod): the same command on every host. The CLI joins them
with `partitioning.initialize_distributed` (JAX's cluster detection on TPU pods and SLURM, or
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID); each reads its shard of every
batch, process 0 alone writes MODEL_DIR's files (and clears it for --overwrite), and a SIGTERM to
any one stops all of them after the same step (`preemption`).

Exit codes: 0 done, or stopped by SIGTERM after saving the step reached; 2 a user error (one line
`error: ...` on stderr, nothing written); 3 training diverged (a non-finite loss or state; the
message names the newest checkpoint, every checkpoint being finite); 130 Ctrl-C/SIGINT (the step
reached is saved first; a second Ctrl-C during that save is ignored).

This module is the training CLI and loop orchestration; the stages it calls live in their own
modules: model_init (model, keys, initial variables), base_checkpoint (the frozen base),
run_dir (MODEL_DIR bookkeeping), placement (mesh and shardings), trainer (step and loop).
"""

from __future__ import annotations

if __name__ == '__main__':
  # Run the CLI from the importable module `sira_jax.train`, so gin registers its configurables once
  # (not a second time as `__main__.*`).
  from sira_jax import gin_utils as _gin_utils
  _gin_utils.exit_if_help(__doc__, ('models', 'adapters', 'runs/common_train.gin', 'runs/finetune.gin', 'runs/pretrain.gin'))
  _gin_utils.import_tensorflow_quietly()
  from sira_jax import train as _module
  _module.cli()

import dataclasses
import math
import numbers
import os
import sys
import time
from typing import Any, Collection, Mapping

import gin
import jax
from absl import flags, logging
from jax.experimental import multihost_utils

import tasks
from sira_jax import base_checkpoint
from sira_jax import checkpoints as ckpt_lib
from sira_jax import data as data_lib
from sira_jax import lru
from sira_jax import model_init
from sira_jax import optim
from sira_jax import partitioning
from sira_jax import run_dir
from sira_jax import trainer as trainer_lib
from sira_jax.adapters import trainable_mask
from sira_jax.placement import Placement
from sira_jax.run_dir import ConfigError, say
from sira_jax.t5.config import T5Config


# ----------------------------------------------------------------------------------------------
# The compiled step and the run's checkpoints
# ----------------------------------------------------------------------------------------------
_STEP_CACHE = lru.LRU(4)


def compiled_train_step(model, tx, optimizer: Mapping[str, Any], loss_config, placement,
                        state_sh, cache_key: tuple):
  """The jitted train step, reused across runs of one process with the same (model config,
  optimizer and its gin bindings, loss, mesh and devices) `cache_key` (at most 4 kept)."""
  bound = repr(sorted(gin.get_bindings(optim.make_optimizer).items()))  # e.g. b1, decay_rate
  key = (cache_key, tuple(sorted(optimizer.items())), bound, loss_config, placement.key)
  return _STEP_CACHE.get(key, lambda: jax.jit(
      trainer_lib.make_train_step(model, tx, loss_config),
      out_shardings=(state_sh, partitioning.replicated(placement.mesh))))


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
                                                          log=say)
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
      dest = self._mngr.set_aside(step, os.path.join(self.model_dir, run_dir.DAMAGED))
      say(f'moved the damaged checkpoint step {step} to {dest}')

  def latest_step(self) -> int | None:
    """The newest checkpoint step on disk (None: none)."""
    return self._mngr.latest_step() if self._mngr is not None else None

  def save(self, s: trainer_lib.TrainState, force: bool) -> bool:
    return self._mngr.save(int(s.step), self.tree(s), self.meta, force=force)

  def close(self):
    if self._mngr is not None:
      self._mngr.close()
      self._mngr = None


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
    """`trainer.median_step_time` of the run's history (compile steps excluded)."""
    return trainer_lib.median_step_time(self.history)


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
    router_lr_multiplier: float = 1.0,
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
  """Trains and checkpoints; returns when `train_steps` are done, or on SIGTERM or SIGINT
  (Ctrl-C) after finishing the step and saving it (`stopped_by` 'sigterm' / 'sigint').

  pretrain=True trains every parameter (build the model with kind 'none', freeze_base=False) and
  exports the final params as a base checkpoint in MODEL_DIR/base. Otherwise only adapter/router
  params are trained (`trainable_mask`) on top of INITIAL_CHECKPOINT_PATH's frozen base, whose
  architecture the model takes (`resolve_model_config`; configured_fields: the T5Config fields
  set in gin, which must agree with it; None: all of model_config's).
  router_lr_multiplier: the trained routers learn at this multiple of the learning rate
  (`optim.with_router_lr_multiplier`; 1.0, the default, is the adapter rate).

  Every input is checked (the hyperparameters first: finite, of the right sign; task and its data
  files, sizes, MODEL_DIR, the checkpoint's architecture and shapes, the checkpoint to resume)
  before anything is written to MODEL_DIR or compiled. Only a finite state is ever saved: a step
  whose loss, gradient norm or new state is not finite raises NonFiniteLossError naming the newest
  checkpoint on disk (or saying there is none). train_summary.json is rewritten at every log
  window, so an interrupted run keeps its history and a resumed one continues it. A damaged latest
  checkpoint is reported and the newest intact one resumed (fallback_to_intact_checkpoint=False:
  stop with an error instead).
  """
  t_start = time.time()
  # 1. Inputs, checked before anything is written or compiled: the numbers first.
  check_hyperparameters(train_steps=train_steps, batch_size=batch_size,
                        learning_rate=learning_rate, warmup_steps=warmup_steps,
                        weight_decay=weight_decay, clip_grad_norm=clip_grad_norm,
                        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                        log_every=log_every, seed=seed, data_seed=data_seed,
                        loss_config=loss_config)
  partitioning.enable_compilation_cache()
  model_dir = os.path.abspath(model_dir)
  model_config = _check_inputs(model_dir, mixture_or_task_name, train_steps, batch_size,
                               model_config, pretrain, initial_checkpoint_path, configured_fields)
  placement = Placement(mesh_shape)
  placement.check_batch_size(batch_size)
  model = model_init.build_model(model_config)
  base = None
  if initial_checkpoint_path:
    base = base_checkpoint.read_base_params(initial_checkpoint_path, model_config, model_init.abstract_params(model))
  base_source = os.path.abspath(initial_checkpoint_path) if initial_checkpoint_path else None
  optimizer = dict(name=optimizer_name, learning_rate=learning_rate, schedule=schedule,
                   warmup_steps=warmup_steps, weight_decay=weight_decay,
                   clip_grad_norm=clip_grad_norm)
  if router_lr_multiplier != 1.0:  # Recorded only when set: runs without it keep their fingerprint.
    optimizer['router_lr_multiplier'] = float(router_lr_multiplier)
  fingerprint = dict(
      model_config=model_init.config_to_dict(model_config), mixture_or_task_name=mixture_or_task_name,
      task_feature_lengths=dict(task_feature_lengths), batch_size=batch_size, pretrain=pretrain,
      initial_checkpoint_path=base_source, optimizer=optimizer,
      loss=dataclasses.asdict(loss_config), seed=seed, data_seed=data_seed, pack=pack,
      full_checkpoints=full_checkpoints, **data_lib.task_registration())
  resume = run_dir.check_model_dir(model_dir, fingerprint, overwrite)

  # 2. The initial state, or the newest intact checkpoint's.
  lr = optim.make_schedule(schedule, learning_rate, warmup_steps, train_steps)
  tx = optim.make_optimizer(optimizer_name, lr, weight_decay=weight_decay,
                            clip_grad_norm=clip_grad_norm,
                            router_lr_multiplier=router_lr_multiplier)
  state, state_sh = initial_state(model, model_config, seed, base, tx, placement, pretrain)
  ckpts = RunCheckpoints(model_dir, base_source=base_source,
                         includes_base=full_checkpoints or pretrain, pretrain=pretrain,
                         model_config=fingerprint['model_config'], every=checkpoint_every,
                         keep=keep_checkpoints)
  if resume:
    state = ckpts.restore(state, fallback=fallback_to_intact_checkpoint)
  start_step = int(state.step)
  if start_step and not bool(jax.device_get(trainer_lib.all_finite((state.params,
                                                                    state.opt_state)))):
    raise ckpt_lib.CheckpointError(
        f'the checkpoint to resume, step {start_step} in {ckpts.directory}, holds non-finite '
        'values (written before checkpoints were checked): remove that step directory, or pass '
        '--overwrite to start the run again')

  # 3. MODEL_DIR is ours from here on. With several processes, every one has read it (resume or
  # not, the checkpoint to restore) before process 0 writes to it.
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('sira_jax.train: MODEL_DIR read')
  run_dir.write_run_files(model_dir, fingerprint)
  ckpts.open()
  if start_step >= train_steps:
    say(f'{model_dir} already holds step {start_step} >= TRAIN_STEPS {train_steps}: nothing to '
         'train (raise TRAIN_STEPS to train further).')
  elif start_step:
    say(f'resuming from step {start_step} of {train_steps} ({model_dir})')

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
  def on_log(history, last, step):  # the summary follows training: an interruption keeps it
    run_dir.write_summary(model_dir, history, last, step, start_step)

  try:
    with partitioning.activate(placement.mesh):  # mesh + logical axis rules while tracing
      loop = trainer_lib.train_loop(
          state, step_fn, batches, total_steps=train_steps, put_batch=placement.put_batch,
          save_fn=save_fn, writer=_metric_writer(model_dir, tensorboard), log_every=log_every,
          learning_rate=lr, progress_bar=progress_bar, desc='pretrain' if pretrain else 'train',
          on_log=on_log)
  except trainer_lib.NonFiniteLossError as e:
    kept = ckpts.latest_step()
    raise trainer_lib.NonFiniteLossError(
        f'{e}. ' + (f'The newest checkpoint, step {kept} in {ckpts.directory}, is finite and kept'
                    if kept is not None else
                    f'No checkpoint was written (checkpoint_every={checkpoint_every})')
        + '; lower the learning rate or check the data.', e.step) from None
  finally:
    ckpts.close()

  # 4. Record: the summary (history across resumes) and, after pretraining, the base checkpoint.
  last_metrics, history = run_dir.write_summary(model_dir, loop.history, loop.last_metrics,
                                                int(loop.state.step), start_step)
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
  variables = model_init.init_variables(model, cfg, seed)
  if base is not None:
    variables = base_checkpoint.with_base(variables, base)
  mask = None if pretrain else trainable_mask(variables['params'])
  state = trainer_lib.create_state(variables, tx, trainable_mask=mask,
                                   rng=model_init.run_keys(seed)[1])
  state_sh = placement.state_shardings(model, state, mask)
  return placement.place(state, state_sh), state_sh


def _check_inputs(model_dir, mixture_or_task_name, train_steps, batch_size, model_config,
                  pretrain, initial_checkpoint_path, configured_fields) -> T5Config:
  """Raises ConfigError / CheckpointError / ValueError for bad inputs; returns the model config
  to train (the checkpoint's architecture, `freeze_base=False` when pretraining)."""
  run_dir.check_model_dir_path(model_dir)
  task = data_lib.get_mixture_or_task(mixture_or_task_name)
  tasks.check_data(mixture_or_task_name)  # every data file read and decoded (tasks.DataError)
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
    model_config = base_checkpoint.resolve_model_config(model_config, initial_checkpoint_path,
                                                        configured_fields)
  check_vocabulary(task, model_config)
  return model_config


def _number(name: str, value, *, integer: bool, low: float, low_ok: bool):
  """Refuses `value` unless it is a finite real (an int when `integer`) above `low` (or equal to
  it when `low_ok`)."""
  kind = 'an integer' if integer else 'a finite number'
  ok = (isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real))
  ok = ok and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value >= low if low_ok else value > low)
  if not ok:
    raise ConfigError(f'{name} must be {kind} {">=" if low_ok else ">"} {low:g} (got {value!r})')


def check_hyperparameters(*, train_steps, batch_size, learning_rate, warmup_steps, weight_decay,
                          clip_grad_norm, checkpoint_every, keep_checkpoints, log_every, seed,
                          data_seed, loss_config: trainer_lib.LossConfig):
  """Refuses (ConfigError naming the setting and its value) a hyperparameter that is not a finite
  number of the right kind and sign: NaN, infinite, a string such as 'nan', a count below 1."""
  for name, v in (('TRAIN_STEPS (train.train_steps)', train_steps),
                  ('BATCH_SIZE (train.batch_size)', batch_size),
                  ('train.checkpoint_every', checkpoint_every),
                  ('train.keep_checkpoints', keep_checkpoints), ('train.log_every', log_every)):
    _number(name, v, integer=True, low=1, low_ok=True)
  _number('train.warmup_steps', warmup_steps, integer=True, low=0, low_ok=True)
  _number('SEED (train.seed)', seed, integer=True, low=0, low_ok=True)
  if data_seed is not None:
    _number('train.data_seed', data_seed, integer=True, low=0, low_ok=True)
  _number('LEARNING_RATE (train.learning_rate)', learning_rate, integer=False, low=0, low_ok=False)
  _number('train.weight_decay', weight_decay, integer=False, low=0, low_ok=True)
  if clip_grad_norm is not None:
    _number('train.clip_grad_norm', clip_grad_norm, integer=False, low=0, low_ok=False)
  for f in dataclasses.fields(loss_config):
    _number(f'LossConfig.{f.name}', getattr(loss_config, f.name), integer=False, low=0,
            low_ok=True)


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
  from clu import metric_writers
  return metric_writers.create_default_writer(
      os.path.join(model_dir, 'train'), just_logging=jax.process_index() != 0, asynchronous=False)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def _define_flags():
  from sira_jax import gin_utils
  gin_utils.define_gin_flags()
  if 'overwrite' not in flags.FLAGS:
    flags.DEFINE_bool('overwrite', False, 'Replace a run with another config in MODEL_DIR.')


def train_from_gin(gin_files, gin_bindings=(), *, overwrite: bool = False,
                   search_paths=None) -> TrainResult:
  """Parses gin (files, then bindings) and runs `train`: what the CLI does, callable in-process."""
  from sira_jax import gin_utils
  gin_utils.parse_and_register(gin_files, gin_bindings,
                               search_paths or ('.', gin_utils.PROJECT_GIN_DIR))
  return train(overwrite=overwrite,
               configured_fields=gin_utils.bound_parameters(T5Config))


def main(argv):
  """The CLI. Exit codes: 0 done (or stopped by SIGTERM after saving: the scheduler asked);
  2 a user error (one line on stderr, nothing written); 3 training diverged (non-finite);
  130 interrupted by Ctrl-C/SIGINT (after saving the step reached, when training had begun)."""
  del argv
  from sira_jax import gin_utils
  gin_utils.quiet_logs()
  FLAGS = flags.FLAGS
  # Several processes (pods, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set):
  # join them before any device is used; one process with nothing set: nothing happens.
  partitioning.initialize_distributed()
  try:
    result = train_from_gin(FLAGS.gin_file, FLAGS.gin_bindings, overwrite=FLAGS.overwrite,
                            search_paths=FLAGS.gin_search_paths)
  except trainer_lib.NonFiniteLossError as e:
    gin_utils.exit_with_error(e, 3)
  except KeyboardInterrupt:  # outside the loop (setup, compile, the final export): no step lost
    print('interrupted outside the training loop; the checkpoints written so far are kept (run '
          'the same command to resume)', file=sys.stderr, flush=True)
    sys.exit(130)
  except gin_utils.USER_ERRORS as e:
    gin_utils.exit_with_error(e, 2)
  if result.stopped_by == 'sigint':
    print(f'interrupted: saved step {result.step} in {result.model_dir}/checkpoints; run the same '
          'command to resume', file=sys.stderr, flush=True)
    sys.exit(130)
  step_ms = result.median_step_time
  print(f'{result.stopped_by}: step {result.step} in {result.wall_time:.1f}s; '
        f'loss {result.last_metrics.get("loss", float("nan")):.4f}; '
        + (f'median step {1000 * step_ms:.0f} ms (compile excluded); ' if step_ms else '')
        + f'model_dir {result.model_dir}'
        + (f'; process {jax.process_index()} of {jax.process_count()}'
           if jax.process_count() > 1 else ''), flush=True)


def cli():
  _define_flags()
  from sira_jax import gin_utils
  gin_utils.run(main)
