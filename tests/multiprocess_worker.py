"""Worker for tests/test_multiprocess.py: one process of a 2-process CPU jax.distributed run.

Usage: python multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES OUT_JSON PARAMS_NPZ
(XLA_FLAGS with the local device count is set by the parent.)
"""
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
  port, pid, nproc, out, params = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
                                   sys.argv[5])
  from sira_jax import partitioning
  partitioning.initialize_distributed(f'127.0.0.1:{port}', num_processes=nproc, process_id=pid,
                                      cpu_collectives='gloo')
  import sharded_step
  assert jax.process_count() == nproc, jax.process_count()
  mesh = partitioning.make_mesh(data=2, expert=2, model=2)
  loss, grads, _ = sharded_step.run(mesh, process_local_batch=True,
                                    params=sharded_step.load_params(params))
  value, sums = sharded_step.summary(loss, grads)
  with open(out, 'w') as f:
    json.dump({'loss': value, 'grad_summary': sums.tolist(), 'process_index': jax.process_index(),
               'global_devices': jax.device_count(), 'local_devices': jax.local_device_count()}, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
