"""The training loop (flax-example style): state, loss, one jitted step, and the loop around it.

Loss = cross-entropy over target tokens (+ z_loss * logsumexp(logits)^2, T5X's output z-loss)
     + aux_factor * mean(aux_loss) + router_z_factor * mean(router_z_loss),
the two router losses averaged over the adapted layers that sow them into 'intermediates'.
Only the trainable subtree (`TrainState.params`) is differentiated and carries optimizer state;
the frozen base (`TrainState.frozen`) enters the step as a constant.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable, Iterator, Mapping

import flax
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sira_jax import optim
from sira_jax.adapters import with_training_progress

PyTree = Any
ROUTING_STATS = ('aux_loss', 'router_z_loss', 'dropped_fraction', 'expert_usage', 'gate_entropy',
                 'router_confidence')


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


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LossConfig:
  """z_loss: coefficient of the logits z-loss (T5X uses 1e-4; 0 disables).
  aux_factor / router_z_factor: coefficients of the routers' load-balancing and z losses.
  label_smoothing: T5X-style label smoothing of the targets."""
  z_loss: float = 1e-4
  aux_factor: float = 0.01
  router_z_factor: float = 0.001
  label_smoothing: float = 0.0


# ----------------------------------------------------------------------------------------------
# Loss and routing statistics
# ----------------------------------------------------------------------------------------------
def cross_entropy_with_z(logits, targets, weights, *, z_loss=0.0, label_smoothing=0.0):
  """logits [B, L, V], targets [B, L] int, weights [B, L] -> (ce_sum, z_sum, weight_sum)."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  lse = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - lse[..., None]
  conf = 1.0 - label_smoothing
  low = label_smoothing / max(vocab - 1, 1)
  soft = jax.nn.one_hot(targets, vocab) * (conf - low) + low
  ce = -jnp.sum(soft * log_probs, axis=-1)
  if label_smoothing:  # subtract the entropy of the smoothed target, so a perfect model scores 0
    ce = ce + (conf * jnp.log(conf) + (vocab - 1) * low * jnp.log(low + 1e-20))
  w = weights.astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(z_loss * jnp.square(lse) * w), jnp.sum(w)


def collect_intermediates(intermediates: Mapping[str, Any] | None) -> dict[str, list]:
  """Gathers every sown value by its name over all layers: name -> list of arrays."""
  found: dict[str, list] = {}

  def visit(tree):
    if isinstance(tree, Mapping):
      for k, v in tree.items():
        if k in ROUTING_STATS and isinstance(v, (tuple, list)):
          found.setdefault(k, []).extend(v)
        else:
          visit(v)

  visit(flax.core.unfreeze(intermediates) if intermediates is not None else {})
  return found


def routing_metrics(intermediates) -> dict[str, jax.Array]:
  """Layer means of the sown routing statistics (empty for models without routers).

  expert_usage (per layer a vector over experts: the fraction of routed tokens per expert) is
  summarised by its layer-mean minimum and maximum share, and by its normalised load imbalance.
  """
  found = collect_intermediates(intermediates)
  out = {}
  for name, vals in found.items():
    if not vals:
      continue
    if name == 'expert_usage':
      usage = [v.reshape(-1, v.shape[-1]).mean(0) if v.ndim else v[None] for v in vals]
      shares = [u / jnp.maximum(jnp.sum(u), 1e-9) for u in usage]
      out['expert_usage_min'] = jnp.mean(jnp.stack([s.min() for s in shares]))
      out['expert_usage_max'] = jnp.mean(jnp.stack([s.max() for s in shares]))
      continue
    out[name] = jnp.mean(jnp.stack([jnp.mean(v.astype(jnp.float32)) for v in vals]))
  return out


def compute_loss(logits, batch, intermediates, cfg: LossConfig):
  """Total loss and its parts. Returns (loss, metrics) with scalar metrics."""
  targets = batch['decoder_target_tokens']
  weights = batch.get('decoder_loss_weights')
  if weights is None:
    weights = targets > 0
  ce_sum, z_sum, wsum = cross_entropy_with_z(
      logits, targets, weights, z_loss=cfg.z_loss, label_smoothing=cfg.label_smoothing)
  denom = jnp.maximum(wsum, 1.0)
  ce = ce_sum / denom
  z = z_sum / denom
  rm = routing_metrics(intermediates)
  aux = rm.get('aux_loss', jnp.zeros(()))
  rz = rm.get('router_z_loss', jnp.zeros(()))
  loss = ce + z + cfg.aux_factor * aux + cfg.router_z_factor * rz
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * weights
  metrics = dict(rm, loss=loss, cross_entropy=ce, z_loss=z, aux_loss=aux, router_z_loss=rz,
                 accuracy=jnp.sum(correct) / denom, target_tokens=wsum)
  return loss, metrics


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


