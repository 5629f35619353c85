"""gin/t5x/: every file parses as T5X reads it (t5x references may stay unresolved without t5x) and
binds the project's network, adapters and run settings; no remote defaults."""
import glob
import importlib
import os
import re

import gin
import pytest

from sira_jax import gin_utils
from sira_jax.t5.config import T5Config

GIN_DIR = gin_utils.PROJECT_GIN_DIR
T5X_FILES = sorted(os.path.relpath(p, GIN_DIR)
                   for p in glob.glob(os.path.join(GIN_DIR, 't5x', '**', '*.gin'), recursive=True))
MODEL_FILES = [f for f in T5X_FILES if f.startswith('t5x/models/') and
               f not in ('t5x/models/t5_architecture.gin', 't5x/models/sentencepiece.gin')]
ADAPTER_FILES = [f for f in T5X_FILES if f.startswith('t5x/adapters/')]
SIZES = {'small': (512, 8), 'base': (768, 12), 'large': (1024, 24), 'xl': (2048, 24),
         'xxl': (4096, 24), 'tiny': (64, 2)}


pytestmark = pytest.mark.usefixtures('clean_gin')


def _t5x_selectors() -> set:
  """Selectors of the gin/t5x files that need t5x or T5X's `__main__` script (skipped when unknown).

  Only these may stay unresolved: gin skips an unknown selector before registering it dynamically,
  so a blanket skip_unknown=True would silently drop the project's own dynamic bindings too.
  """
  texts = [open(os.path.join(GIN_DIR, f), encoding='utf-8').read() for f in T5X_FILES]
  aliases = set()
  for text in texts:
    for frm, name, alias in re.findall(r'^from ([\w.]+) import (\w+)(?: as (\w+))?', text, re.M):
      try:
        importlib.import_module(f'{frm}.{name}')
      except ImportError:
        aliases.add(alias or name)
    aliases |= set(re.findall(r'^import __main__ as (\w+)', text, re.M))
  selectors = set()
  for text in texts:
    for alias, rest in re.findall(r'\b(\w+)\.([\w.]+)', text):
      if alias in aliases:
        parts = rest.split('.')
        selectors |= {'.'.join([alias] + parts[:i]) for i in range(1, len(parts) + 1)}
  return selectors


def _parse(files, bindings=()):
  gin.add_config_file_search_path(GIN_DIR)
  gin.parse_config_files_and_bindings([os.path.join(GIN_DIR, f) for f in files], list(bindings),
                                      skip_unknown=_t5x_selectors(), finalize_config=False)


def _required(macro) -> bool:
  return repr(gin.query_parameter(f'%{macro}')) == '%gin.REQUIRED'


def test_layout_and_no_remote_paths():
  for sub, names in {'models': ['t5_tiny', 'flan_t5_xxl', 'mt5_xxl', 't5_1_1_xxl'],
                     'adapters': ['lora', 'sira', 'molora', 'adamix', 'smoe_dropout'],
                     'runs': ['pretrain', 'finetune', 'full_finetune', 'eval', 'infer',
                              'moe_partitioning'],
                     'tasks': ['offline_suite', 'xtreme_up', 'multitask']}.items():
    for name in names:
      assert f't5x/{sub}/{name}.gin' in T5X_FILES, (sub, name)
  for f in T5X_FILES:
    with open(os.path.join(GIN_DIR, f), encoding='utf-8') as fh:
      code = [line.split('#')[0] for line in fh]
    assert not any('://' in line for line in code), f


@pytest.mark.parametrize('path', MODEL_FILES)
def test_model_files_bind_sizes_and_vocabulary(path):
  _parse([path])
  cfg = T5Config()
  size = os.path.splitext(path)[0].rsplit('_', 1)[1]
  assert (cfg.d_model, cfg.num_encoder_layers) == SIZES[size]
  assert cfg.vocab_size == (250112 if 'mt5' in path else 384 if 'tiny' in path else 32128)
  assert cfg.adapter.kind == 'none' and cfg.freeze_base  # freezing: the runs files decide
  if 'tiny' not in path:  # SentencePiece sizes need a local vocabulary file
    assert _required('VOCABULARY_PATH')


@pytest.mark.parametrize('path', ADAPTER_FILES)
def test_adapter_files_bind_the_adapter(path):
  _parse(['t5x/models/t5_tiny.gin', path])
  assert T5Config().adapter.kind == os.path.splitext(os.path.basename(path))[0]
  if 'smoe' in path:
    assert _required('SMOE_SCHEDULE_STEPS')


@pytest.mark.parametrize('run,freeze', [('t5x/runs/pretrain.gin', False),
                                        ('t5x/runs/finetune.gin', True),
                                        ('t5x/runs/full_finetune.gin', False),
                                        ('t5x/runs/eval.gin', True), ('t5x/runs/infer.gin', True)])
def test_run_files(run, freeze):
  adapters = [] if 'pretrain' in run or 'full_finetune' in run else ['t5x/adapters/sira.gin']
  _parse(['t5x/models/t5_tiny.gin'] + adapters + [run, 't5x/tasks/offline_suite.gin'])
  assert T5Config().freeze_base is freeze
  required = {'t5x/runs/pretrain.gin': ['MODEL_DIR', 'TRAIN_STEPS'],
              't5x/runs/finetune.gin': ['MODEL_DIR', 'TRAIN_STEPS', 'INITIAL_CHECKPOINT_PATH'],
              't5x/runs/full_finetune.gin': ['MODEL_DIR', 'TRAIN_STEPS',
                                             'INITIAL_CHECKPOINT_PATH'],
              't5x/runs/eval.gin': ['CHECKPOINT_PATH', 'EVAL_OUTPUT_DIR'],
              't5x/runs/infer.gin': ['CHECKPOINT_PATH', 'INFER_OUTPUT_DIR']}[run]
  for macro in required:
    assert _required(macro), macro
  assert gin.query_parameter('%TASK_NAME') == 'offline_suite_mix'
  if 'pretrain' in run or 'finetune' in run:
    assert gin.query_parameter('%USE_CACHED_TASKS') is False
  else:
    assert gin.query_parameter('%SPLIT') == 'validation'


def test_moe_partitioning_switches_adapters_to_the_einsum_form():
  _parse(['t5x/models/t5_tiny.gin', 't5x/adapters/sira.gin', 't5x/runs/finetune.gin',
          't5x/runs/moe_partitioning.gin'])
  cfg = T5Config()
  assert cfg.adapter.kind == 'sira' and cfg.adapter.expert_compute == 'einsum'
  assert repr(gin.query_parameter('%NUM_EXPERT_PARTITIONS')) == '%NUM_EXPERTS'
