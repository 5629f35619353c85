"""Nothing lost, nothing silent (issue 30): bad numbers, non-finite checkpoints, settings eval and
infer would ignore, data errors, Ctrl-C, and output paths, on real runs of the CLIs at tiny sizes.

Every refusal is checked for its message, its exit code (2 for a user error) and for leaving
MODEL_DIR and the results directories exactly as they were (names, sizes, mtimes).
One tiny trained run is shared by the module (`trained`); each test that writes copies it.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sira_jax import checkpoints as ckpt_lib
from sira_jax import eval as eval_lib
from sira_jax import gin_utils
from sira_jax import infer as infer_lib
from sira_jax import restore
from sira_jax import train as train_lib
from sira_jax.run_dir import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = ['models/t5_tiny.gin', 'adapters/sira.gin', 'runs/finetune.gin']
TASK = 'offline_currency_en'
LENGTHS = "{'inputs': 32, 'targets': 32}"


def _train_flags(model_dir, steps, **extra):
  """The train CLI's flags for a tiny fine-tuning run (random base, one device)."""
  flags = [f'--gin_file={f}' for f in FINETUNE] + [
      f'--gin.MODEL_DIR={model_dir}', f'--gin.MIXTURE_OR_TASK_NAME={TASK}',
      f'--gin.TRAIN_STEPS={steps}', '--gin.BATCH_SIZE=4', f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}',
      '--gin.INITIAL_CHECKPOINT_PATH=None', "--gin.train.mesh_shape={'data': 1}",
      '--gin.train.progress_bar=False', '--gin.train.tensorboard=False', '--gin.train.log_every=1']
  return flags + [f'--gin.{k}={v}' for k, v in extra.items()]


def _bindings(flags):
  """The same settings as in-process gin bindings (what train_from_gin takes)."""
  rewritten = gin_utils.rewrite_gin_args(flags)
  return [a[len('--gin_bindings='):] for a in rewritten if a.startswith('--gin_bindings=')]


def _train_in_process(model_dir, steps, **extra):
  gin.clear_config()
  try:
    return train_lib.train_from_gin(FINETUNE, _bindings(_train_flags(model_dir, steps, **extra)))
  finally:
    gin.clear_config()


def _cli(module, flags, timeout=300, **popen):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='')
  return subprocess.run([sys.executable, '-m', module] + list(flags), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout, **popen)


def _eval_flags(model_dir, *extra):
  return ['--gin_file=runs/eval.gin', f'--gin.MODEL_DIR={model_dir}',
          f'--gin.MIXTURE_OR_TASK_NAME={TASK}', f'--gin.TASK_FEATURE_LENGTHS={LENGTHS}',
          '--gin.evaluate.num_examples=2', '--gin.BATCH_SIZE=2',
          '--gin.evaluate.progress_bar=False', '--gin.evaluate.tensorboard=False'] + list(extra)


def _snapshot(d):
  """{path: (size, mtime)} of every file and directory under `d` (empty if `d` is absent)."""
  out = {}
  for root, dirs, files in os.walk(d):
    for name in dirs + files:
      p = os.path.join(root, name)
      st = os.stat(p)
      out[p] = (st.st_size if name in files else None, st.st_mtime_ns)
  return out