def make_train_step(model, tx: optax.GradientTransformation, loss_cfg: LossConfig
                    ) -> Callable[[TrainState, Mapping, Any], tuple[TrainState, dict]]:
  """Returns the (un-jitted) step `(state, batch, total_steps) -> (state, metrics)`.

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
      logits, mods = model.apply(variables, *model_inputs(batch), enable_dropout=True,
                                 rngs={'dropout': rng}, mutable=['intermediates'])
      return compute_loss(logits, batch, mods.get('intermediates'), loss_cfg)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model, loss_cfg: LossConfig):
  """`(variables, batch) -> metrics` without dropout (teacher-forced loss on a batch)."""

  def eval_step(variables, batch):
    logits, mods = model.apply(variables, *model_inputs(batch), enable_dropout=False,
                               mutable=['intermediates'])
    _, metrics = compute_loss(logits, batch, mods.get('intermediates'), loss_cfg)
    return metrics

  return eval_step


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
class NonFiniteLossError(RuntimeError):
  pass


class _SigtermFlag:
  """Sets `.raised` on SIGTERM while active (main thread only); restores the old handler."""

  def __init__(self):
    self.raised = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.raised = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


@dataclasses.dataclass
class LoopResult:
  state: TrainState
  stopped_by: str  # 'done' | 'sigterm'
  last_metrics: dict
  history: list


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
) -> LoopResult:
  """Runs `train_step` from `state.step` up to `total_steps`.

  save_fn(state, force) is called after every finite step (it decides whether the step is a
  checkpoint step) and with force=True on SIGTERM and at the end. A non-finite loss or gradient norm
  raises NonFiniteLossError before that step's state is saved, so the last good checkpoint stays.
  """
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  start = int(state.step)
  total = jnp.asarray(total_steps, jnp.int32)
  history = []
  last = {}
  bar = tqdm(total=total_steps, initial=start, desc=desc, disable=not progress_bar,
             dynamic_ncols=True, mininterval=1.0)
  window_tokens, window_time, window_steps = 0.0, 0.0, 0
  stopped_by = 'done'
  with _SigtermFlag() as sigterm:
    step = start
    while step < total_steps:
      if sigterm.raised:
        stopped_by = 'sigterm'
        break
      t0 = time.perf_counter()
      batch = next(batches)
      tokens = float(np.sum(batch['encoder_input_tokens'] > 0) +
                     np.sum(batch['decoder_target_tokens'] > 0))
      new_state, metrics = train_step(state, put_batch(batch), total)
      metrics = jax.device_get(metrics)
      dt = time.perf_counter() - t0
      loss = float(metrics['loss'])
      if not (np.isfinite(loss) and np.isfinite(float(metrics['grad_norm']))):
        bar.close()
        raise NonFiniteLossError(
            f'non-finite loss at step {step + 1} (loss={loss}, cross_entropy='
            f'{float(metrics["cross_entropy"])}, grad_norm={float(metrics["grad_norm"])}); '
            'stopping. The last good checkpoint is kept; lower the learning rate or check the data.')
      state = new_state
      step += 1
      window_tokens += tokens
      window_time += dt
      window_steps += 1
      scalars = {k: float(np.mean(v)) for k, v in metrics.items()}
      last = scalars
      if step == start + 1 or step % log_every == 0 or step == total_steps:
        scalars = dict(scalars, step_time=window_time / window_steps,
                       tokens_per_sec=window_tokens / max(window_time, 1e-9))
        if learning_rate is not None:
          scalars['learning_rate'] = optim.current_learning_rate(learning_rate, step - 1)
        history.append(dict(scalars, step=step))
        if writer is not None:
          writer.write_scalars(step, {f'train/{k}': v for k, v in scalars.items()})
        window_tokens, window_time, window_steps = 0.0, 0.0, 0
        post = {'loss': f'{scalars["loss"]:.3f}', 'ce': f'{scalars["cross_entropy"]:.3f}'}
        if 'aux_loss' in metrics and 'dropped_fraction' in scalars:
          post['aux'] = f'{scalars["aux_loss"]:.3f}'
          post['drop'] = f'{scalars["dropped_fraction"]:.3f}'
        post['tok/s'] = f'{scalars["tokens_per_sec"]:.0f}'
        bar.set_postfix(post, refresh=False)
      bar.update(1)
      if save_fn is not None:
        save_fn(state, False)
    if save_fn is not None:
      save_fn(state, True)
  bar.close()
  if writer is not None:
    writer.flush()
  return LoopResult(state=state, stopped_by=stopped_by, last_metrics=last, history=history)
