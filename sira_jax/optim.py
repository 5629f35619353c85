"""Optimizers, learning-rate schedules and the trainable/frozen parameter split.

Fine-tuning differentiates only the trainable subtree (adapter and router params chosen by
`sira_jax.adapters.trainable_mask`); the frozen base never enters gradients or optimizer state.
Pretraining trains every parameter (`partition_params(params, mask=None)`).

The trained routers' updates can be scaled apart from the rest (`make_optimizer`'s
`router_lr_multiplier`: an `optax.multi_transform` over the labels of `param_labels`), so a router
learns at `multiplier * learning_rate` while the LoRA experts keep the adapter rate.
"""
from __future__ import annotations

from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from sira_jax import routers

PyTree = Any
ROUTER_LABEL, DEFAULT_LABEL = 'router', 'default'


# ----------------------------------------------------------------------------------------------
# Trainable / frozen split
# ----------------------------------------------------------------------------------------------
def partition_params(params: Mapping[str, Any], mask: PyTree | None) -> tuple[dict, dict]:
  """Splits nested `params` into (trainable, frozen) nested dicts by a boolean `mask` pytree.

  `mask=None` means everything is trainable (pretraining). Each returned dict keeps only its own
  leaves, so the frozen base is never part of the tree that is differentiated.
  """
  flat = traverse_util.flatten_dict(to_plain_dict(params))
  if mask is None:
    return traverse_util.unflatten_dict(flat), {}
  flat_mask = traverse_util.flatten_dict(to_plain_dict(mask))
  if set(flat_mask) != set(flat):
    missing = sorted('/'.join(k) for k in set(flat) ^ set(flat_mask))[:5]
    raise ValueError(f'trainable mask does not match params; differing paths: {missing}')
  train = {k: v for k, v in flat.items() if bool(flat_mask[k])}
  frozen = {k: v for k, v in flat.items() if not bool(flat_mask[k])}
  return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
  """Inverse of `partition_params`: one nested dict holding both subtrees."""
  flat = traverse_util.flatten_dict(to_plain_dict(frozen))
  for k, v in traverse_util.flatten_dict(to_plain_dict(trainable)).items():
    if k in flat:
      raise ValueError(f'parameter {"/".join(k)} is both trainable and frozen')
    flat[k] = v
  return traverse_util.unflatten_dict(flat)


def to_plain_dict(tree):
  """Nested plain dicts from any nesting of FrozenDicts / Mappings (leaves unchanged)."""
  if hasattr(tree, 'unfreeze'):
    return tree.unfreeze()
  if isinstance(tree, Mapping):
    return {k: to_plain_dict(v) for k, v in tree.items()}
  return tree


def count_params(tree: PyTree) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules
# ----------------------------------------------------------------------------------------------
@gin.configurable
def make_schedule(
    name: str = 'constant',
    base_learning_rate: float = 1e-3,
    warmup_steps: int = 0,
    total_steps: int = 1000,
    end_factor: float = 0.0,
) -> optax.Schedule:
  """Learning-rate schedule `step -> lr`.

  name: 'constant' | 'linear' (linear decay to end_factor*lr) | 'cosine' |
    'rsqrt' (T5's 1/sqrt(max(step, warmup)), scaled so lr(warmup) = base_learning_rate).
  A linear warmup from 0 over `warmup_steps` is prepended for every name except 'rsqrt'.
  """
  lr = float(base_learning_rate)
  decay_steps = max(1, int(total_steps) - int(warmup_steps))
  if name == 'rsqrt':
    w = max(1, int(warmup_steps))
    return lambda step: lr * jnp.sqrt(w / jnp.maximum(jnp.asarray(step, jnp.float32), w))
  if name == 'constant':
    main = optax.constant_schedule(lr)
  elif name == 'linear':
    main = optax.linear_schedule(lr, lr * end_factor, decay_steps)
  elif name == 'cosine':
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end_factor)
  else:
    raise ValueError(f"unknown schedule {name!r}; expected constant, linear, cosine or rsqrt")
  if warmup_steps > 0:
    warm = optax.linear_schedule(0.0, lr, int(warmup_steps))
    return optax.join_schedules([warm, main], [int(warmup_steps)])
  return main


