"""Freezing in T5X's own terms: the optimizer, not the module, decides what trains.

`adapter_only(optimizer)` wraps any T5X `OptimizerDef` (e.g. `t5x.adafactor.Adafactor`) in a
`t5x.optimizers.MultiOptimizer` whose traversals select the adapter and router params
(`sira_jax.adapters.is_adapter_param(path, trainable=True)`: lora_a, lora_b, router_kernel). Every
other param (the pretrained base, SMoE-Dropout's fixed router) gets no optimizer state (None), no
update and so no weight decay: after fine-tuning it is bit-identical to the restored checkpoint.

`router_lr_multiplier` (as the project trainer's `train.router_lr_multiplier`,
`sira_jax.optim.with_router_lr_multiplier`): the trained routers (`routers.is_router_param`) get
their own traversal whose learning rate, at every step, is the multiplier times the rate the
trainer passes (T5X overrides every sub-optimizer's `learning_rate` alike). 1.0 keeps one
traversal, so optimizer states written before the option restore as they are.

Gin (gin/t5x/runs/finetune.gin):
    OPTIMIZER = @t5x_optimizers.adapter_only()
    t5x_optimizers.adapter_only.optimizer = @adafactor.Adafactor()
    t5x_optimizers.adapter_only.router_lr_multiplier = 0.1   # optional
"""
from __future__ import annotations

from flax import traverse_util
from t5x import optimizers as t5x_optimizers

from sira_jax.adapters import is_adapter_param
from sira_jax.routers import is_router_param


def _traversal(predicate) -> traverse_util.ModelParamTraversal:
  return traverse_util.ModelParamTraversal(lambda path, _: predicate(path))


class AdapterOnlyOptimizer(t5x_optimizers.MultiOptimizer):
  """A MultiOptimizer over the adapter/router params only (see the module docstring)."""

  def __init__(self, optimizer: t5x_optimizers.OptimizerDef, router_lr_multiplier: float = 1.0):
    self.router_lr_multiplier = float(router_lr_multiplier)
    if self.router_lr_multiplier <= 0:
      raise ValueError(f'router_lr_multiplier must be > 0, got {router_lr_multiplier}: use 1.0 '
                       'for the adapter learning rate, e.g. 0.1 for a 10x slower router')
    if self.router_lr_multiplier == 1.0:
      super().__init__(((_traversal(lambda p: is_adapter_param(p, trainable=True)), optimizer),))
      return
    if not hasattr(optimizer.hyper_params, 'learning_rate'):
      raise ValueError(f'router_lr_multiplier needs an optimizer with a learning_rate hyper '
                       f'parameter; {type(optimizer).__name__} has none (use 1.0 with it)')
    super().__init__((
        (_traversal(lambda p: is_adapter_param(p, trainable=True) and not is_router_param(p)),
         optimizer),
        (_traversal(is_router_param), optimizer)))

  def apply_gradient(self, hyper_params, params, state, grads):
    if self.router_lr_multiplier != 1.0:
      rest, router = hyper_params
      hyper_params = [rest, router.replace(
          learning_rate=router.learning_rate * self.router_lr_multiplier)]
    return super().apply_gradient(hyper_params, params, state, grads)


def adapter_only(optimizer: t5x_optimizers.OptimizerDef,
                 router_lr_multiplier: float = 1.0) -> AdapterOnlyOptimizer:
  """`optimizer` applied to the adapter and router params only; the rest stays frozen. The
  routers learn at `router_lr_multiplier` x the learning rate."""
  return AdapterOnlyOptimizer(optimizer, router_lr_multiplier)
