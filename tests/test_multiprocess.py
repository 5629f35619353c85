"""Two local processes (4 CPU devices each, gloo) run the sharded SiRA step == one process."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import sharded_step

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_distributed_step_matches_single_process(tmp_path):
  port = _free_port()
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = os.pathsep.join([os.path.dirname(HERE), env.get('PYTHONPATH', '')])
  params = tmp_path / 'params.npz'
  sharded_step.save_params(params)
  procs, outs = [], []
  for pid in range(2):
    out = tmp_path / f'out{pid}.json'
    outs.append(out)
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(HERE, 'multiprocess_worker.py'), str(port), str(pid), '2',
         str(out), str(params)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  # The single-process reference runs while the workers compile.
  loss, grads, _ = sharded_step.run(None)
  ref_loss, ref_sums = sharded_step.summary(loss, grads)
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  results = [json.loads(o.read_text()) for o in outs]
  assert sorted(r['process_index'] for r in results) == [0, 1]
  for r in results:
    assert r['global_devices'] == 8 and r['local_devices'] == 4
    assert abs(r['loss'] - ref_loss) < 1e-5, (r['loss'], ref_loss)
    np.testing.assert_allclose(r['grad_summary'], ref_sums, atol=1e-5)