# ----------------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------------
@gin.configurable
def make_optimizer(
    name: str = 'adafactor',
    learning_rate: float | optax.Schedule | None = None,
    weight_decay: float = 0.0,
    clip_grad_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    decay_rate: float = 0.8,
    min_dim_size_to_factor: int = 128,
    multiply_by_parameter_scale: bool = False,
    router_lr_multiplier: float = 1.0,
) -> optax.GradientTransformation:
  """The optimizer for the trainable subtree.

  name: 'adafactor' (T5X default: factored second moments, no momentum, update clipping 1.0),
    'adamw' or 'sgd'. `learning_rate` is a float or a schedule; None uses `make_schedule()`.
    Adafactor factors second moments by shape only, so new logical axes (expert, rank) need no
    factor rules here (unlike T5X's Adafactor, which keys factoring on logical axis names).
  router_lr_multiplier: the trained routers' (`routers.is_router_param`) updates are scaled by it
    after the optimizer (`with_router_lr_multiplier`): their learning rate is multiplier x the
    rate (weight decay included, as optax applies decay inside the learning rate). 1.0 leaves the
    optimizer, and so its state's structure, as it is.
  """
  if learning_rate is None:
    learning_rate = make_schedule()
  if name == 'adafactor':
    opt = optax.adafactor(
        learning_rate=learning_rate,
        min_dim_size_to_factor=min_dim_size_to_factor,
        decay_rate=decay_rate,
        multiply_by_parameter_scale=multiply_by_parameter_scale,
        clipping_threshold=1.0,
        weight_decay_rate=weight_decay or None,
    )
  elif name == 'adamw':
    opt = optax.adamw(learning_rate=learning_rate, b1=b1, b2=b2, weight_decay=weight_decay)
  elif name == 'sgd':
    opt = optax.sgd(learning_rate=learning_rate)
  else:
    raise ValueError(f"unknown optimizer {name!r}; expected adafactor, adamw or sgd")
  if clip_grad_norm:
    opt = optax.chain(optax.clip_by_global_norm(clip_grad_norm), opt)
  return with_router_lr_multiplier(opt, router_lr_multiplier)


def param_labels(params: PyTree) -> PyTree:
  """`ROUTER_LABEL` for every trained router param (`routers.is_router_param`), `DEFAULT_LABEL`
  for every other leaf: a pytree like `params` (plain or FrozenDict nesting)."""
  flat = traverse_util.flatten_dict(to_plain_dict(params))
  return traverse_util.unflatten_dict(
      {k: ROUTER_LABEL if routers.is_router_param(k) else DEFAULT_LABEL for k in flat})


def with_router_lr_multiplier(opt: optax.GradientTransformation, multiplier: float
                              ) -> optax.GradientTransformation:
  """`opt`, then the router params' updates scaled by `multiplier` (every other update kept):
  the routers train at `multiplier` x the learning rate. multiplier 1.0 returns `opt` itself."""
  multiplier = float(multiplier)
  if multiplier <= 0:
    raise ValueError(f'router_lr_multiplier must be > 0, got {multiplier}: use 1.0 for the '
                     'adapter learning rate, e.g. 0.1 for a 10x slower router')
  if multiplier == 1.0:
    return opt
  return optax.chain(opt, optax.multi_transform(
      {ROUTER_LABEL: optax.scale(multiplier), DEFAULT_LABEL: optax.identity()}, param_labels))


def current_learning_rate(learning_rate, step) -> float:
  if callable(learning_rate):
    return float(learning_rate(step))
  return float(learning_rate)

