"""Checkpointing: exact resume, SIGTERM, kill -9 during a save, adapter-only contents, NaN stop."""
import glob
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from sira_jax import checkpoints as ckpt_lib
from sira_jax import optim
from sira_jax import restore
from sira_jax import train as train_lib
from sira_jax import trainer as trainer_lib
from sira_jax.adapters import trainable_mask
from tests import trainer_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module', autouse=True)
def _task():
  fx.register_fixture_task()


def _train(model_dir, **kw):
  args = dict(model_dir=str(model_dir), mixture_or_task_name=fx.FIXTURE_TASK,
              task_feature_lengths=fx.LENGTHS, train_steps=6, batch_size=8,
              model_config=fx.tiny_config('sira', expert_dropout_rate=0.2, router_jitter=0.1),
              checkpoint_every=2, keep_checkpoints=2, progress_bar=False, tensorboard=False,
              learning_rate=1e-2, optimizer_name='adamw', mesh_shape={'data': 1})
  args.update(kw)
  return train_lib.train(**args)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.mark.slow
def test_resume_after_sigterm_equals_uninterrupted(tmp_path):
  full = _train(tmp_path / 'a')
  assert full.stopped_by == 'done' and full.step == 6

  def preempt(step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler turns this into save-and-stop

  part = _train(tmp_path / 'b', on_step=preempt)
  assert part.stopped_by == 'sigterm' and part.step == 3
  mngr = ckpt_lib.CheckpointManager(str(tmp_path / 'b' / 'checkpoints'))
  assert mngr.latest_step() == 3  # saved on SIGTERM although 3 is not a checkpoint step
  resumed = _train(tmp_path / 'b')
  assert resumed.step == 6
  a, b = _leaves(full.state.params), _leaves(resumed.state.params)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(_leaves(full.state.opt_state), _leaves(resumed.state.opt_state)):
    np.testing.assert_array_equal(x, y)
  # Losses logged after the resume equal the uninterrupted run's at the same steps.
  fa = {h['step']: h['loss'] for h in full.history}
  fb = {h['step']: h['loss'] for h in resumed.history}
  assert fb and all(fa[s] == fb[s] for s in fb if s in fa)


def test_saves_every_n_steps_and_when_forced(tmp_path):
  # orbax's save decision (every 2 steps; a fresh run's first step is no exception), plus forced
  # saves of other steps (the end of a run, SIGTERM); a step already saved is never rewritten.
  mngr = ckpt_lib.CheckpointManager(str(tmp_path / 'c'), save_every=2, keep=5)
  state = {'w': np.zeros((2,), np.float32)}
  saved = [s for s in range(1, 6) if mngr.save(s, state, {})]
  assert saved == [2, 4] and mngr.all_steps() == [2, 4]
  assert not mngr.should_save(4) and mngr.should_save(6) and not mngr.should_save(5)
  assert mngr.save(5, state, {}, force=True) and mngr.all_steps() == [2, 4, 5]
  assert not mngr.save(5, state, {}, force=True)
  assert mngr.read_meta(5)['step'] == 5
  mngr.close()


def test_adapter_only_checkpoint_holds_no_base(tmp_path):
  res = _train(tmp_path / 'r', train_steps=2)
  mngr = ckpt_lib.CheckpointManager(str(tmp_path / 'r' / 'checkpoints'))
  meta = mngr.read_meta()
  assert meta['includes_base'] is False and meta['step'] == 2
  names = os.listdir(tmp_path / 'r' / 'checkpoints' / '2' / 'state')
  assert names  # written
  # Restoring reads only the trainable params: every restored leaf is an adapter/router param.
  model, variables, _, step = restore.load_trained(str(tmp_path / 'r'))
  assert step == 2
  flat = jax.tree_util.tree_flatten_with_path(res.state.params)[0]
  assert flat and all(any(n in jax.tree_util.keystr(p) for n in ('lora_a', 'lora_b', 'router'))
                      for p, _ in flat)
  restored = optim.partition_params(
      variables['params'], trainable_mask(variables['params']))[0]
  for x, y in zip(_leaves(res.state.params), _leaves(restored)):
    np.testing.assert_array_equal(x, y)
  # The full-state option stores the frozen base as well.
  _train(tmp_path / 'f', train_steps=2, full_checkpoints=True)
  meta = ckpt_lib.CheckpointManager(str(tmp_path / 'f' / 'checkpoints')).read_meta()
  assert meta['includes_base'] is True


@pytest.mark.slow
def test_restore_recreates_frozen_non_base_params_from_the_runs_seed(tmp_path):
  # SMoE-Dropout's fixed random router is frozen and not part of any base, so an adapter-only
  # checkpoint does not hold it (nor a random base's weights, here: no initial checkpoint):
  # restoring must re-create them from the run's seed, not from seed 0.
  cfg = fx.tiny_config('smoe_dropout', num_experts=4, top_k=1)
  res = _train(tmp_path / 's', train_steps=2, seed=3, model_config=cfg)
  _, variables, _, _ = restore.load_trained(str(tmp_path / 's'))
  trained = optim.merge_params(res.state.params, res.state.frozen)
  flat_a = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(trained))[0])
  flat_b = dict(jax.tree_util.tree_flatten_with_path(variables['params'])[0])
  assert flat_a.keys() == flat_b.keys()
  assert any('smoe_router_kernel' in jax.tree_util.keystr(p) for p in flat_a)
  for p, x in flat_a.items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_b[p]),
                                  err_msg=jax.tree_util.keystr(p))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # SGD with an absurd learning rate: step 1 is finite, its update blows the params up.
  with pytest.raises(trainer_lib.NonFiniteLossError,
                     match=r'non-finite .* at step \d.*The newest checkpoint, step (\d+) in '
                           r'.*checkpoints, is finite and kept') as e:
    _train(tmp_path / 'n', optimizer_name='sgd', learning_rate=1e30, checkpoint_every=1)
  mngr = ckpt_lib.CheckpointManager(str(tmp_path / 'n' / 'checkpoints'))
  step = mngr.latest_step()
  assert step is not None and step >= 1 and f'step {step} in' in str(e.value)
  _, variables, _, _ = restore.load_trained(str(tmp_path / 'n'))
  assert all(np.all(np.isfinite(x)) for x in _leaves(variables['params']))