def _assert_one_line_error(r, code, pattern):
  assert r.returncode == code, r.stderr[-3000:]
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  errors = [ln for ln in r.stderr.splitlines() if ln.startswith('error:')]
  assert len(errors) == 1, r.stderr[-3000:]
  import re
  assert re.search(pattern, errors[0]), errors[0]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny fine-tuned run of 2 steps (checkpoints at 1 and 2), trained once for the module."""
  d = tmp_path_factory.mktemp('trained') / 'run'
  r = _train_in_process(d, 2, **{'train.checkpoint_every': 1})
  assert r.step == 2
  return d


def _copy(trained, tmp_path):
  d = tmp_path / 'run'
  shutil.copytree(trained, d)
  return d


# ----------------------------------------------------------------------------------------------
# 1. Non-finite guards
# ----------------------------------------------------------------------------------------------
def test_cli_refuses_a_nan_learning_rate_before_anything(trained):
  before = _snapshot(trained)
  r = _cli('sira_jax.train', _train_flags(trained, 2, LEARNING_RATE='nan'))
  _assert_one_line_error(
      r, 2, r"^error: LEARNING_RATE \(train.learning_rate\) must be a finite number > 0 "
            r"\(got 'nan'\)$")
  assert _snapshot(trained) == before


@pytest.mark.parametrize('setting,value,match', [
    ('LEARNING_RATE', '-1e-3', r'LEARNING_RATE .*> 0 \(got -0.001\)'),
    ('LEARNING_RATE', '0', r'LEARNING_RATE .*> 0 \(got 0\)'),
    ('TRAIN_STEPS', '0', r'TRAIN_STEPS .*an integer >= 1 \(got 0\)'),
    ('TRAIN_STEPS', '2.5', r'TRAIN_STEPS .*an integer >= 1 \(got 2.5\)'),
    ('BATCH_SIZE', '-4', r'BATCH_SIZE .*>= 1 \(got -4\)'),
    ('train.warmup_steps', '-1', r'warmup_steps must be an integer >= 0 \(got -1\)'),
    ('train.checkpoint_every', '0', r'checkpoint_every must be an integer >= 1 \(got 0\)'),
    ('train.clip_grad_norm', '0.0', r'clip_grad_norm must be a finite number > 0 \(got 0.0\)'),
    ('LossConfig.z_loss', "'nan'", r"LossConfig.z_loss must be a finite number >= 0 \(got 'nan'\)"),
])
def test_bad_hyperparameters_are_refused(tmp_path, setting, value, match):
  d = tmp_path / 'run'
  with pytest.raises(ConfigError, match=match):
    _train_in_process(d, 2, **{setting: value})
  assert not d.exists()


@pytest.mark.parametrize('value', [float('inf'), float('nan')])
def test_non_finite_learning_rate_numbers_are_refused(value):
  ok = dict(train_steps=2, batch_size=4, learning_rate=1e-3, warmup_steps=0, weight_decay=0.0,
            clip_grad_norm=None, checkpoint_every=1, keep_checkpoints=1, log_every=1, seed=0,
            data_seed=None, loss_config=train_lib.trainer_lib.LossConfig())
  train_lib.check_hyperparameters(**ok)
  with pytest.raises(ConfigError, match=rf'LEARNING_RATE .*> 0 \(got {value}\)'):
    train_lib.check_hyperparameters(**dict(ok, learning_rate=value))


def _write_nan_checkpoint(d, step):
  """Writes checkpoint `step` of run `d`: the latest checkpoint's state with NaN adapter params
  (what a diverged run saved before checkpoints were checked)."""
  mngr = ckpt_lib.CheckpointManager(str(d / 'checkpoints'), save_every=1, keep=10)
  latest = mngr.latest_step()
  meta = mngr.read_meta(latest)
  path = os.path.join(str(d / 'checkpoints'), str(latest), 'state')
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(path)
  state['params'] = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), state['params'])
  state['step'] = np.int32(step)
  meta = {k: v for k, v in meta.items() if k not in ('step', 'format_version')}
  assert mngr.save(step, state, meta, force=True)
  mngr.close()


@pytest.mark.slow
def test_eval_and_resume_refuse_a_non_finite_checkpoint(trained, tmp_path):
  d = _copy(trained, tmp_path)
  _write_nan_checkpoint(d, 3)
  before = _snapshot(d)
  r = _cli('sira_jax.eval', _eval_flags(d))
  _assert_one_line_error(r, 2, r'checkpoint step 3 in .*checkpoints holds non-finite parameters '
                               r'\(NaN or inf in \d+ of \d+ arrays\): the run diverged')
  assert _snapshot(d) == before
  with pytest.raises(ckpt_lib.CheckpointError, match='step 3 .*non-finite'):
    restore.load_trained(str(d))
  # Training does not resume from it either (nothing written).
  with pytest.raises(ckpt_lib.CheckpointError, match=r'to resume, step 3 .*non-finite values'):
    _train_in_process(d, 4, **{'train.checkpoint_every': 1})
  assert _snapshot(d) == before


# ----------------------------------------------------------------------------------------------
# 2. Eval and infer take the model from the run; no metrics file is overwritten
# ----------------------------------------------------------------------------------------------
def test_eval_refuses_model_settings_that_disagree_with_the_run(trained):
  before = _snapshot(trained)
  r = _cli('sira_jax.eval', _eval_flags(trained, '--gin_file=adapters/sira.gin',
                                        '--gin.NUM_EXPERTS=8'))
  _assert_one_line_error(r, 2, r'disagree with the run in .*\(run -> given\): '
                               r'adapter.num_experts: 4 -> 8\. Eval and infer take the model')
  assert _snapshot(trained) == before


def test_infer_refuses_another_adapter_and_a_file_as_output_dir(trained, tmp_path, monkeypatch):
  before = _snapshot(trained)
  gin.clear_config()
  gin_utils.parse_gin(['adapters/lora.gin'], [])
  try:
    fields = gin_utils.bound_parameters(train_lib.T5Config)
    with pytest.raises(ConfigError, match=r"adapter.kind: 'sira' -> 'lora'"):
      infer_lib.infer(model_dir=str(trained), mixture_or_task_name=TASK, split='validation',
                      task_feature_lengths={'inputs': 32, 'targets': 32}, progress_bar=False,
                      configured_fields=fields)
  finally:
    gin.clear_config()
  # The same adapter file as the run's: agrees, nothing refused (checked without loading).
  gin_utils.parse_gin(['adapters/sira.gin'], [])
  try:
    from sira_jax import predict as predict_lib
    predict_lib.check_model_settings(str(trained),
                                     gin_utils.bound_parameters(train_lib.T5Config))
  finally:
    gin.clear_config()
  # An output path that is a file: refused before any model is loaded.
  out = tmp_path / 'out'
  out.write_text('keep')

  def must_not_load(*a, **k):
    raise AssertionError('loaded the model before checking the output path')

  monkeypatch.setattr(restore, 'load_trained', must_not_load)
  with pytest.raises(ConfigError, match=r'the infer output directory .*out is a file'):
    infer_lib.infer(model_dir=str(trained), mixture_or_task_name=TASK, split='validation',
                    task_feature_lengths={'inputs': 32, 'targets': 32}, output_dir=str(out),
                    progress_bar=False)
  assert out.read_text() == 'keep'
  assert _snapshot(trained) == before


def test_each_evaluation_keeps_its_own_metrics_file(trained, tmp_path):
  d = _copy(trained, tmp_path)
  kw = dict(model_dir=str(d), mixture_or_task_name=TASK, split='validation',
            task_feature_lengths={'inputs': 32, 'targets': 32}, num_examples=2, batch_size=2,
            progress_bar=False, tensorboard=False)
  eval_lib.evaluate(**kw)
  first = d / 'eval' / f'metrics_{TASK}_2_validation.json'
  stat = first.stat()
  eval_lib.evaluate(**kw)
  second = d / 'eval' / f'metrics_{TASK}_2_validation-2.json'
  assert set(os.listdir(d / 'eval')) == {first.name, second.name}
  assert (first.stat().st_mtime_ns, first.stat().st_size) == (stat.st_mtime_ns, stat.st_size)
  assert json.loads(second.read_text())['step'] == 2


# ----------------------------------------------------------------------------------------------
# 3. Data errors before MODEL_DIR is written
# ----------------------------------------------------------------------------------------------
def test_data_error_is_reported_before_model_dir_is_written(tmp_path, trained):
  from tasks import xtreme_up
  from tests.test_xtreme_up import write_release
  root = tmp_path / 'xtreme_up'
  paths = write_release(str(root), families=('translation',), languages=['sw'])
  bad = [p for p in paths if os.sep + 'train' + os.sep in p][0]
  with open(bad, 'a', encoding='utf-8') as f:
    f.write('{"input": "unterminated\n')
  names = xtreme_up.register_xtreme_up(str(root), families=('translation',), languages=['sw'])
  try:
    task = [n for n in names if n.startswith('xtreme_up_translation')][0]
    d = tmp_path / 'run'
    with pytest.raises(ValueError, match=rf'^{bad}:3: '):
      _train_in_process(d, 2, MIXTURE_OR_TASK_NAME=task)
    assert not d.exists()
    # Eval and infer check their data before loading or writing anything too.
    before = _snapshot(trained)
    with pytest.raises(ValueError, match=rf'^{bad}:3: '):
      eval_lib.evaluate(model_dir=str(trained), mixture_or_task_name=task,
                        task_feature_lengths={'inputs': 32, 'targets': 32}, progress_bar=False)
    assert _snapshot(trained) == before
  finally:
    xtreme_up.unregister()


# ----------------------------------------------------------------------------------------------
# 5. Ctrl-C: finish the step, save, one line, exit 130; the history survives; resume is exact
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_saves_the_step_and_resume_continues_exactly(tmp_path):
  d = tmp_path / 'run'
  flags = _train_flags(d, 100000, **{'train.checkpoint_every': 100000})
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS='')
  proc = subprocess.Popen([sys.executable, '-m', 'sira_jax.train'] + flags, cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  summary = d / 'train_summary.json'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:  # the summary follows each log window
    try:
      if json.loads(summary.read_text())['step'] >= 3:
        break
    except (OSError, ValueError, KeyError):
      pass
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  proc.send_signal(signal.SIGINT)
  time.sleep(0.05)
  proc.send_signal(signal.SIGINT)  # a second Ctrl-C while it saves changes nothing
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  lines = [ln for ln in err.splitlines() if ln.startswith('interrupted')]
  assert len(lines) == 1, err[-3000:]
  step = int(lines[0].split('saved step ')[1].split()[0])
  assert step >= 3 and f'{d}/checkpoints' in lines[0]
  mngr = ckpt_lib.CheckpointManager(str(d / 'checkpoints'), create=False)
  assert mngr.all_steps() == [step]  # saved at the interrupted step, not a checkpoint step
  mngr.close()
  hist = json.loads(summary.read_text())['history']
  assert [h['step'] for h in hist] == list(range(1, step + 1))
  # The resumed run continues exactly: its history equals an uninterrupted run's, step by step.
  resumed = _train_in_process(d, step + 2, **{'train.checkpoint_every': 100000})
  reference = _train_in_process(tmp_path / 'ref', step + 2, **{'train.checkpoint_every': 100000})
  assert resumed.step == reference.step == step + 2
  hist = json.loads(summary.read_text())['history']
  ref = json.loads((tmp_path / 'ref' / 'train_summary.json').read_text())['history']
  assert [h['step'] for h in hist] == [h['step'] for h in ref] == list(range(1, step + 3))
  np.testing.assert_allclose([h['loss'] for h in hist], [h['loss'] for h in ref], rtol=1e-6)
