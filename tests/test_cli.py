"""Command-line behaviour: bad input refused before training (nothing written), SIGTERM in the CLI."""
import json
import os
import re
import signal
import subprocess
import sys
import threading

import gin
import numpy as np
import pytest

from sira_jax import checkpoints as ckpt_lib
from sira_jax import data as data_lib
from sira_jax import gin_utils
from sira_jax import model_init
from sira_jax import train as train_lib
from sira_jax.run_dir import ConfigError
from sira_jax.t5.config import T5Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = ['models/t5_tiny.gin', 'adapters/sira.gin', 'runs/finetune.gin']
TASK = 'offline_currency_en'


pytestmark = pytest.mark.usefixtures('clean_gin')


def _bindings(model_dir, base=None, **extra):
  b = [f"MODEL_DIR = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = '{TASK}'", 'TRAIN_STEPS = 1',
       'BATCH_SIZE = 4', "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 32}",
       f"INITIAL_CHECKPOINT_PATH = {base!r}" if base else 'INITIAL_CHECKPOINT_PATH = None',
       'train.progress_bar = False', 'train.tensorboard = False', "train.mesh_shape = {'data': 1}"]
  return b + [f'{k} = {v}' for k, v in extra.items()]


def _run(model_dir, files=FINETUNE, base=None, bindings=(), overwrite=False):
  return train_lib.train_from_gin(files, _bindings(model_dir, base) + list(bindings),
                                  overwrite=overwrite)


def _snapshot(d):
  out = {}
  for root, _, files in os.walk(d):
    for f in files:
      p = os.path.join(root, f)
      out[p] = (os.path.getmtime(p), os.path.getsize(p))
  return out


def test_unknown_task_lists_close_names(tmp_path):
  d = tmp_path / 'run'
  with pytest.raises(ValueError, match=r"offline_curency_en.*offline_currency_en"):
    _run(d, bindings=["MIXTURE_OR_TASK_NAME = 'offline_curency_en'"])
  assert not d.exists()


@pytest.mark.parametrize('binding,match', [
    ('trian.batch_size = 4', 'trian'),                       # unknown configurable
    ('train.bach_size = 4', 'bach_size'),                    # unknown parameter
    ('adapter/AdapterConfig.topk = 2', 'topk'),
])
def test_gin_typo_is_refused(tmp_path, binding, match):
  d = tmp_path / 'run'
  with pytest.raises(gin_utils.GinConfigError, match=match):
    _run(d, bindings=[binding])
  assert not d.exists()


@pytest.mark.parametrize('binding,match', [
    ('TOP_K = 5', r'top_k.*k=5.*num_experts=4'),
    ('CAPACITY_FACTOR = 0.0', r'capacity_factor: must be > 0'),
    ('CAPACITY_FACTOR = -1.0', r'capacity_factor: must be > 0'),
])
def test_bad_routing_config_is_refused(tmp_path, binding, match):
  d = tmp_path / 'run'
  with pytest.raises(ValueError, match=match):
    _run(d, bindings=[binding])
  assert not d.exists()


def test_base_checkpoint_not_matching_model_config(tmp_path):
  # A base written for another size (d_model 32 instead of the tiny model's 64).
  other = model_init.config_to_dict(T5Config(
      vocab_size=384, d_model=32, d_ff=128, num_heads=4, d_kv=16, num_encoder_layers=2,
      num_decoder_layers=2))
  ckpt_lib.save_base_params(str(tmp_path / 'base_other'),
                            {'token_embedder': {'embedding': np.zeros((384, 32), np.float32)}},
                            other)
  d = tmp_path / 'run'
  with pytest.raises(ValueError, match=r'does not match the checkpoint .*base_other.*d_model: '
                                       r'configured 64 vs checkpoint 32'):
    _run(d, base=str(tmp_path / 'base_other'))
  assert not d.exists()
  # Same config recorded, but a parameter of the wrong shape: the error names it and both shapes.
  gin.clear_config()
  gin_utils.parse_gin(['models/t5_tiny.gin'], [], ['.', gin_utils.PROJECT_GIN_DIR])
  tiny = model_init.config_to_dict(T5Config())
  gin.clear_config()
  ckpt_lib.save_base_params(str(tmp_path / 'base_bad'),
                            {'token_embedder': {'embedding': np.zeros((300, 64), np.float32)}},
                            tiny)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r'token_embedder/embedding has shape \(300, 64\).*expects \(384, 64\)'):
    _run(d, base=str(tmp_path / 'base_bad'))
  assert not d.exists()


@pytest.mark.slow
def test_model_dir_with_another_config_needs_overwrite(tmp_path):
  d = tmp_path / 'run'
  first = _run(d)
  assert first.step == 1
  before = _snapshot(d)
  lora = ['models/t5_tiny.gin', 'adapters/lora.gin', 'runs/finetune.gin']
  gin.clear_config()
  with pytest.raises(ConfigError, match=r'another config.*sira.*lora.*--overwrite'):
    _run(d, files=lora)
  assert _snapshot(d) == before  # nothing overwritten
  gin.clear_config()
  second = _run(d, files=lora, overwrite=True)
  assert second.step == 1
  with open(d / 'run_config.json') as f:
    assert json.load(f)['model_config']['adapter']['kind'] == 'lora'