def test_non_finite_state_is_never_saved(tmp_path, clean_gin):
  # Adam with a NaN moment decay: the loss of step 1 is finite, the params it leaves are NaN.
  # Nothing non-finite is saved; the error says there is no checkpoint.
  import gin
  gin.bind_parameter('make_optimizer.b1', float('nan'))
  with pytest.raises(trainer_lib.NonFiniteLossError,
                     match=r'non-finite parameters or optimizer state after the update at step 1'
                           r'.*No checkpoint was written \(checkpoint_every=1\)'):
    _train(tmp_path / 'n', checkpoint_every=1)
  assert not os.listdir(tmp_path / 'n' / 'checkpoints')
  # The summary has the logged step... none: the refused step is not logged.
  assert not (tmp_path / 'n' / 'train_summary.json').exists()


_SAVER = textwrap.dedent('''
    import os, sys, time, numpy as np
    from sira_jax.checkpoints import CheckpointManager
    mngr = CheckpointManager(sys.argv[1], save_every=1, keep=5)
    small = {'w': np.full((4, 4), 1.0, np.float32), 'step': np.int32(1)}
    mngr.save(1, small, {'note': 'first'})
    big = {'w%d' % i: np.full((512, 1024), 2.0, np.float32) for i in range(4)}
    big['step'] = np.int32(2)
    real_rename = os.rename
    def rename_then_hang(src, dst, *a, **kw):
      # The moment orbax commits step 2 (every byte written, the temporary directory not yet
      # renamed): tell the parent and wait for its SIGKILL. Timing-independent, so the test
      # kills inside the save on any machine, fast or slow.
      if 'orbax-checkpoint-tmp' in os.fspath(src):
        print('COMMITTING', os.fspath(src), flush=True)
        time.sleep(600)
      return real_rename(src, dst, *a, **kw)
    os.rename = rename_then_hang
    print('SAVING', flush=True)
    mngr.save(2, big, {'note': 'second'})
    print('SAVED', flush=True)
''')


