"""Every command the README shows runs as written, so a README edit that breaks one fails CI.

The commands are read from README.md itself: every line of a ```bash block (continuation lines
joined, comments dropped), split on `&&`. Environment setup (venv, activate, pip) and the test
command that runs this file are skipped; every other part must be `python -m <module> ...`. Each
runs in order in a subprocess from the repository root (as the README says), with `/tmp/` paths
moved into a scratch directory and the module's TINY arguments appended (later gin bindings win, so
sizes shrink and nothing else changes). A README command for a module without a TINY entry fails
this test: add its tiny sizes. Commands of a package that is not installed (T5X: not on PyPI) are
skipped, and said so; tests/test_t5x_cli.py runs T5X's where it is.
"""
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LENGTHS = "--gin.TASK_FEATURE_LENGTHS={'inputs': 16, 'targets': 16}"
# Tiny sizes for every run and the base of a sweep (the main job, experiments.runner/report).
_TINY_MODEL = ('TRAIN_STEPS=2', 'BATCH_SIZE=8', 'EMBED_DIM=16', 'MLP_DIM=32', 'NUM_HEADS=2',
               'HEAD_DIM=8', 'NUM_ENCODER_LAYERS=1', 'NUM_DECODER_LAYERS=1',
               "MIXTURE_OR_TASK_NAME='offline_currency_en'")  # one task, not 30
TINY = {
    'sira_jax.train': ['--gin.TRAIN_STEPS=2', '--gin.BATCH_SIZE=2', _LENGTHS,
                       '--gin.train.progress_bar=False', '--gin.train.tensorboard=False'],
    'sira_jax.eval': ['--gin.BATCH_SIZE=2', _LENGTHS, '--gin.evaluate.num_examples=2'],
    'sira_jax.infer': ['--gin.BATCH_SIZE=2', _LENGTHS, '--gin.infer.num_examples=2'],
    'experiments.main': ['--gin.SEEDS=(0,)', '--gin.EVAL_EXAMPLES=2',
                         '--gin.run_main.progress_bar=False',
                         f'--gin.main_sweep.extra_bindings={_TINY_MODEL}',
                         '--gin.WORK_DIR=/tmp/runs/main'],
    # One run (the floor: no training) of the sweep, on a tiny 2-step base, 2 examples per task;
    # in the checkout as it is (these tiny results are thrown away, so a modified tree is fine).
    'experiments.runner': ['--limit=1', '--eval_examples=2', '--allow_dirty',
                           '--results_dir=/tmp/exp/results',
                           '--work_dir=/tmp/exp/work'] + [f'--binding={b}' for b in _TINY_MODEL],
    'experiments.report': ['--eval_examples=2', '--results_dir=/tmp/exp/results',
                           '--out_dir=/tmp/exp/report'] + [f'--binding={b}' for b in _TINY_MODEL],
    # The rule over the (here unrun) regime sweeps: says what to run first.
    'experiments.regime_selection': ['--results_dir=/tmp/exp/results'],
    # The README's T5X commands are tiny already (20 steps, batch 8).
    't5x.train': [], 't5x.eval': [], 't5x.infer': [],
}
_SETUP = re.compile(r'^(python3? -m venv\b|\. |source |pip3? install\b|python -m pytest\b)')


def readme_commands(path: str = os.path.join(ROOT, 'README.md')) -> list[str]:
  """The README's shell commands, in order (see the module docstring)."""
  with open(path) as f:
    text = f.read()
  commands = []
  for block in re.findall(r'```bash\n(.*?)```', text, re.S):
    joined = re.sub(r'\\\n\s*', ' ', block)
    for line in joined.splitlines():
      line = line.split(' # ')[0].strip() if not line.lstrip().startswith('#') else ''
      for part in (p.strip() for p in line.split('&&')):
        if part and not _SETUP.match(part):
          commands.append(part)
  return commands


def test_readme_commands_are_found():
  commands = readme_commands()
  modules = [shlex.split(c)[2] for c in commands]
  assert {'experiments.main', 'sira_jax.train', 'sira_jax.eval', 'sira_jax.infer'} <= set(modules)
  for c in commands:
    argv = shlex.split(c)
    assert argv[:2] == ['python', '-m'], f'README command is not `python -m ...`: {c}'
    assert argv[2] in TINY, f'add tiny sizes for README command {argv[2]} to TINY: {c}'


def command_group(module: str) -> str:
  """The README commands that share state (a MODEL_DIR, a results dir) are one group, run in
  order; the groups share nothing, so they run as separate tests (in parallel under xdist)."""
  top = module.split('.')[0]
  return 'main' if module == 'experiments.main' else top


COMMAND_GROUPS = ('main', 'sira_jax', 'experiments', 't5x')


def test_every_readme_command_is_in_a_group():
  assert {command_group(shlex.split(c)[2]) for c in readme_commands()} == set(COMMAND_GROUPS)


@pytest.mark.slow
@pytest.mark.parametrize('group', COMMAND_GROUPS)
def test_readme_commands_run(tmp_path, group):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''),
             XLA_FLAGS='')
  skipped = []
  for c in readme_commands():
    module = shlex.split(c)[2]
    if command_group(module) != group:
      continue
    if importlib.util.find_spec(module.split('.')[0]) is None:
      skipped.append(module)
      continue
    argv = [a.replace('/tmp/', f'{tmp_path}/') for a in shlex.split(c) + TINY[module]]
    cmd = [sys.executable] + argv[1:]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f'README command failed: {c}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}'
    noise = [n for n in _NOISE if n in r.stderr
             and module.startswith(('sira_jax.', 'experiments.main'))]
    assert not noise, f'start-up noise {noise} from {c}:\n{r.stderr[-3000:]}'
  if skipped:
    print(f'not installed, skipped: {sorted(set(skipped))}')


# The project's CLIs print none of these: TensorFlow's C++ start-up lines, CUDA probing on a CPU
# machine, tracebacks.
_NOISE = ('oneDNN custom operations', 'Could not find cuda drivers', 'failed call to cuInit',
          'Traceback (most recent call last)')


@pytest.mark.parametrize('module,names', [
    ('sira_jax.train', ('adapters/sira.gin', 'adapters/lora.gin', 'adapters/molora.gin',
                        'adapters/adamix.gin', 'adapters/smoe_dropout.gin', 'NUM_EXPERTS=4',
                        'TOP_K=2', 'ADAPTER_RANK=4', 'CAPACITY_FACTOR', 'TRAIN_STEPS',
                        'INITIAL_CHECKPOINT_PATH', 'models/t5_tiny.gin')),
    ('sira_jax.eval', ('MODEL_DIR', 'MIXTURE_OR_TASK_NAME', 'SPLIT')),
    ('sira_jax.infer', ('MODEL_DIR', 'MIXTURE_OR_TASK_NAME', 'SPLIT')),
])
def test_help_names_choices_and_macros_without_heavy_imports(module, names):
  probe = ('import atexit, runpy, sys\n'
           'atexit.register(lambda: print("HEAVY", sorted(m for m in ("jax", "tensorflow", "seqio") '
           'if m in sys.modules)))\n'
           f'sys.argv = ["{module}", "--help"]\n'
           f'runpy.run_module("{module}", run_name="__main__", alter_sys=True)\n')
  r = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, capture_output=True, text=True,
                     timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
  assert r.returncode == 0, r.stderr
  assert 'HEAVY []' in r.stdout  # help imports neither jax nor TensorFlow: it is instant
  for n in names:
    assert n in r.stdout, n