@pytest.mark.slow
def test_cli_sigterm_saves_and_exits_zero(tmp_path):
  d = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'sira_jax.train'] + [f'--gin_file={f}' for f in FINETUNE] + [
      f'--gin.MODEL_DIR={d}', f'--gin.MIXTURE_OR_TASK_NAME={TASK}', '--gin.TRAIN_STEPS=100000',
      '--gin.BATCH_SIZE=4', "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}",
      '--gin.INITIAL_CHECKPOINT_PATH=None', "--gin.train.mesh_shape={'data': 1}",
      '--gin.train.checkpoint_every=100000']
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='')
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  err = []
  started = threading.Event()

  def read_err():  # tqdm writes "train: ... | N/100000" to stderr
    buf = ''
    while True:
      ch = proc.stderr.read(1)
      if not ch:
        return
      buf += ch
      err.append(ch)
      m = re.findall(r'\| *(\d+)/100000', buf[-200:])
      if m and int(m[-1]) >= 3:
        started.set()

  t = threading.Thread(target=read_err, daemon=True)
  t.start()
  assert started.wait(240), ''.join(err)[-3000:]
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  t.join(5)
  assert proc.returncode == 0, ''.join(err)[-3000:]
  m = re.search(r'sigterm: step (\d+)', out)
  assert m, out
  step = int(m.group(1))
  assert step >= 3
  assert ckpt_lib.CheckpointManager(str(d / 'checkpoints')).latest_step() == step


def test_cli_bad_input_exits_with_message(tmp_path):
  d = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'sira_jax.train'] + [f'--gin_file={f}' for f in FINETUNE] + [
      f'--gin.MODEL_DIR={d}', '--gin.MIXTURE_OR_TASK_NAME=offline_num2word_de',
      '--gin.TRAIN_STEPS=1', '--gin.INITIAL_CHECKPOINT_PATH=None']
  r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 2
  assert 'offline_num2words_de' in r.stderr
  assert not d.exists()


def _tiny_hf_checkpoint(path, **arch):
  """A random HF T5 directory of the tiny gin model's sizes with the given architecture fields."""
  from sira_jax.t5 import saving
  gin_utils.parse_gin(['models/t5_tiny.gin'], [], ['.', gin_utils.PROJECT_GIN_DIR])
  cfg = T5Config().replace(**arch)
  gin.clear_config()
  params = model_init.init_variables(model_init.build_model(cfg), cfg, 1)['params']
  saving.save_hf_safetensors(str(path), params, cfg)
  return cfg


def test_finetuning_takes_the_checkpoint_architecture(tmp_path):
  # Issue 11: a tied HF T5 saved with scale_decoder_outputs=false and its own epsilon.
  hf = tmp_path / 'hf'
  _tiny_hf_checkpoint(hf, tie_word_embeddings=True, scale_logits=False, layer_norm_epsilon=1e-5)
  d = tmp_path / 'run'
  # gin sets what it disagrees on: refused, naming the field and both values; nothing written.
  with pytest.raises(ValueError, match=r'tie_word_embeddings: configured False vs checkpoint True'):
    _run(d, base=str(hf))
  assert not d.exists()
  gin.clear_config()
  with pytest.raises(ValueError, match=r'scale_logits: configured True vs checkpoint False'):
    _run(d, base=str(hf), bindings=['T5Config.tie_word_embeddings = True',
                                    'T5Config.scale_logits = True'])
  assert not d.exists()
  # What gin leaves unset (logit scaling, epsilon) comes from the checkpoint.
  gin.clear_config()
  r = _run(d, base=str(hf), bindings=['T5Config.tie_word_embeddings = True'])
  assert r.step == 1
  with open(d / 'run_config.json') as f:
    cfg = model_init.config_from_dict(json.load(f)['model_config'])
  assert cfg.logits_scaled is False and cfg.layer_norm_epsilon == 1e-5


def test_checkpoint_shape_errors_come_before_compile_and_data(tmp_path, monkeypatch):
  hf = tmp_path / 'hf'
  _tiny_hf_checkpoint(hf)
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(hf / 'model.safetensors'))
  del tensors['decoder.block.1.layer.2.DenseReluDense.wo.weight']
  save_file(tensors, str(hf / 'model.safetensors'))

  def must_not_run(*a, **k):
    raise AssertionError('compiled or built data before checking the checkpoint')

  monkeypatch.setattr(model_init, 'init_variables', must_not_run)
  monkeypatch.setattr(data_lib, 'train_batches', must_not_run)
  d = tmp_path / 'run'
  with pytest.raises(ckpt_lib.CheckpointError, match=r'DenseReluDense\.wo\.weight.*missing'):
    _run(d, base=str(hf))
  assert not d.exists()


def test_unused_command_line_macro_is_refused(tmp_path):
  d = tmp_path / 'run'
  with pytest.raises(gin_utils.GinConfigError, match=r'NUM_EXPERT\b.*did you mean NUM_EXPERTS'):
    _run(d, bindings=['NUM_EXPERT = 8'])
  assert not d.exists()


def test_model_dir_that_is_a_file(tmp_path):
  f = tmp_path / 'afile'
  f.write_text('keep me')
  with pytest.raises(ConfigError, match=r'MODEL_DIR .*afile is a file'):
    _run(f)
  gin.clear_config()
  with pytest.raises(ConfigError, match=r'afile is a file'):
    _run(f / 'sub')
  assert f.read_text() == 'keep me'


def test_dict_diff_names_every_changed_leaf():
  from sira_jax.run_dir import dict_diff
  old = {'a': 1, 'm': {'k': 'sira', 'r': 4}, 'gone': 0}
  new = {'a': 1, 'm': {'k': 'lora', 'r': 4}, 'added': [1]}
  assert dict_diff(old, new) == "added: None -> [1]; gone: 0 -> None; m.k: 'sira' -> 'lora'"
  assert dict_diff(old, old) == ''
