"""Parameter accounting for a T5Config: total, trainable and active-per-token counts.

The paper compares methods at matched budgets: use `count_parameters(cfg)` to size LoRA vs SiRA
vs MoLoRA etc. Counts come from the real module (abstract init, no arrays allocated).

Definitions:
  total      - every parameter (frozen base + adapters + routers).
  trainable  - what fine-tuning updates (`adapters.trainable_mask`: lora_a, lora_b, router_kernel).
  frozen     - total - trainable (base, SMoE-Dropout's fixed router).
  active_per_token - parameters one token's forward pass uses at inference: the whole base
    (the embedding table counted in full, as is usual), every router, and the experts a token
    can reach: top_k of E for 'sira'; all E for 'molora'; one merged adapter for 'adamix'
    (experts are averaged at inference); `smoe_eval_num_experts` (default E) for
    'smoe_dropout'; the single adapter for 'lora'.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from sira_jax import model_init
from sira_jax.adapters import trainable_mask
from sira_jax.t5.config import T5Config


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int
  trainable: int
  frozen: int
  active_per_token: int
  adapter_total: int           # all adapter + router params (trainable or not)
  adapter_active_per_token: int

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def _active_experts(adapter) -> float:
  """Fraction of a site's experts one token uses at inference."""
  e = adapter.num_experts
  if adapter.kind == 'sira':
    return adapter.top_k / e
  if adapter.kind == 'adamix':
    return 1.0 / e
  if adapter.kind == 'smoe_dropout':
    return (adapter.smoe_eval_num_experts or e) / e
  return 1.0


def _site_of(path: tuple[str, ...]) -> str | None:
  """('encoder','layers_0','attention','query','lora_a') -> 'encoder/attention/query'."""
  side = path[0]
  if side not in ('encoder', 'decoder') or len(path) < 5:
    return None
  block, proj = path[2], path[3]
  if block == 'mlp':
    proj = 'wi' if proj.startswith('wi') else proj
  return f'{side}/{block}/{proj}'


def count_parameters(config: T5Config) -> ParamCounts:
  """Counts for `config` (see module docstring)."""
  params = model_init.abstract_params(model_init.build_model(config))
  mask = trainable_mask(params)
  total = trainable = adapter_total = 0
  adapter_active = 0.0
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  mask_leaves = jax.tree.leaves(mask)
  for (path, leaf), is_trainable in zip(leaves, mask_leaves):
    names = tuple(str(getattr(k, 'key', k)) for k in path)
    n = int(np.prod(leaf.shape))
    total += n
    trainable += n if is_trainable else 0
    if names[-1] == 'kernel' or names[-1] in ('scale', 'embedding', 'rel_embedding'):
      continue
    adapter_total += n
    site = _site_of(names)
    adapter = config.adapter_for(site) if site else None
    if names[-1] in ('lora_a', 'lora_b') and adapter is not None and adapter.kind != 'lora':
      adapter_active += n * _active_experts(adapter)
    else:
      adapter_active += n
  adapter_active_i = int(round(adapter_active))
  return ParamCounts(total=total, trainable=trainable, frozen=total - trainable,
                     active_per_token=total - adapter_total + adapter_active_i,
                     adapter_total=adapter_total, adapter_active_per_token=adapter_active_i)
