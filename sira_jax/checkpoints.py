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
from typing import Any, Mapping

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

  save_every: save when step % save_every == 0 (plus explicit `force=True` saves at the end or on
  SIGTERM). keep: how many recent checkpoints to keep. Saves are synchronous, so a returned `save`
  means the checkpoint is on disk.
  """

  def __init__(self, directory: str, *, save_every: int = 100, keep: int = 3):
    self.directory = os.path.abspath(os.path.join(directory))
    self.save_every = max(1, int(save_every))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False)
    self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, state: PyTree, meta: Mapping[str, Any], *, force: bool = False) -> bool:
    """Saves `state` (a pytree of arrays) and JSON `meta` at `step`; returns whether it saved."""
    if not force and not self.should_save(step):
      return False
    if step in self._mngr.all_steps():
      return False
    meta = dict(meta, step=int(step), format_version=FORMAT_VERSION)
    self._mngr.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)
    self._mngr.wait_until_finished()
    return True

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out['meta'])

  def restore(self, target: PyTree, step: int | None = None) -> tuple[PyTree, dict]:
    """Restores the state into the structure (and shardings) of `target`; returns (state, meta)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(target)), meta=ocp.args.JsonRestore()))
    return out['state'], dict(out['meta'])

  def close(self):
    self._mngr.close()


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


def assign_base_params(target: Mapping[str, Any], base: Mapping[str, Any], *, source: str,
                       allow_missing: Any = None) -> dict:
  """Copies every base param into a copy of `target` (freshly initialised params, adapters included).

  Every param of `base` must exist in `target` with the same shape; every target param not in
  `base` must satisfy `allow_missing(path_tuple)` (the adapter/router params created fresh).
  Raises CheckpointError naming the parameter and both shapes otherwise.
  """
  flat_t = traverse_util.flatten_dict(optim.to_plain_dict(target))
  flat_b = traverse_util.flatten_dict(optim.to_plain_dict(base))
  out = dict(flat_t)
  for k, v in flat_b.items():
    name = '/'.join(k)
    if k not in flat_t:
      raise CheckpointError(
          f'base checkpoint {source} has parameter {name} {tuple(np.shape(v))} that the configured '
          'model does not have: the checkpoint does not match the model config')
    if tuple(np.shape(v)) != tuple(np.shape(flat_t[k])):
      raise CheckpointError(
          f'base checkpoint {source}: parameter {name} has shape {tuple(np.shape(v))} but the '
          f'configured model expects {tuple(np.shape(flat_t[k]))}: the checkpoint does not match the '
          'model config')
    out[k] = np.asarray(v, dtype=np.asarray(flat_t[k]).dtype) if not isinstance(v, jax.Array) else v
  missing = [k for k in flat_t if k not in flat_b and not (allow_missing and allow_missing(k))]
  if missing:
    names = ', '.join('/'.join(k) for k in missing[:5])
    raise CheckpointError(
        f'base checkpoint {source} lacks {len(missing)} base parameter(s) of the configured model '
        f'(e.g. {names}): the checkpoint does not match the model config')
  return traverse_util.unflatten_dict(out)
