"""The training loop (flax-example style): state, one jitted step, and the loop around it.

The loss is `sira_jax.losses` (shared with the T5X model class): mean cross-entropy per real target
token + output z-loss + aux_factor * aux_loss + router_z_factor * router_z_loss, the router losses
averaged over the adapted layers that sow them into 'intermediates'.
Only the trainable subtree (`TrainState.params`) is differentiated and carries optimizer state;
the frozen base (`TrainState.frozen`) enters the step as a constant.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sira_jax import losses
from sira_jax import optim
from sira_jax import preemption
from sira_jax.adapters import with_training_progress
from sira_jax.losses import LossConfig  # Re-exported: train.py and gin bind trainer.LossConfig.

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """step: int32 []; rng: PRNG key (per-step keys are fold_in(rng, step), so resuming at step s
  draws the same randomness); params: trainable subtree; opt_state: optimizer state of params;
  frozen: frozen base subtree; extra: other variable collections (e.g. 'schedule')."""
  step: jax.Array
  rng: jax.Array
  params: PyTree
  opt_state: PyTree
  frozen: PyTree
  extra: PyTree

  def variables(self) -> dict:
    return {'params': optim.merge_params(self.params, self.frozen), **self.extra}


# ----------------------------------------------------------------------------------------------
# State creation and the step
# ----------------------------------------------------------------------------------------------
def create_state(variables: Mapping[str, Any], tx: optax.GradientTransformation, *,
                 trainable_mask: PyTree | None, rng: jax.Array) -> TrainState:
  """Splits `variables['params']` by `trainable_mask` (None: all trainable) and inits the optimizer
  on the trainable part only."""
  variables = flax.core.unfreeze(variables)
  params = variables.pop('params')
  variables.pop('intermediates', None)
  trainable, frozen = optim.partition_params(params, trainable_mask)
  return TrainState(step=jnp.zeros((), jnp.int32), rng=rng, params=trainable,
                    opt_state=tx.init(trainable), frozen=frozen, extra=variables)


def model_inputs(batch):
  """Positional model inputs of a batch (segment ids too when the batch is packed)."""
  args = (batch['encoder_input_tokens'], batch['decoder_input_tokens'],
          batch['decoder_target_tokens'])
  if 'encoder_segment_ids' in batch:
    args += (batch['encoder_segment_ids'], batch['decoder_segment_ids'])
  return args


def training_loss(model, variables, batch, rng, loss_cfg: LossConfig, rng_b=None):
  """The training loss of one batch: `(loss, metrics)` from `losses.batch_loss`.

  One stochastic forward pass (dropout, expert dropout, routing noise and AdaMix's random experts
  drawn from `rng`). With `loss_cfg.consistency_factor > 0` (AdaMix's consistency
  regularisation) a second pass draws from `rng_b` (default `fold_in(rng, 1)`) and the symmetric
  KL between the two passes' token distributions is added through the shared loss as the extra
  part 'consistency'; the cross-entropy and router losses are those of the first pass, and the KL
  differentiates through both passes.
  """
  def forward(key):
    logits, mods = model.apply(variables, *model_inputs(batch), enable_dropout=True,
                               rngs={'dropout': key}, mutable=['intermediates'])
    return logits, mods.get('intermediates')

  logits, intermediates = forward(rng)
  extra = None
  if loss_cfg.consistency_factor:
    logits_b, _ = forward(jax.random.fold_in(rng, 1) if rng_b is None else rng_b)
    extra = {'consistency': (loss_cfg.consistency_factor, losses.symmetric_kl(logits, logits_b))}
  return losses.batch_loss(logits, batch, intermediates, loss_cfg, extra=extra)


STATE_FINITE = 'state_finite'  # the step's metric: 1.0 when the new params and opt state are finite


def all_finite(tree: PyTree) -> jax.Array:
  """float32 [] 1.0 when every inexact leaf of `tree` is finite (one reduction on device)."""
  leaves = [x for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.ones((), jnp.float32)
  return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all().astype(jnp.float32)


def make_train_step(model, tx: optax.GradientTransformation, loss_cfg: LossConfig
                    ) -> Callable[[TrainState, Mapping, Any], tuple[TrainState, dict]]:
  """Returns the (un-jitted) step `(state, batch, total_steps) -> (state, metrics)`.
  metrics[STATE_FINITE] is 1.0 when the new params and optimizer state are all finite
  (`train_loop` never saves a state that is not).

  total_steps (a scalar, traced) gives the training progress step/total_steps that SMoE-Dropout's
  schedule reads.
  """

  def train_step(state: TrainState, batch, total_steps):
    rng = jax.random.fold_in(state.rng, state.step)
    progress = jnp.minimum(state.step.astype(jnp.float32) /
                           jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0), 1.0)

    def loss_fn(trainable):
      variables = {'params': optim.merge_params(trainable, state.frozen), **state.extra}
      variables = with_training_progress(variables, progress)
      return training_loss(model, variables, batch, rng, loss_cfg)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics[STATE_FINITE] = all_finite((params, opt_state))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model, loss_cfg: LossConfig):
  """`(variables, batch) -> metrics` without dropout (teacher-forced loss on a batch)."""

  def eval_step(variables, batch):
    logits, mods = model.apply(variables, *model_inputs(batch), enable_dropout=False,
                               mutable=['intermediates'])
    _, metrics = losses.batch_loss(logits, batch, mods.get('intermediates'), loss_cfg)
    return metrics

  return eval_step


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
  """Training diverged: a non-finite loss, gradient norm or updated state. `step` is the step whose
  result was refused (never saved)."""

  def __init__(self, msg: str, step: int):
    super().__init__(msg)
    self.step = step


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  stopped_by: str  # 'done' | 'sigterm' | 'sigint'
  last_metrics: dict
  history: list


def median_step_time(history: list) -> float | None:
  """Median seconds per step over the logged windows of `history` (None if none has one).

  The one rule for a run's step time: each window's `step_time` is the mean over its steps, and
  the first step of every session (trace and compile) is never in a window (`train_loop` logs it
  apart as `first_step_time`), so no window needs dropping.
  """
  times = [h['step_time'] for h in history if 'step_time' in h]
  return float(np.median(times)) if times else None


def train_loop(
    state: TrainState,
    train_step: Callable,
    batches: Iterator[Mapping[str, np.ndarray]],
    *,
    total_steps: int,
    put_batch: Callable[[Mapping], Any] = lambda b: b,
    save_fn: Callable[[TrainState, bool], Any] | None = None,
    writer=None,
    log_every: int = 10,
    learning_rate=None,
    progress_bar: bool = True,
    desc: str = 'train',
    on_log: Callable[[list, dict, int], Any] | None = None,
) -> LoopResult:
  """Runs `train_step` from `state.step` up to `total_steps`.

  save_fn(state, force) is called after every finite step (it decides whether the step is a
  checkpoint step) and with force=True on SIGTERM or SIGINT (after finishing the step) and at the
  end. With several processes, a signal to any one of them stops all of them after the same step
  (`preemption.StopAgreement`: one all-reduce per step, fetched with the metrics), so every
  process makes the same collective save. A non-finite loss, gradient norm or new state (the
  step's STATE_FINITE metric) raises NonFiniteLossError before that state is saved: every saved
  state is finite.
  on_log(history, last_metrics, step) is called after each logged window (the session's history
  so far), so a record of it survives an interruption.
  """
  from tqdm.auto import tqdm
  start = int(state.step)
  total = jnp.asarray(total_steps, jnp.int32)
  history = []
  last = {}
  bar = tqdm(total=total_steps, initial=start, desc=desc, disable=not progress_bar,
             dynamic_ncols=True, mininterval=1.0)
  window_tokens, window_time, window_steps = 0.0, 0.0, 0
  stopped_by = 'done'
  agreement = preemption.StopAgreement() if jax.process_count() > 1 else None
  with preemption.StopFlag() as stop:
    step = start
    while step < total_steps:
      if agreement is None and stop.raised:
        stopped_by = stop.raised
        break
      t0 = time.perf_counter()
      batch = next(batches)
      tokens = float(np.sum(batch['encoder_input_tokens'] > 0) +
                     np.sum(batch['decoder_target_tokens'] > 0))
      new_state, metrics = train_step(state, put_batch(batch), total)
      if agreement is None:
        metrics = jax.device_get(metrics)
      else:
        metrics, stop_code = jax.device_get((metrics, agreement.dispatch(stop.raised)))
      dt = time.perf_counter() - t0
      loss = float(metrics['loss'])
      state_finite = bool(metrics.pop(STATE_FINITE, 1.0))
      if not (np.isfinite(loss) and np.isfinite(float(metrics['grad_norm'])) and state_finite):
        bar.close()
        what = 'parameters or optimizer state after the update' if np.isfinite(loss) and np.isfinite(
            float(metrics['grad_norm'])) else 'loss'
        raise NonFiniteLossError(
            f'non-finite {what} at step {step + 1} (loss={loss}, cross_entropy='
            f'{float(metrics["cross_entropy"])}, grad_norm={float(metrics["grad_norm"])}); '
            'stopping without saving it', step + 1)
      state = new_state
      step += 1
      scalars = {k: float(np.mean(v)) for k, v in metrics.items()}
      last = scalars
      if step == start + 1:  # includes the compile: reported apart, kept out of step_time
        scalars['first_step_time'] = dt
      else:
        window_tokens += tokens
        window_time += dt
        window_steps += 1
      if step == start + 1 or step % log_every == 0 or step == total_steps:
        if window_steps:
          scalars = dict(scalars, step_time=window_time / window_steps,
                         tokens_per_sec=window_tokens / max(window_time, 1e-9))
        if learning_rate is not None:
          scalars['learning_rate'] = optim.current_learning_rate(learning_rate, step - 1)
        history.append(dict(scalars, step=step))
        if on_log is not None:
          on_log(history, last, step)
        if writer is not None:
          writer.write_scalars(step, {f'train/{k}': v for k, v in scalars.items()})
        window_tokens, window_time, window_steps = 0.0, 0.0, 0
        post = {'loss': f'{scalars["loss"]:.3f}', 'ce': f'{scalars["cross_entropy"]:.3f}'}
        if 'aux_loss' in metrics and 'dropped_fraction' in scalars:
          post['aux'] = f'{scalars["aux_loss"]:.3f}'
          post['drop'] = f'{scalars["dropped_fraction"]:.3f}'
        if 'tokens_per_sec' in scalars:
          post['tok/s'] = f'{scalars["tokens_per_sec"]:.0f}'
        bar.set_postfix(post, refresh=False)
      bar.update(1)
      if save_fn is not None:
        save_fn(state, False)
      if agreement is not None and step < total_steps:
        stopped_by = agreement.reason(stop_code, step) or stopped_by
        if stopped_by != 'done':
          break
    if save_fn is not None:
      save_fn(state, True)
  bar.close()
  if writer is not None:
    writer.flush()
  return LoopResult(state=state, stopped_by=stopped_by, last_metrics=last, history=history)
