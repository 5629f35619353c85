"""tasks/README.md's TFDS commands run as written: build two configs of the offline suite as a
TFDS dataset, train a tiny T5 on gin/tasks/tfds_task.gin's mixture of TFDS-backed tasks, and
evaluate it from the run's recorded registration (about a minute on two CPU cores)."""
import json
import os

import pytest
from readme_blocks import run_sh_block


@pytest.mark.slow
def test_readme_tfds_build_train_and_eval_run_as_written(tmp_path):
  proc = run_sh_block(os.path.join('tasks', 'README.md'), 'offline_suite_tfds', tmp_path,
                      unset=('TFDS_DATA_DIR',))
  data_dir = tmp_path / 'tensorflow_datasets'
  assert (data_dir / 'offline_suite' / 'unit_fr' / '1.0.0' / 'dataset_info.json').is_file()
  run = tmp_path / 'runs' / 'tfds_offline_mix'
  record = json.loads((run / 'run_config.json').read_text())['tfds']
  assert {t['name']: t['tfds_data_dir'] for t in record['tasks']} == {
      'tfds_offline_date_de': str(data_dir), 'tfds_offline_unit_fr': str(data_dir)}
  assert json.loads((run / 'train_summary.json').read_text())['step'] == 20
  # Eval registered the run's TFDS tasks itself (no TFDS setting on its command line).
  metrics = json.loads((run / 'eval' / 'metrics_tfds_offline_mix_20_test.json').read_text())
  assert set(metrics['metrics']) == {'tfds_offline_date_de', 'tfds_offline_unit_fr'}
  assert all(set(m) == {'sequence_accuracy', 'chrf'} for m in metrics['metrics'].values())
  assert 'mean over 2 tasks: chrf=' in proc.stdout + proc.stderr
