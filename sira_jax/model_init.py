"""A run's model and its initial variables: the one init path every module uses.

  model = build_model(cfg)                     # a Transformer (a hashable flax module)
  boxed = init_fn(model)(rng)                  # model.init on dummy tokens, partitioning boxes kept
  shapes = abstract_variables(model)           # boxed ShapeDtypeStructs (nothing compiled)
  variables = init_variables(model, cfg, seed) # plain arrays, jitted and cached per process

`config_to_dict` / `config_from_dict` turn a T5Config into the JSON a run records and back.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from sira_jax.adapters import AdapterConfig
from sira_jax.t5.config import T5Config
from sira_jax.t5.network import Transformer

PyTree = Any

# (inputs, targets) lengths of the dummy tokens; no param shape depends on them.
DUMMY_LENGTHS = (8, 8)


# ----------------------------------------------------------------------------------------------
# Config <-> JSON
# ----------------------------------------------------------------------------------------------
def config_to_dict(cfg: T5Config) -> dict:
  """A JSON-ready dict of `cfg` (adapter configs as dicts, tuples as lists)."""
  d = dataclasses.asdict(cfg)
  d['adapter_overrides'] = [[p, dataclasses.asdict(c)] for p, c in cfg.adapter_overrides]
  return json.loads(json.dumps(d, default=str))


def config_from_dict(d: Mapping[str, Any]) -> T5Config:
  """The T5Config `config_to_dict` wrote."""
  d = dict(d)
  d['adapter'] = AdapterConfig(**d['adapter'])
  d['adapter_overrides'] = tuple((p, AdapterConfig(**c)) for p, c in d.get('adapter_overrides', ()))
  for k in ('mlp_activations', 'adapter_targets'):
    d[k] = tuple(d[k])
  return T5Config(**d)


# ----------------------------------------------------------------------------------------------
# Model and keys
# ----------------------------------------------------------------------------------------------
def build_model(cfg: T5Config) -> Transformer:
  return Transformer(cfg)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(params_key, dropout_key) of a run: parameter init and the per-step randomness never share
  a key."""
  params_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
  return params_key, dropout_key


# ----------------------------------------------------------------------------------------------
# Initial variables
# ----------------------------------------------------------------------------------------------
def init_fn(model: Transformer) -> Callable[[jax.Array], PyTree]:
  """rng -> the model's boxed variables (nn.LogicallyPartitioned leaves): `model.init` on all-ones
  int32 tokens of `DUMMY_LENGTHS`, dropout off. Params come from `rng`; the 'dropout' stream
  from `fold_in(rng, 1)`."""
  enc = jnp.ones((1, DUMMY_LENGTHS[0]), jnp.int32)
  dec = jnp.ones((1, DUMMY_LENGTHS[1]), jnp.int32)

  def init(rng):
    return model.init({'params': rng, 'dropout': jax.random.fold_in(rng, 1)}, enc, dec, dec,
                      enable_dropout=False)
  return init


def _plain_init_fn(model: Transformer) -> Callable[[jax.Array], dict]:
  """rng -> unboxed variables without the per-call collections ('intermediates', 'cache')."""
  boxed = init_fn(model)

  def init(rng):
    variables = dict(nn.meta.unbox(boxed(rng)))
    variables.pop('intermediates', None)
    variables.pop('cache', None)
    return variables
  return init


def abstract_variables(model: Transformer) -> PyTree:
  """Boxed (nn.LogicallyPartitioned) ShapeDtypeStructs of the model's variables.

  Traced once per model (a hashable flax module) and process: tracing a model's init takes
  seconds on CPU, and a sweep asks once per run."""
  return jax.tree.map(lambda x: x, _traced_variables(model))  # new containers: callers may edit


@functools.lru_cache(maxsize=8)
def _traced_variables(model: Transformer) -> PyTree:
  return jax.eval_shape(init_fn(model), jax.random.PRNGKey(0))


def abstract_params(model: Transformer) -> dict:
  """Shapes and dtypes of the model's params (jax.ShapeDtypeStruct leaves; nothing compiled)."""
  return nn.meta.unbox(abstract_variables(model))['params']


def init_variables(model: Transformer, cfg: T5Config, seed: int = 0) -> dict:
  """Fresh variables (params with adapters, plus e.g. 'schedule') as plain arrays, from
  `run_keys(seed)[0]`. Cached per (model, seed, devices) within a process (the model is built from
  `cfg`, and compares equal for an equal config), and the compiled init per (model, devices), so
  another seed does not compile again: XLA compiles of the init take several seconds on CPU."""
  del cfg  # the model holds it
  return dict(_initial_variables(model, seed, tuple(d.id for d in jax.devices())))


@functools.lru_cache(maxsize=4)
def _initial_variables(model: Transformer, seed: int, devices: tuple[int, ...]) -> dict:
  return _compiled_init(model, devices)(run_keys(seed)[0])


@functools.lru_cache(maxsize=4)
def _compiled_init(model: Transformer, devices: tuple[int, ...]):
  del devices  # in the key only: a compiled init is kept per device set
  return jax.jit(_plain_init_fn(model))
