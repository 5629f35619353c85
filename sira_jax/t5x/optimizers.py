"""Freezing in T5X's own terms: the optimizer, not the module, decides what trains.

`adapter_only(optimizer)` wraps any T5X `OptimizerDef` (e.g. `t5x.adafactor.Adafactor`) in a
`t5x.optimizers.MultiOptimizer` whose single traversal selects the adapter and router params
(`sira_jax.adapters.is_adapter_param(path, trainable=True)`: lora_a, lora_b, router_kernel). Every
other param (the pretrained base, SMoE-Dropout's fixed router) gets no optimizer state (None), no
update and so no weight decay: after fine-tuning it is bit-identical to the restored checkpoint.

Gin (gin/t5x/runs/finetune.gin):
    OPTIMIZER = @t5x_optimizers.adapter_only()
    t5x_optimizers.adapter_only.optimizer = @adafactor.Adafactor()
"""
from __future__ import annotations

from flax import traverse_util
from t5x import optimizers as t5x_optimizers

from sira_jax.adapters import is_adapter_param


class AdapterOnlyOptimizer(t5x_optimizers.MultiOptimizer):
  """A MultiOptimizer over the adapter/router params only (see the module docstring)."""

  def __init__(self, optimizer: t5x_optimizers.OptimizerDef):
    super().__init__(((traverse_util.ModelParamTraversal(
        lambda path, _: is_adapter_param(path, trainable=True)), optimizer),))


def adapter_only(optimizer: t5x_optimizers.OptimizerDef) -> AdapterOnlyOptimizer:
  """`optimizer` applied to the adapter and router params only; the rest stays frozen."""
  return AdapterOnlyOptimizer(optimizer)
