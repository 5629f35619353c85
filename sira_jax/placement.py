"""Where a run's arrays live: the device mesh and the shardings of the train state and batches."""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np

from sira_jax import model_init
from sira_jax import optim
from sira_jax import partitioning
from sira_jax import trainer as trainer_lib
from sira_jax.run_dir import ConfigError


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
    var_sh = partitioning.variable_shardings(model_init.abstract_variables(model), self.mesh)
    trainable_sh, frozen_sh = optim.partition_params(var_sh['params'], mask)
    rep = partitioning.replicated(self.mesh)
    extra_sh = {k: var_sh.get(k, jax.tree_util.tree_map(lambda _: rep, v))
                for k, v in state.extra.items()}
    opt_sh = partitioning.opt_state_shardings(state.opt_state, trainable_sh, self.mesh)
    return trainer_lib.TrainState(step=rep, rng=rep, params=trainable_sh, opt_state=opt_sh,
                                  frozen=frozen_sh, extra=extra_sh)

  def place(self, tree, shardings):
    return partitioning.place(tree, shardings)
