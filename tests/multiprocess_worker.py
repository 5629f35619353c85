"""Worker for tests/test_multiprocess.py: one process of a 2-process CPU jax.distributed run.

Usage: python multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_JSON MODE ARG
  MODE 'step':    ARG is the params .npz; one sharded SiRA step on a 2x2x2 mesh.
  MODE 'preempt': ARG is a work directory; three trainings with `train.train` (6 steps each): an
                  uninterrupted one, one where process 1 alone sends itself SIGTERM after step
                  SIGNAL_STEP, and the resume of that one. Each run's params go to
                  <ARG>/<run>_params<process>.npz.
  MODE 'sync_point': ARG is unused; process 1 sends itself SIGTERM before the loop, while JAX's
                  preemption service holds SIGTERM, then `trainer.train_loop` runs a least-squares
                  step for up to SYNC_POINT_STEPS steps.
(XLA_FLAGS with the local device count is set by the parent.)
"""
import json
import os
import signal
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIGNAL_STEP = 2
TRAIN_STEPS = 6
SYNC_POINT_STEPS = 1000
# The coordination-service key under which JAX's (TSL's) preemption sync manager publishes a notice.
PREEMPTION_NOTICE_KEY = 'RECEIVED_PREEMPTION_NOTICE'


def sharded_step_result(params):
  from sira_jax import partitioning
  import sharded_step
  mesh = partitioning.make_mesh(data=2, expert=2, model=2)
  loss, grads, _ = sharded_step.run(mesh, process_local_batch=True,
                                    params=sharded_step.load_params(params))
  value, sums = sharded_step.summary(loss, grads)
  return {'loss': value, 'grad_summary': sums.tolist()}


def preemption_result(workdir):
  """{run: {stopped_by, step, losses {step: loss}}} for the runs 'full', 'part' and 'resumed'."""
  from jax.experimental import multihost_utils
  from sira_jax import train as train_lib
  import trainer_fixtures as fx
  fx.register_fixture_task()

  def preempt_process_1(step):
    if jax.process_index() == 1 and step == SIGNAL_STEP:
      os.kill(os.getpid(), signal.SIGTERM)

  def run(name, model_dir, on_step=None):
    res = train_lib.train(
        model_dir=os.path.join(workdir, model_dir), mixture_or_task_name=fx.FIXTURE_TASK,
        task_feature_lengths=fx.LENGTHS, train_steps=TRAIN_STEPS, batch_size=8,
        model_config=fx.tiny_config('sira', expert_dropout_rate=0.2, router_jitter=0.1),
        checkpoint_every=4, keep_checkpoints=3, log_every=1, progress_bar=False,
        tensorboard=False, learning_rate=1e-2, optimizer_name='adamw', on_step=on_step)
    params = multihost_utils.process_allgather(res.state.params, tiled=True)
    flat = {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(workdir, f'{name}_params{jax.process_index()}.npz'), **flat)
    return {'stopped_by': res.stopped_by, 'step': res.step,
            'losses': {h['step']: h['loss'] for h in res.history}}

  return {'full': run('full', 'a'), 'part': run('part', 'b', preempt_process_1),
          'resumed': run('resumed', 'b')}


def sync_point_result():
  """{stopped_by, step, saves [[step, force], ...]}: the loop stopped by JAX's preemption sync point
  for a SIGTERM that JAX's own handler took before the loop installed its handler."""
  import jax.numpy as jnp
  import optax
  from jax._src import distributed
  from sira_jax import partitioning
  from sira_jax import trainer as trainer_lib
  if jax.process_index() == 1:
    os.kill(os.getpid(), signal.SIGTERM)  # caught by JAX's handler (no Python handler yet)
  # Wait (a condition, not a sleep) until every process's sync manager can see the notice.
  distributed.global_state.client.blocking_key_value_get(PREEMPTION_NOTICE_KEY, 60_000)
  rep = partitioning.replicated(partitioning.make_mesh(data=-1))
  tx = optax.sgd(0.1)
  state = jax.jit(lambda: trainer_lib.create_state(
      {'params': {'w': jnp.zeros((4,))}}, tx, trainable_mask=None,
      rng=jax.random.PRNGKey(0)), out_shardings=rep)()
  target = jnp.arange(4.0)

  def step(state, batch, total_steps):
    del batch, total_steps
    loss, grads = jax.value_and_grad(lambda p: jnp.sum((p['w'] - target) ** 2))(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {'loss': loss, 'cross_entropy': loss, 'grad_norm': optax.global_norm(grads)}
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), metrics

  tokens = np.ones((2, 2), np.int32)
  batches = iter(lambda: {'encoder_input_tokens': tokens, 'decoder_target_tokens': tokens}, None)
  saves = []
  loop = trainer_lib.train_loop(
      state, jax.jit(step, out_shardings=(rep, rep)), batches, total_steps=SYNC_POINT_STEPS,
      save_fn=lambda s, force: saves.append([int(s.step), force]), progress_bar=False)
  return {'stopped_by': loop.stopped_by, 'step': int(loop.state.step), 'saves': saves}


def main():
  port, pid, nproc, out, mode, arg = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                      sys.argv[4], sys.argv[5], sys.argv[6])
  from sira_jax import partitioning
  partitioning.initialize_distributed(f'127.0.0.1:{port}', num_processes=nproc, process_id=pid,
                                      cpu_collectives='gloo')
  assert jax.process_count() == nproc, jax.process_count()
  result = {'step': lambda: sharded_step_result(arg), 'preempt': lambda: preemption_result(arg),
            'sync_point': sync_point_result}[mode]()
  with open(out, 'w') as f:
    json.dump(dict(result, process_index=jax.process_index(), global_devices=jax.device_count(),
                   local_devices=jax.local_device_count()), f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
