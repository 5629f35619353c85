"""`SiraEncoderDecoderModel`: the project's network and loss as a T5X model.

A thin adapter over `t5x.models.EncoderDecoderModel` (module: `sira_jax.t5.network.Transformer`):

* `get_initial_variables` emits `params_axes` (T5X's axis metadata, from the logical names the
  network boxes its params with) and plain params, drops what `init` sows, and, for SMoE-Dropout,
  keeps the 'schedule' collection as T5X `flax_mutables` (with `schedule_axes`), reset to progress 0.
* `loss_fn` applies the module with 'intermediates' mutable and hands logits, targets, weights and the
  sown routing statistics to `sira_jax.losses.compute_loss`, the function the project's own trainer
  calls: cross-entropy + output z-loss + aux_factor * aux_loss + router_z_factor * router_z_loss,
  one `LossConfig`. Normalisation: T5X's `loss_normalizing_factor`, default
  'NUM_REAL_TARGET_TOKENS' = the mean per real target token of the project's trainer, so one batch's
  loss is the same number on both paths and `aux_factor` means the same (see sira_jax/losses.py;
  with `loss_normalizing_factor=None`, T5X's sum over tokens, the aux factor weighs ~#tokens times
  less). With T5X microbatching (`num_microbatches` m > 1) T5X sums the gradients of the m
  microbatch losses, each normalised by its own tokens: about m times the full-batch mean, as for any
  T5X model with a per-token normaliser. Train summaries get T5X's base metrics (loss, z_loss, accuracy, timing, ...),
  `cross_ent_loss` = the cross-entropy alone, and the shared metric names: cross_entropy, aux_loss,
  router_z_loss, dropped_fraction, gate_entropy, router_confidence, expert_usage_min/max.
* Routing randomness (expert dropout, jitter, AdaMix's choice) comes from T5X's 'dropout' rng.
* SMoE-Dropout's growing k: the schedule's progress lives in `flax_mutables['schedule']` and
  advances by 1 / (smoe_schedule_steps * num_microbatches) per training `loss_fn` call, i.e. it is
  (train steps since the adapters were created) / smoe_schedule_steps. It starts at 0 when a
  fine-tune begins from a base-only checkpoint (`fallback_to_scratch`) and is restored on resume.
* Freezing is the optimizer's job (`sira_jax.t5x.optimizers.adapter_only`): a module built with
  `T5Config.freeze_base=True` (stop_gradient on the base) next to an optimizer that would update
  every param is refused, and so is an adapter-only optimizer on a model without adapters.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import flax
from flax import traverse_util
from flax.core import meta
from flax.linen import partitioning as flax_partitioning
import jax
import jax.numpy as jnp
import seqio
from t5x import decoding
from t5x import losses as t5x_losses
from t5x import metrics as t5x_metrics
from t5x import models as t5x_models

from sira_jax import losses
from sira_jax.adapters import SCHEDULE_COLLECTION
from sira_jax.adapters import is_adapter_param
from sira_jax.adapters import with_training_progress
from sira_jax.t5x import optimizers as sira_optimizers

PyTree = Any
_MEAN_PER_TOKEN = 'NUM_REAL_TARGET_TOKENS'


def split_axes(tree: PyTree) -> tuple[PyTree, PyTree]:
  """Boxed variables (nn.LogicallyPartitioned leaves) -> (plain arrays, T5X axes collection).

  The axes collection mirrors the tree with each leaf `name` replaced by `name_axes`:
  `AxisMetadata(names=logical axis names)`, the form `t5x.train_state` reads from 'params_axes'.
  Unboxed leaves get names () (a scalar) or None per dimension.
  """
  flat = traverse_util.flatten_dict(flax.core.unfreeze(tree))
  axes = {}
  for path, leaf in flat.items():
    names = (tuple(leaf.names) if isinstance(leaf, meta.Partitioned)
             else (None,) * jnp.ndim(leaf))
    axes[path[:-1] + (path[-1] + '_axes',)] = flax_partitioning.AxisMetadata(names=names)
  return meta.unbox(flax.core.unfreeze(tree)), traverse_util.unflatten_dict(axes)


class SiraEncoderDecoderModel(t5x_models.EncoderDecoderModel):
  """T5X EncoderDecoderModel for SiRA and every baseline (see the module docstring)."""

  def __init__(
      self,
      module: flax.linen.Module,
      input_vocabulary: seqio.Vocabulary,
      output_vocabulary: seqio.Vocabulary,
      optimizer_def: Optional[Any],
      decode_fn: Callable = decoding.beam_search,
      feature_converter_cls: Optional[Callable[..., seqio.FeatureConverter]] = None,
      loss_config: Optional[losses.LossConfig] = None,
      loss_normalizing_factor: Optional[Union[float, int, str]] = _MEAN_PER_TOKEN,
      smoe_schedule_steps: Optional[int] = None,
      num_microbatches: Optional[int] = None,
      default_decoder_params: Optional[t5x_models.DecoderParams] = None,
  ):
    """module: a `sira_jax.t5.network.Transformer`; loss_config: the shared `LossConfig` (z-loss,
    label smoothing, aux and router-z factors); loss_normalizing_factor: as in T5X (default: mean
    per real target token); smoe_schedule_steps: training steps over which SMoE-Dropout's active
    experts grow from top_k to E (needed only for SMoE-Dropout); num_microbatches: the trainer's
    (T5X calls loss_fn once per microbatch)."""
    self.loss_config = loss_config or losses.LossConfig()
    self._smoe_schedule_steps = smoe_schedule_steps
    self._num_microbatches = max(int(num_microbatches or 1), 1)
    super().__init__(
        module=module, input_vocabulary=input_vocabulary, output_vocabulary=output_vocabulary,
        optimizer_def=optimizer_def, decode_fn=decode_fn,
        feature_converter_cls=feature_converter_cls,
        label_smoothing=self.loss_config.label_smoothing, z_loss=self.loss_config.z_loss,
        loss_normalizing_factor=loss_normalizing_factor,
        default_decoder_params=default_decoder_params)
    freeze_base = getattr(getattr(module, 'config', None), 'freeze_base', False)
    if (optimizer_def is not None and freeze_base and
        not isinstance(optimizer_def, sira_optimizers.AdapterOnlyOptimizer)):
      raise ValueError(
          'T5Config.freeze_base=True (stop_gradient on the base) with an optimizer that updates '
          'every parameter: the base would keep optimizer state and be weight-decayed, and a model '
          'without adapters would train nothing. Under T5X the optimizer freezes: fine-tune with '
          'gin/t5x/runs/finetune.gin (OPTIMIZER = @t5x_optimizers.adapter_only()), or pretrain '
          'with T5Config.freeze_base = False (gin/t5x/runs/pretrain.gin).')

  # --------------------------------------------------------------------------------------------
  # Variables
  # --------------------------------------------------------------------------------------------
  def get_initial_variables(self, rng, input_shapes, input_types=None):
    variables = flax.core.unfreeze(super().get_initial_variables(rng, input_shapes, input_types))
    variables.pop('intermediates', None)  # what init sowed, not state
    params, params_axes = split_axes(variables.pop('params'))
    if (isinstance(self.optimizer_def, sira_optimizers.AdapterOnlyOptimizer) and not any(
        is_adapter_param(p, trainable=True)
        for p in traverse_util.flatten_dict(params))):
      raise ValueError(
          'The adapter-only optimizer (gin/t5x/runs/finetune.gin) found no adapter params: this '
          'model has no adapters, so nothing would train. Add an adapters file '
          '(gin/t5x/adapters/*.gin), or pretrain with gin/t5x/runs/pretrain.gin.')
    out = dict(variables, params=params, params_axes=params_axes)
    if SCHEDULE_COLLECTION in variables:  # SMoE-Dropout: progress 0 at the start of training.
      schedule, schedule_axes = split_axes(variables[SCHEDULE_COLLECTION])
      out[SCHEDULE_COLLECTION] = jax.tree.map(jnp.zeros_like, schedule)
      out[SCHEDULE_COLLECTION + '_axes'] = schedule_axes
    return flax.core.freeze(out)

  # --------------------------------------------------------------------------------------------
  # Loss
  # --------------------------------------------------------------------------------------------
  def _normalizer_and_weights(self, batch):
    if self._loss_normalizing_factor in (_MEAN_PER_TOKEN,
                                         t5x_losses.SpecialLossNormalizingFactor.NUM_REAL_TARGET_TOKENS):
      return None, batch.get('decoder_loss_weights')  # losses.compute_loss's mean per token
    factor, weights = t5x_losses.get_loss_normalizing_factor_and_weights(
        self._loss_normalizing_factor, batch)
    return (1.0 if factor is None else factor), weights  # None: T5X's plain sum

  def loss_fn(self, params, batch: Mapping[str, jnp.ndarray], dropout_rng,
              flax_mutables: Optional[PyTree] = None):
    """(loss, metrics), or (loss, (metrics, flax_mutables)) when T5X passes flax_mutables."""
    other = flax.core.unfreeze(flax_mutables) if flax_mutables else {}
    logits, state = self._compute_logits(params, batch, dropout_rng,
                                         mutable=['intermediates'], other_variables=other)
    normalizer, weights = self._normalizer_and_weights(batch)
    targets = batch['decoder_target_tokens']
    loss, parts = losses.compute_loss(logits, targets, weights, state.get('intermediates'),
                                      self.loss_config, normalizer=normalizer)
    if weights is None:
      weights = targets > 0
    segment_ids = {k[:-len('_segment_ids')]: v for k, v in batch.items()
                   if k.endswith('_segment_ids')} or None
    metrics = t5x_models.compute_base_metrics(
        logits=logits, targets=targets, mask=weights, loss=loss, z_loss=parts['z_loss'],
        segment_ids=segment_ids)
    metrics['cross_ent_loss'] = t5x_metrics.AveragePerStep(total=parts['cross_entropy'])
    for name, value in parts.items():
      if name not in metrics:
        metrics[name] = t5x_metrics.AveragePerStep(total=value)
    if flax_mutables is None:
      return loss, metrics
    return loss, (metrics, self._advance_schedule(other, training=dropout_rng is not None))

  def eval_fn(self, params, batch, flax_mutables: Optional[PyTree] = None):
    """Teacher-forced loss and metrics without dropout; the schedule does not advance."""
    if flax_mutables is None:
      return self.loss_fn(params, batch, dropout_rng=None)
    loss, (metrics, _) = self.loss_fn(params, batch, None, flax_mutables)
    return loss, metrics

  def _advance_schedule(self, mutables: dict, *, training: bool):
    """SMoE-Dropout: progress += 1 / (smoe_schedule_steps * num_microbatches), at most 1."""
    if not training or SCHEDULE_COLLECTION not in mutables:
      return flax.core.freeze(mutables)
    if not self._smoe_schedule_steps:
      raise ValueError(
          'This model has SMoE-Dropout layers, whose active experts grow over training, but '
          'SiraEncoderDecoderModel.smoe_schedule_steps is not set: set it to the number of '
          'fine-tuning steps (gin/t5x/adapters/smoe_dropout.gin binds it to %SMOE_SCHEDULE_STEPS).')
    progress = jnp.ravel(jax.tree.leaves(mutables[SCHEDULE_COLLECTION])[0])[0]  # one value
    step = 1.0 / (float(self._smoe_schedule_steps) * self._num_microbatches)
    return flax.core.freeze(
        with_training_progress(mutables, jnp.minimum(progress + step, 1.0)))
