"""Partitioning rules for the adapter axes under T5X.

The network names its parameter axes (`nn.with_logical_partitioning`); the adapters add three names
that T5X's rules do not know:
  expert     the experts of a mixture (lora_a [E, r, d_in], lora_b [E, r, d_out]);
  rank       the LoRA rank r (a few units: never sharded, never factored);
  unmodeled  the router's expert dimension (router_kernel [d_in, E], E small: replicated).

`logical_axis_rules(expert_axis)`: T5X's standard rules plus these. With T5X's plain
`PjitPartitioner` (mesh axes 'data', 'model') use `expert_axis=None`: experts are replicated like
every other adapter weight. With `t5x.contrib.moe.partitioning.MoePjitPartitioner` (mesh axes
'data', 'expert', 'model'; batch split over ('expert', 'data')) use `expert_axis='expert'`: expert
e's A and B live on expert-shard e mod |expert| (and the einsum expert form, `expert_compute=
'einsum'`, dispatches tokens with an all-to-all).

`adafactor_factor_rules()`: T5X's `standard_logical_factor_rules()` plus expert -> BATCH (one
factored second moment per expert), rank -> NONE and unmodeled -> NONE (the adapter matrices keep an
unfactored second moment: they are tiny). Without them T5X's Adafactor raises KeyError: 'expert'.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from t5x import adafactor
from t5x import partitioning as t5x_partitioning

ADAPTER_AXES = ('expert', 'rank', 'unmodeled')


def adapter_axis_rules(expert_axis: Optional[str] = None) -> Tuple[Tuple[str, Optional[str]], ...]:
  """Rules for the adapter axis names only."""
  return (('expert', expert_axis), ('rank', None), ('unmodeled', None))


def logical_axis_rules(expert_axis: Optional[str] = None,
                       activation_partitioning_dims: int = 1,
                       parameter_partitioning_dims: int = 1,
                       base_rules: Optional[Sequence[Tuple[str, object]]] = None):
  """T5X's standard logical-axis rules (or `base_rules`) + the adapter axes.

  expert_axis: None for `PjitPartitioner`; 'expert' for `MoePjitPartitioner`, whose own rules
    (`t5x.contrib.moe.partitioning.standard_logical_axis_rules()`, batch -> ('expert', 'data'))
    are then a good `base_rules`.
  """
  if base_rules is None:
    base_rules = t5x_partitioning.standard_logical_axis_rules(
        activation_partitioning_dims, parameter_partitioning_dims)
  known = {name for name, _ in base_rules}
  extra = tuple(r for r in adapter_axis_rules(expert_axis) if r[0] not in known)
  return tuple(tuple(r) for r in base_rules) + extra


def moe_logical_axis_rules(activation_partitioning_dims: int = 1,
                           parameter_partitioning_dims: int = 1):
  """Rules for `MoePjitPartitioner`: T5X MoE rules (batch over ('expert', 'data'), expert ->
  'expert', unmodeled -> None) + rank -> None."""
  from t5x.contrib.moe import partitioning as moe_partitioning
  return logical_axis_rules(
      expert_axis='expert',
      base_rules=moe_partitioning.standard_logical_axis_rules(
          activation_partitioning_dims, parameter_partitioning_dims))


def adafactor_factor_rules():
  """T5X's standard Adafactor factor rules + expert/rank/unmodeled (see the module docstring)."""
  rules = dict(adafactor.standard_logical_factor_rules())
  rules.update({'expert': adafactor.FactorDim.BATCH, 'rank': adafactor.FactorDim.NONE,
                'unmodeled': adafactor.FactorDim.NONE})
  return rules
