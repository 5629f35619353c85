"""Two local CPU processes (gloo) under jax.distributed: the sharded SiRA step equals one process's;
a SIGTERM to one process stops both at the same step, saved, and the run resumes exactly; a
SIGTERM that JAX's preemption service took before the loop stops both at its sync point."""
import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import multiprocess_worker
import sharded_step
from sira_jax import checkpoints as ckpt_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_workers(tmp_path, mode, arg, local_devices, while_running=lambda: None):
  """Runs the two worker processes (`multiprocess_worker.py ... MODE ARG`); returns their JSON
  results ordered by process index. while_running() is called while they run."""
  port = _free_port()
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={local_devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join([os.path.dirname(HERE), env.get('PYTHONPATH', '')])
  procs, outs = [], []
  for pid in range(2):
    out = tmp_path / f'out{pid}.json'
    outs.append(out)
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(HERE, 'multiprocess_worker.py'), str(port), str(pid), '2',
         str(out), mode, str(arg)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True))
  logs = []
  try:
    while_running()
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  results = [json.loads(o.read_text()) for o in outs]
  assert [r['process_index'] for r in results] == [0, 1]
  for r in results:
    assert r['global_devices'] == 2 * local_devices and r['local_devices'] == local_devices
  return results


@pytest.mark.slow
def test_two_process_distributed_step_matches_single_process(tmp_path):
  params = tmp_path / 'params.npz'
  sharded_step.save_params(params)
  ref = {}

  def reference():  # the single-process reference runs while the workers compile
    ref['loss'], ref['sums'] = sharded_step.summary(*sharded_step.run(None)[:2])

  for r in _run_workers(tmp_path, 'step', params, local_devices=4, while_running=reference):
    assert abs(r['loss'] - ref['loss']) < 1e-5, (r['loss'], ref['loss'])
    np.testing.assert_allclose(r['grad_summary'], ref['sums'], atol=1e-5)


def _params(path):
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(tmp_path):
  results = _run_workers(tmp_path, 'preempt', tmp_path, local_devices=2)
  steps = multiprocess_worker.TRAIN_STEPS
  # Process 1 alone got SIGTERM after step SIGNAL_STEP; its stop reached process 0 with the next
  # step's metrics, so both stopped after that step and both report it.
  stop = multiprocess_worker.SIGNAL_STEP + 1
  for r in results:
    assert (r['full']['stopped_by'], r['full']['step']) == ('done', steps)
    assert (r['part']['stopped_by'], r['part']['step']) == ('sigterm', stop)
    assert (r['resumed']['stopped_by'], r['resumed']['step']) == ('done', steps)
  # The stop step is saved (not a checkpoint_every=4 step), completely: orbax left no temporary
  # directory, and its metadata and state read back.
  ckpt_dir = tmp_path / 'b' / 'checkpoints'
  assert not glob.glob(str(ckpt_dir / '*tmp*'))
  mngr = ckpt_lib.CheckpointManager(str(ckpt_dir), create=False)
  assert mngr.all_steps() == [stop, 4, steps]
  assert mngr.read_meta(stop)['step'] == stop
  mngr.close()
  # Nothing lost: the interrupted run's losses up to the stop and the resumed run's after it equal
  # the uninterrupted run's at the same steps, on both processes, and so do the final params.
  for r in results:
    full = {int(s): v for s, v in r['full']['losses'].items()}
    part = {int(s): v for s, v in r['part']['losses'].items()}
    resumed = {int(s): v for s, v in r['resumed']['losses'].items()}
    assert sorted(part) == list(range(1, stop + 1))
    assert sorted(s for s in resumed if s > stop) == list(range(stop + 1, steps + 1))
    assert all(part[s] == full[s] for s in part)
    assert all(resumed[s] == full[s] for s in resumed if s > stop)
  for pid in range(2):
    full, resumed = (_params(tmp_path / f'{run}_params{pid}.npz') for run in ('full', 'resumed'))
    assert full.keys() == resumed.keys() and full
    for k in full:
      np.testing.assert_array_equal(full[k], resumed[k], err_msg=k)


def test_sigterm_taken_by_jax_before_the_loop_stops_both_at_the_sync_point(tmp_path):
  results = _run_workers(tmp_path, 'sync_point', '-', local_devices=1)
  stop = results[0]['step']
  assert 1 <= stop < multiprocess_worker.SYNC_POINT_STEPS
  for r in results:
    assert (r['stopped_by'], r['step']) == ('sigterm', stop)
    # Every step was offered to save_fn, then the stop step once more with force=True.
    assert r['saves'] == [[s, False] for s in range(1, stop + 1)] + [[stop, True]]


@pytest.mark.slow
def test_cli_on_two_processes_joins_them_and_overwrites_another_run_once(tmp_path):
  """The training CLI on two processes (JAX_* environment, as a pod's hosts would get): both join
  one run (`process i of 2`), and --overwrite of a MODEL_DIR holding another run clears it once
  (process 0; two processes clearing at once race) after both have read it."""
  model_dir = tmp_path / 'run'
  (model_dir / 'checkpoints' / '7').mkdir(parents=True)
  (model_dir / 'checkpoints' / '7' / 'state').write_text('another run')
  (model_dir / 'run_config.json').write_text(json.dumps({'another': 'run'}))
  port = _free_port()
  cmd = [sys.executable, '-m', 'sira_jax.train', '--overwrite'] + [
      f'--gin_file={f}' for f in ('models/t5_tiny.gin', 'adapters/lora.gin', 'runs/finetune.gin')
  ] + [f'--gin.MODEL_DIR={model_dir}', '--gin.MIXTURE_OR_TASK_NAME=offline_currency_en',
       '--gin.TRAIN_STEPS=2', '--gin.BATCH_SIZE=4', '--gin.INITIAL_CHECKPOINT_PATH=None',
       "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}",
       "--gin.train.mesh_shape={'data': 2}", '--gin.train.progress_bar=False',
       '--gin.train.tensorboard=False']
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(pid), JAX_PLATFORMS='cpu', PYTHONPATH=os.path.dirname(HERE),
               XLA_FLAGS='--xla_force_host_platform_device_count=1')
    procs.append(subprocess.Popen(cmd, cwd=os.path.dirname(HERE), env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  try:
    logs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for pid, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, log[-3000:]
    assert 'done: step 2 ' in log and f'process {pid} of 2' in log, log[-3000:]
  assert sorted(os.listdir(model_dir / 'checkpoints')) == ['2']  # the other run's step 7 is gone
  config = json.loads((model_dir / 'run_config.json').read_text())
  assert config['mixture_or_task_name'] == 'offline_currency_en'
