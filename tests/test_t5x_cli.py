"""Real T5X command lines on the project's gin files (skipped where t5x is not installed, as in CI):
`python -m t5x.train` pretrains the tiny base on the bundled span-corruption task, fine-tunes SiRA
(and SMoE-Dropout) from that checkpoint, then `python -m t5x.eval` and `python -m t5x.infer` run on
the SiRA checkpoint. Minutes on a 2-core CPU."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip('t5x')

import orbax.checkpoint as ocp
from flax import traverse_util
import tensorflow as tf

from sira_jax import gin_utils
from sira_jax.adapters import is_adapter_param

REPO = os.path.dirname(gin_utils.PROJECT_GIN_DIR)
SMALL = ['--gin.BATCH_SIZE=8', "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}"]


def _run(module, args, log):
  cmd = [sys.executable, '-m', module, f'--gin_search_paths={gin_utils.PROJECT_GIN_DIR}'] + args
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
             XLA_FLAGS='', JAX_PLATFORMS='cpu')
  with open(log, 'w') as f:
    rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                        check=False).returncode
  if rc:
    with open(log) as f:
      pytest.fail(f'{module} exited {rc}:\n' + ''.join(f.readlines()[-40:]))


def _state(ckpt):
  return traverse_util.flatten_dict(ocp.PyTreeCheckpointer().restore(os.path.join(ckpt, 'state')),
                                    sep='/')


def _summaries(model_dir):
  out = {}
  for path in glob.glob(os.path.join(model_dir, 'train', 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        value = tf.make_ndarray(v.tensor)
        if value.dtype.kind == 'f':  # scalars; T5X also writes the gin config as text
          out.setdefault(v.tag, {})[event.step] = float(value)
  return out


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('t5x')
  base, sira, smoe = root / 'base', root / 'sira', root / 'smoe'
  _run('t5x.train', ['--gin_file=t5x/models/t5_tiny.gin', '--gin_file=t5x/runs/pretrain.gin',
                     f"--gin.MODEL_DIR='{base}'", "--gin.MIXTURE_OR_TASK_NAME='offline_span_corruption'",
                     '--gin.TRAIN_STEPS=20', '--gin.CHECKPOINT_PERIOD=20', '--gin.EVAL_PERIOD=20',
                     '--gin.EVAL_STEPS=1'] + SMALL, root / 'pretrain.log')
  for out, adapter, extra in [(sira, 'sira', []),
                              (smoe, 'smoe_dropout', ['--gin.SMOE_SCHEDULE_STEPS=8'])]:
    _run('t5x.train', ['--gin_file=t5x/models/t5_tiny.gin', f'--gin_file=t5x/adapters/{adapter}.gin',
                       '--gin_file=t5x/runs/finetune.gin', f"--gin.MODEL_DIR='{out}'",
                       "--gin.MIXTURE_OR_TASK_NAME='offline_suite_mix'",
                       f"--gin.INITIAL_CHECKPOINT_PATH='{base}/checkpoint_20'",
                       f'--gin.TRAIN_STEPS={40 if adapter == "sira" else 24}',
                       '--gin.CHECKPOINT_PERIOD=20', '--gin.EVAL_PERIOD=1000',
                       '--gin.train.train_eval_dataset_cfg=None'] + extra + SMALL,
         root / f'{adapter}.log')
  return root


def test_finetune_keeps_base_bit_identical_without_optimizer_state(runs):
  base, tuned = _state(runs / 'base' / 'checkpoint_20'), _state(runs / 'sira' / 'checkpoint_40')
  base_params = {k: v for k, v in base.items() if k.startswith('target/')}
  assert base_params
  for k, v in base_params.items():
    np.testing.assert_array_equal(np.asarray(tuned[k]), np.asarray(v), err_msg=k)
  adapters = [k for k in tuned if k.startswith('target/') and k not in base_params]
  assert adapters and all(is_adapter_param(k, trainable=True) for k in adapters)
  states = {k: v for k, v in tuned.items() if k.startswith('state/param_states/')}
  assert all(v is None for k, v in states.items()
                if not is_adapter_param(k, trainable=True))
  assert any(v is not None for k, v in states.items() if is_adapter_param(k, trainable=True))
  assert int(tuned['state/step']) == 40


def test_adapters_move_at_the_adapter_learning_rate(runs):
  """finetune.gin's Adafactor does not scale updates by the parameter's RMS. LoRA's B starts at
  zero, where T5X's default (max(RMS, 1e-3)) would give it a thousandth of the learning rate: at
  most 20 steps x 1e-3 x 1e-3 = 2e-5 after these 20 fine-tuning steps at 1e-3."""
  tuned = _state(runs / 'sira' / 'checkpoint_40')
  b = [np.asarray(v).ravel() for k, v in tuned.items()
       if k.startswith('target/') and k.rsplit('/', 1)[-1] == 'lora_b']
  assert b
  assert np.sqrt(np.mean(np.concatenate(b) ** 2)) > 1e-3


def test_train_summaries_carry_routing_metrics_in_the_loss(runs):
  s = _summaries(runs / 'sira')
  step = max(s['loss'])
  for name in ('cross_entropy', 'aux_loss', 'router_z_loss', 'dropped_fraction', 'gate_entropy',
               'router_confidence', 'expert_usage_min', 'expert_usage_max'):
    assert name in s and np.isfinite(s[name][step]), name
  m = {k: v[step] for k, v in s.items() if step in v}
  np.testing.assert_allclose(m['loss'], m['cross_entropy'] + m['z_loss'] + 0.01 * m['aux_loss'] +
                             0.001 * m['router_z_loss'], rtol=1e-5)
  assert m['aux_loss'] > 0


def test_smoe_dropout_schedule_advances_with_the_steps(runs):
  state = _state(runs / 'smoe' / 'checkpoint_24')
  progress = [float(v) for k, v in state.items() if k.startswith('flax_mutables/schedule/')]
  assert progress and all(p == pytest.approx(0.5) for p in progress)  # 4 of 8 schedule steps
  assert 'aux_loss' in _summaries(runs / 'smoe')


def test_eval_and_infer_on_the_finetuned_checkpoint(runs):
  ckpt = runs / 'sira' / 'checkpoint_40'
  common = ['--gin_file=t5x/models/t5_tiny.gin', '--gin_file=t5x/adapters/sira.gin',
            f"--gin.CHECKPOINT_PATH='{ckpt}'", '--gin.BATCH_SIZE=8']
  _run('t5x.eval', common + ['--gin_file=t5x/runs/eval.gin', f"--gin.EVAL_OUTPUT_DIR='{runs}/ev'",
                             "--gin.MIXTURE_OR_TASK_NAME='offline_num2words_en'",
                             '--gin.EVALUATOR_NUM_EXAMPLES=8'], runs / 'eval.log')
  with open(runs / 'ev' / 'inference_eval' / 'offline_num2words_en-metrics.jsonl') as f:
    metrics = json.loads(f.readlines()[-1])
  assert metrics['step'] == 40 and metrics
  _run('t5x.infer', common + ['--gin_file=t5x/runs/infer.gin', f"--gin.INFER_OUTPUT_DIR='{runs}/inf'",
                              "--gin.MIXTURE_OR_TASK_NAME='offline_num2words_en'",
                              "--gin.SPLIT='test'"], runs / 'infer.log')
  (out,) = glob.glob(str(runs / 'inf' / 'offline_num2words_en-predict.jsonl-*-of-*[0-9]'))
  with open(out) as f:
    rows = [json.loads(line) for line in f]
  assert rows and all('prediction' in r and 'inputs' in r for r in rows)
