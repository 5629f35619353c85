"""tasks/README.md's XTREME-UP train and eval commands run as written on fixture files in the
release's format (a partial directory: NER in two languages)."""
import json
import os

import pytest
from readme_blocks import run_sh_block

from test_xtreme_up import write_release


@pytest.mark.slow
def test_readme_train_and_eval_commands_run_as_written(tmp_path):
  write_release(str(tmp_path / 'xtreme-up-v1.1.jsonl'), families=('ner',),
                languages=['yo', 'sw'])
  proc = run_sh_block(os.path.join('tasks', 'README.md'), 'xtreme_up', tmp_path,
                      unset=('XTREME_UP_DATA_DIR',))
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