def test_kill_9_during_save_leaves_previous_checkpoint(tmp_path):
  d = str(tmp_path / 'ck')
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen([sys.executable, '-c', _SAVER, d], stdout=subprocess.PIPE, env=env,
                          cwd=ROOT, text=True)
  try:
    assert proc.stdout.readline().strip() == 'SAVING'
    line = proc.stdout.readline().split()
    assert line and line[0] == 'COMMITTING', line
    tmp_dir = line[1]
    assert os.path.isdir(tmp_dir) and os.listdir(tmp_dir), tmp_dir  # step 2's bytes are there
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  mngr = ckpt_lib.CheckpointManager(d)
  assert mngr.latest_step() == 1, mngr.all_steps()
  state, meta = mngr.restore({'w': np.zeros((4, 4), np.float32), 'step': np.int32(0)})
  assert meta['note'] == 'first'
  np.testing.assert_array_equal(np.asarray(state['w']), np.ones((4, 4)))


def _snapshot(d):
  return {os.path.relpath(os.path.join(r, f), d): os.path.getmtime(os.path.join(r, f))
          for r, _, fs in os.walk(d) for f in fs}


def _zero_arrays(step_dir):
  for f in glob.glob(str(step_dir / 'state' / '**' / 'd' / '*'), recursive=True):
    with open(f, 'r+b') as fh:
      fh.write(b'\0' * os.path.getsize(f))


def test_damaged_checkpoint_falls_back_to_newest_intact_step(tmp_path, capfd):
  d = tmp_path / 'r'
  first = _train(d, train_steps=4)  # checkpoints 2 and 4
  assert [h['step'] for h in first.history] == [1, 4]
  _zero_arrays(d / 'checkpoints' / '4')
  before = _snapshot(d)
  # By flag: stop, naming the damaged step; nothing in MODEL_DIR is touched.
  with pytest.raises(ckpt_lib.CheckpointError, match=r'checkpoint step 4 in .*checkpoints is damaged'):
    _train(d, train_steps=6, fallback_to_intact_checkpoint=False)
  assert _snapshot(d) == before
  # Default: report step 4, resume from step 2, keep the damaged step aside.
  capfd.readouterr()
  res = _train(d, train_steps=6)
  err = capfd.readouterr().err
  assert 'checkpoint step 4' in err and 'damaged' in err and 'resuming from step 2' in err
  assert 'Event loop is closed' not in err and 'Traceback' not in err
  assert res.step == 6 and (d / 'damaged_checkpoints' / '4' / 'state').is_dir()
  assert ckpt_lib.CheckpointManager(str(d / 'checkpoints')).all_steps() == [4, 6]
  # train_summary.json keeps the history before the resume point.
  with open(d / 'train_summary.json') as f:
    assert [h['step'] for h in json.load(f)['history']] == [1, 3, 6]
  # A checkpoint whose state metadata is gone: an error naming the checkpoint, or the fallback.
  os.remove(d / 'checkpoints' / '6' / 'state' / '_METADATA')
  with pytest.raises(ckpt_lib.CheckpointError, match=r'checkpoint step 6 in .*checkpoints is damaged'):
    _train(d, train_steps=8, fallback_to_intact_checkpoint=False)
  # Eval/infer's loader skips a step whose arrays cannot be read, saying so.
  _zero_arrays(d / 'checkpoints' / '6')
  capfd.readouterr()
  assert restore.load_trained(str(d))[3] == 4
  assert 'checkpoint step 6' in capfd.readouterr().err
  # Already past TRAIN_STEPS: said plainly, nothing trained.
  capfd.readouterr()
  res = _train(d, train_steps=3)
  assert res.step == 4 and 'already holds step 4 >= TRAIN_STEPS 3' in capfd.readouterr().err
