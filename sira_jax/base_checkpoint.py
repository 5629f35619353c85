"""The base checkpoint a fine-tuning run starts from: its architecture and its weights, read and
checked against the configured model before anything is compiled.

A base is a project base checkpoint (`checkpoints.save_base_params`: a pretraining run's MODEL_DIR
or its `base/` directory), a Hugging Face T5 directory or a T5X checkpoint (`t5.loading`).
Adapter params (`adapters.is_adapter_param`) are never read from it: they start fresh.
"""
from __future__ import annotations

import os
from typing import Any, Collection, Mapping

import jax.numpy as jnp
from flax import traverse_util

from sira_jax import checkpoints as ckpt_lib
from sira_jax import model_init
from sira_jax import optim
from sira_jax.adapters import is_adapter_param
from sira_jax.t5 import scan_layout
from sira_jax.t5.config import T5Config, with_checkpoint_architecture


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
    return model_init.config_from_dict(
        ckpt_lib.read_base_meta(base_dir)['model_config']).architecture()
  if not os.path.exists(path):
    raise ckpt_lib.CheckpointError(f'INITIAL_CHECKPOINT_PATH {path} does not exist')
  from sira_jax.t5 import loading
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
  base_dir = resolve_base_dir(path)
  if base_dir is not None:
    base, _ = ckpt_lib.load_base_params(base_dir)
  else:  # Hugging Face / T5X files name every layer: read them unscanned.
    from sira_jax.t5 import loading
    reader = loading.open_checkpoint(path)[0]
    unscanned = scan_layout.to_layout(abstract, scanned=False)
    base = traverse_util.unflatten_dict(
        reader.read(cfg, traverse_util.flatten_dict(unscanned, sep='/')), sep='/')
  base = scan_layout.to_layout(optim.to_plain_dict(base), cfg.scan_layers)
  flat = traverse_util.flatten_dict(base)
  flat = {k: v for k, v in flat.items() if not is_adapter_param(k)}
  return ckpt_lib.check_base_params(abstract, flat, source=path, allow_missing=is_adapter_param)


def with_base(variables: dict, base: Mapping[tuple, Any]) -> dict:
  """`variables` with the (checked) base weights in place of the fresh ones."""
  flat = traverse_util.flatten_dict(optim.to_plain_dict(variables['params']))
  for k, v in base.items():
    flat[k] = jnp.asarray(v, flat[k].dtype)
  return dict(variables, params=traverse_util.unflatten_dict(flat))


def load_base_into(variables: dict, cfg: T5Config, path: str) -> dict:
  """Copies the base weights at `path` into `variables['params']` (adapter params stay fresh)."""
  model = model_init.build_model(cfg)
  return with_base(variables, read_base_params(path, cfg, model_init.abstract_params(model)))


def load_base_model(base_dir: str):
  """(model, variables, config) of a project base checkpoint alone: the frozen base, no adapters."""
  cfg = model_init.config_from_dict(ckpt_lib.read_base_meta(base_dir)['model_config'])
  model = model_init.build_model(cfg)
  return model, load_base_into(model_init.init_variables(model, cfg), cfg, base_dir), cfg
