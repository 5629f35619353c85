"""tasks/README.md's XTREME-UP train and eval commands run as written on fixture files in the
release's format (a partial directory: NER in two languages)."""
import json
import os
import subprocess
import sys

import pytest
from readme_blocks import sh_block

from test_xtreme_up import write_release

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_commands():
  return sh_block(os.path.join('tasks', 'README.md'), 'xtreme_up')


@pytest.mark.slow
def test_readme_train_and_eval_commands_run_as_written(tmp_path):
  write_release(str(tmp_path / 'xtreme-up-v1.1.jsonl'), families=('ner',),
                languages=['yo', 'sw'])
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3',
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  env.pop('XTREME_UP_DATA_DIR', None)
  proc = subprocess.run(['bash', '-euo', 'pipefail', '-c', _readme_commands()], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  run = tmp_path / 'runs' / 'xtreme_up_ner'
  record = json.loads((run / 'run_config.json').read_text())['xtreme_up']
  assert record['data_dir'] == str(tmp_path / 'xtreme-up-v1.1.jsonl')
  # The partial directory registered NER yo/sw and said what it lacks.
  assert 'is partial: registered 2 tasks (ner: sw yo)' in proc.stderr
  # Eval registered the run's tasks itself (no data dir on its command line) and summarised.
  metrics = json.loads((run / 'eval' / 'metrics_xtreme_up_ner_20_test.json').read_text())
  assert set(metrics['metrics']) == {'xtreme_up_ner_sw', 'xtreme_up_ner_yo'}
  assert set(metrics['summary']['families']) == {'xtreme_up_ner'}
  assert 'mean over 2 tasks: span_f1=' in proc.stderr
