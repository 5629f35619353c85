"""Training checkpoints with orbax: every N steps, keep K, adapter-only by default.

Layout under `<model_dir>/checkpoints/<step>/`:
  state/  the train state pytree: step, rng, trainable params, optimizer state (and, with
          `full=True`, the frozen base params too);
  meta/   JSON metadata: format version, whether the base is included, the base checkpoint path the
          frozen params came from, the run fingerprint, the step.
orbax writes each step into a temporary directory and renames it when complete, so a process killed
during a save leaves the previous checkpoint loadable (tests/test_checkpoints.py kills one with -9).

`save_base_params` / `load_base_params` write and read a plain full-params checkpoint (a base model
that fine-tuning starts from), with the model config alongside for a shape/config check.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from sira_jax import optim

PyTree = Any
FORMAT_VERSION = 1


class CheckpointError(ValueError):
  """A checkpoint that cannot be used for this run (missing, or not matching the model)."""


def _abstract(tree: PyTree) -> PyTree:
  def f(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return jax.tree_util.tree_map(f, tree)


class CheckpointManager:
  """Thin wrapper over `orbax.checkpoint.CheckpointManager` for train states.

  save_every: save when step % save_every == 0 (orbax's FixedIntervalPolicy; `should_save`),
  plus explicit `force=True` saves at the end or on SIGTERM. keep: how many recent checkpoints.
  Saves are synchronous, so a returned `save` means the checkpoint is on disk. create=False opens
  an existing directory read-only (nothing is created).
  """

  def __init__(self, directory: str, *, save_every: int = 100, keep: int = 3,
               create: bool = True):
    self.directory = os.path.abspath(os.path.join(directory))
    # A save decision policy, not `save_interval_steps`: that one also saves a fresh run's first
    # step (orbax's InitialSavePolicy), which no configured interval asks for.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=False,
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(max(1, int(save_every))))
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether `save(step)` without force saves: a multiple of save_every after the latest step."""
    return self._mngr.should_save(step)

  def save(self, step: int, state: PyTree, meta: Mapping[str, Any], *, force: bool = False) -> bool:
    """Saves `state` (a pytree of arrays) and JSON `meta` at `step`; returns whether it saved."""
    if step in self._mngr.all_steps():
      return False
    meta = dict(meta, step=int(step), format_version=FORMAT_VERSION)
    saved = self._mngr.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force)
    self._mngr.wait_until_finished()
    return saved

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    return step

  def read_meta(self, step: int | None = None) -> dict:
    step = self._step(step)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise DamagedCheckpointError(self.directory, step, e) from None
    if out['meta'] is None:
      raise DamagedCheckpointError(self.directory, step, 'its meta/ item is missing')
    return dict(out['meta'])

  def restore(self, target: PyTree | Callable[[dict], PyTree], step: int | None = None, *,
              partial: bool = False) -> tuple[PyTree, dict]:
    """Restores the state into the structure (and shardings) of `target`; returns (state, meta).

    target: a pytree, or `meta -> pytree` when what to restore depends on the step's metadata.
    partial=True restores only the keys of `target` (e.g. params without optimizer state).
    Raises DamagedCheckpointError (naming the step) when the step cannot be read.
    """
    step = self._step(step)
    meta = self.read_meta(step)
    if callable(target):
      target = target(meta)
    if partial:
      state_args = ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)
    else:
      state_args = ocp.args.StandardRestore(_abstract(target))
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(state=state_args))
    except Exception as e:
      _quiet_pending_reads()
      raise DamagedCheckpointError(self.directory, step, e) from None
    return out['state'], meta

  def restore_intact(self, target: PyTree | Callable[[dict], PyTree], *, partial: bool = False,
                     fallback: bool = True, log=None) -> tuple[PyTree, dict, list[int]]:
    """Restores the newest step that reads back; returns (state, meta, damaged steps).

    A damaged step (unreadable files, missing metadata, another structure) is reported with
    `log(message)` and skipped for the next older one; fallback=False raises instead.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(target, step, partial=partial)
        return state, meta, damaged
      except DamagedCheckpointError as e:
        if not fallback:
          raise CheckpointError(f'{e} (set train.fallback_to_intact_checkpoint = True to resume '
                                'from the newest intact step instead)') from None
        damaged.append(step)
        if log is not None:
          log(f'warning: {e}; trying the previous checkpoint')
    raise CheckpointError(f'no intact checkpoint in {self.directory}'
                          + (f' (damaged steps: {damaged})' if damaged else ''))

  def set_aside(self, step: int, directory: str) -> str:
    """Moves checkpoint `step` out of the way into `directory` (kept for inspection)."""
    os.makedirs(directory, exist_ok=True)
    dest = os.path.join(directory, str(step))
    os.replace(os.path.join(self.directory, str(step)), dest)
    self._mngr.reload()
    return dest

  def close(self):
    self._mngr.close()


def _quiet_pending_reads():
  """After a failed restore, tensorstore still completes the other reads of that restore and
  reports each to an asyncio loop orbax has already closed: dozens of identical `RuntimeError:
  Event loop is closed` tracebacks (unraisable exceptions). Drops exactly those."""
  hook = sys.unraisablehook
  if getattr(hook, '_drops_closed_loop', False):
    return

  def unraisablehook(info):
    if isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == 'Event loop is closed':
      return
    hook(info)
  unraisablehook._drops_closed_loop = True
  sys.unraisablehook = unraisablehook


class DamagedCheckpointError(CheckpointError):
  """A checkpoint step that exists but cannot be read back."""

  def __init__(self, directory: str, step: int, cause: Any):
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if len(first) > 300:
      first = first[:300] + '...'
    super().__init__(f'checkpoint step {step} in {directory} is damaged or incomplete '
                     f'({type(cause).__name__ if isinstance(cause, Exception) else "reason"}: '
                     f'{first})')
    self.step = step


# ----------------------------------------------------------------------------------------------
# Base (full-params) checkpoints: what pretraining produces and fine-tuning starts from.
# ----------------------------------------------------------------------------------------------
BASE_META = 'sira_base.json'


def save_base_params(directory: str, params: PyTree, model_config: Mapping[str, Any]) -> str:
  """Writes `params` (full base params, nested dict) and the model config to `directory`."""
  directory = os.path.abspath(directory)
  ckptr = ocp.StandardCheckpointer()
  path = os.path.join(directory, 'params')
  ckptr.save(path, params, force=True)
  ckptr.wait_until_finished()
  with open(os.path.join(directory, BASE_META), 'w') as f:
    json.dump({'format_version': FORMAT_VERSION, 'model_config': model_config}, f, indent=1,
              sort_keys=True, default=str)
  return directory


def is_base_checkpoint(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, BASE_META))


def read_base_meta(directory: str) -> dict:
  with open(os.path.join(directory, BASE_META)) as f:
    return json.load(f)


def load_base_params(directory: str) -> tuple[dict, dict]:
  """Reads a base checkpoint written by `save_base_params`; returns (params, model_config)."""
  directory = os.path.abspath(directory)
  if not is_base_checkpoint(directory):
    raise CheckpointError(f'{directory} is not a sira-jax base checkpoint (no {BASE_META})')
  params = ocp.StandardCheckpointer().restore(os.path.join(directory, 'params'))
  return params, read_base_meta(directory)['model_config']


def check_base_params(target: Mapping[str, Any], base: Mapping[tuple, Any], *, source: str,
                      allow_missing: Any = None) -> dict:
  """Checks base weights against the configured model's params; returns them (flat, numpy).

  target: the model's params (nested dict; leaves with `.shape`, e.g. jax.ShapeDtypeStruct).
  base: {param path tuple: array}. Every base param must exist in `target` with the same shape;
  every target param not in `base` must satisfy `allow_missing(path_tuple)` (the adapter/router
  params created fresh). Raises CheckpointError naming the parameter and both shapes otherwise.
  """
  flat_t = traverse_util.flatten_dict(optim.to_plain_dict(target))
  for k, v in base.items():
    name = '/'.join(k)
    if k not in flat_t:
      raise CheckpointError(
          f'base checkpoint {source} has parameter {name} {tuple(np.shape(v))} that the configured '
          'model does not have: the checkpoint does not match the model config')
    if tuple(np.shape(v)) != tuple(flat_t[k].shape):
      raise CheckpointError(
          f'base checkpoint {source}: parameter {name} has shape {tuple(np.shape(v))} but the '
          f'configured model expects {tuple(flat_t[k].shape)}: the checkpoint does not match the '
          'model config')
  missing = [k for k in flat_t if k not in base and not (allow_missing and allow_missing(k))]
  if missing:
    names = ', '.join('/'.join(k) for k in missing[:5])
    raise CheckpointError(
        f'base checkpoint {source} lacks {len(missing)} base parameter(s) of the configured model '
        f'(e.g. {names}): the checkpoint does not match the model config')
  return dict(base)
