"""Restoring a trained model for eval and infer: the run's config, its base and its newest intact
checkpoint (`checkpoints.CheckpointManager.restore_intact`: the fallback training resumes with)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from sira_jax import base_checkpoint
from sira_jax import checkpoints as ckpt_lib
from sira_jax import model_init
from sira_jax import optim
from sira_jax import run_dir
from sira_jax.adapters import trainable_mask
from sira_jax.t5 import scan_layout
from sira_jax.t5.config import T5Config


def load_trained(model_dir: str, step: int | None = None, model_config: T5Config | None = None):
  """(model, variables, model_config, step) of a run in `model_dir` (latest intact checkpoint
  by default; a damaged one is reported and skipped, an explicit `step` must be intact).

  The model config comes from the run's run_config.json unless given; the frozen base is re-read
  from the base path in the checkpoint's metadata unless the checkpoint holds it. Frozen params
  that neither holds (SMoE-Dropout's fixed router; a random base) are re-created from the run's
  own seed, as training created them. Optimizer state is not read. A checkpoint holding NaN or
  infinite parameters (a diverged run) is refused (CheckpointError). The checkpoints hold the
  layer layout the run trained with (its recorded `scan_layers`); a `model_config` of the other
  layout gets them converted (`sira_jax.t5.scan_layout`).
  """
  model_dir = os.path.abspath(model_dir)
  fingerprint = run_dir.read_run_config(model_dir)
  if model_config is None:
    model_config = model_init.config_from_dict(fingerprint['model_config'])
  wanted_config = model_config
  model_config = model_config.replace(  # the layout the run's checkpoints hold
      scan_layers=bool(fingerprint['model_config'].get('scan_layers', False)))
  model = model_init.build_model(model_config)
  seed = int(fingerprint.get('seed', 0))
  built = {}  # what the target of the step being read was built from

  def target(meta: dict) -> dict:
    """The params to restore for a checkpoint with `meta`; the rest (variables, frozen) noted."""
    variables = model_init.init_variables(model, model_config, seed)
    if not meta.get('includes_base') and meta.get('base_path'):
      variables = base_checkpoint.load_base_into(variables, model_config, meta['base_path'])
    mask = None if meta.get('pretrain') else trainable_mask(variables['params'])
    trainable, frozen = optim.partition_params(variables['params'], mask)
    built.update(variables=variables, frozen=frozen)
    tree = dict(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0), params=trainable)
    if meta.get('includes_base') and frozen:
      tree['frozen'] = frozen
    return tree

  mngr = ckpt_lib.CheckpointManager(os.path.join(model_dir, 'checkpoints'), create=False)
  try:
    if step is not None:
      restored, _ = mngr.restore(target, step, partial=True)
    elif not mngr.all_steps():
      raise ckpt_lib.CheckpointError(f'no checkpoint in {mngr.directory}')
    else:
      restored, _, _ = mngr.restore_intact(target, partial=True, log=run_dir.say)
  finally:
    mngr.close()
  step = int(restored['step'])
  check_finite(restored['params'], f'checkpoint step {step} in {mngr.directory}')
  params = optim.merge_params(restored['params'], restored.get('frozen', built['frozen']))
  variables = dict(built['variables'], params=params)
  if wanted_config.scan_layers != model_config.scan_layers:
    variables = scan_layout.variables_to_layout(variables, wanted_config.scan_layers)
  return model_init.build_model(wanted_config), variables, wanted_config, step


def check_finite(params, where: str):
  """Raises CheckpointError when any leaf of `params` holds NaN or an infinity."""
  leaves = jax.tree_util.tree_leaves(params)
  bad = sum(1 for x in leaves if not np.isfinite(np.asarray(jax.device_get(x))).all())
  if bad:
    raise ckpt_lib.CheckpointError(
        f'{where} holds non-finite parameters (NaN or inf in {bad} of {len(leaves)} arrays): the '
        'run diverged. Evaluate an earlier step (checkpoint_step) or retrain with a lower learning '
        'rate.')
