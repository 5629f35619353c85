"""The runner's and the report's command lines: user errors, binding order, result files.

User errors are checked as a user meets them: `python -m experiments.runner ...` in a subprocess,
one line on stderr naming the flag as typed, exit status 2, no traceback.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from experiments import runner
from experiments import sweeps as sweeps_lib
from tests.test_experiments import _tiny_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(module, *args, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run(
      [sys.executable, '-m', module, f'--results_dir={tmp_path / "results"}', *args]
      + ([f'--work_dir={tmp_path / "work"}'] if module == 'experiments.runner' else []),
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _error_line(proc) -> str:
  """The one `error: ...` line of a refused command (and nothing else on stderr but start-up
  noise of the libraries)."""
  assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
  assert 'Traceback' not in proc.stderr, proc.stderr
  errors = [ln for ln in proc.stderr.splitlines() if ln.startswith('error: ')]
  assert len(errors) == 1, proc.stderr
  return errors[0]


@pytest.mark.parametrize('module,args,expected', [
    ('experiments.runner', ['--sweep=nope'], '--sweep=nope: no such sweep; known: c1, c2'),
    ('experiments.runner', ['--sweep=c1', '--run=nope'],
     "--run=nope: sweep 'c1' has no run named 'nope'"),
    ('experiments.runner', ['--limit=x'], 'flag --limit=x: invalid literal'),
    ('experiments.runner', ['--bogus'], "Unknown command line flag 'bogus'"),
    ('experiments.runner', [], '--sweep is required'),
    ('experiments.runner', ['--sweep=c1', '--print_commands=both'], 'flag --print_commands=both'),
    ('experiments.runner', ['--sweep=c1', "--binding=MODEL_DIR='/x'"],
     "--binding=MODEL_DIR='/x': the runner sets MODEL_DIR for every run"),
    ('experiments.runner', ['--sweep=c1', '--print_commands', '--binding=TRAIN_STEP=2'],
     "--binding=TRAIN_STEP=2: no binding in the gin files uses the macro 'TRAIN_STEP', so setting "
     'it changes nothing; did you mean TRAIN_STEPS?'),
    ('experiments.runner', ['--sweep=c1', '--print_commands', '--binding=train.bogus=1'],
     "--binding=train.bogus=1: gin refuses it: Configurable 'train' doesn't have a parameter"),
    ('experiments.report', ['--sweep=nope'], '--sweep=nope: no such sweep'),
    ('experiments.report', ['--eval_examples=0'], 'flag --eval_examples=0'),
])
def test_a_user_error_is_one_line_naming_the_flag(tmp_path, module, args, expected):
  line = _error_line(_cli(module, *args, tmp_path=tmp_path))
  assert line.startswith(f'error: {expected}'), line


def test_an_unreadable_result_file_is_named(tmp_path):
  sweep = sweeps_lib.get_sweep('c1')
  path = runner.result_path(str(tmp_path / 'results'), sweep.runs[0])
  os.makedirs(os.path.dirname(path))
  with open(path, 'w') as f:
    f.write('{"run": {"name": ')  # cut short
  with pytest.raises(runner.UnreadableResultError) as e:
    runner.load_result(str(tmp_path / 'results'), sweep.runs[0])
  assert str(e.value).startswith(f'unreadable result file {path}: JSONDecodeError: ')
  assert '\n' not in str(e.value)
  line = _error_line(_cli('experiments.runner', '--sweep=c1', '--list_runs', tmp_path=tmp_path))
  assert line == f'error: {e.value}'


def test_result_files_are_written_atomically(tmp_path):
  path = str(tmp_path / 'runs' / 'k' / runner.RESULT)
  runner._write_json(path, {'finished': 1})

  class Interrupt:  # serialised by json_default, which calls str(): a kill mid-write
    def __str__(self):
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    runner._write_json(path, {'finished': 2, 'z': Interrupt()})
  with open(path) as f:
    assert json.load(f) == {'finished': 1}  # the previous file, whole
  assert os.listdir(os.path.dirname(path)) == [runner.RESULT]  # no temporary file left
  with pytest.raises(KeyboardInterrupt):
    runner._write_json(str(tmp_path / 'new' / runner.RESULT), {'z': Interrupt()})
  assert os.listdir(tmp_path / 'new') == []  # an interrupted first write leaves nothing


def test_a_user_binding_wins_over_the_runners_initial_checkpoint(tmp_path):
  binding = "INITIAL_CHECKPOINT_PATH='/my/ckpt'"
  proc = _cli('experiments.runner', '--sweep=c1', '--print_commands=trainer',
              f'--binding={binding}', '--binding=ADAPTER_RANK=2', tmp_path=tmp_path)
  assert proc.returncode == 0, proc.stderr
  commands = [c for c in proc.stdout.splitlines() if c.startswith('python -m sira_jax.train')]
  assert commands and '# frozen base' not in proc.stdout  # no base is pretrained for them
  for c in commands:
    assert c.count('--gin.INITIAL_CHECKPOINT_PATH=') == 1 and f'--gin.{binding}' in c
  proc = _cli('experiments.runner', '--sweep=c1', '--print_commands', f'--binding={binding}',
              tmp_path=tmp_path)
  launch = proc.stdout.splitlines()
  assert launch and all('--binding=INITIAL_CHECKPOINT_PATH=' in c for c in launch)

  # The run's gin config: the user's checkpoint after the runner's default, and it wins.
  sweep = sweeps_lib.with_overrides(sweeps_lib.get_sweep('c1'), [binding])
  run = sweep.runs[0]
  bindings = runner.run_bindings(run, '/tmp/m', '/runner/base')
  assert bindings.index("INITIAL_CHECKPOINT_PATH='/runner/base'") < bindings.index(binding)
  runner.parse_gin(run.gin_files, bindings, sweep.extra_bindings)
  assert runner._train_arg('initial_checkpoint_path') == '/my/ckpt'
  with pytest.raises(ValueError, match="binds 'SEED=3', but the runner sets SEED"):
    runner.run_bindings(sweeps_lib.with_overrides(sweep, ['SEED=3']).runs[0], '/m', '/b')


@pytest.mark.slow
def test_a_run_starts_from_the_checkpoint_a_binding_names(tmp_path):
  # A real run (the floor: the base evaluated as is) of a sweep whose --binding names a base
  # checkpoint: the runner pretrains none, and the run's config and result name that checkpoint.
  sweep = _tiny_sweep()
  base_dir, _ = runner.ensure_base(sweep, str(tmp_path / 'w1'), use_shipped=False,
                                   log=lambda m: None)
  mine = str(tmp_path / 'my_base')
  shutil.copytree(base_dir, mine)
  floor = sweeps_lib.with_overrides(
      sweeps_lib.Sweep('mine', 'floor on my base', sweep.runs[:1], base_gin=sweep.base_gin,
                       base_bindings=sweep.base_bindings, eval_num_examples=2,
                       eval_batch_size=8, eval_splits=('validation', 'test')),
      [f"INITIAL_CHECKPOINT_PATH='{mine}'"])
  out = runner.run_sweep(floor, results_dir=str(tmp_path / 'results'),
                         work_dir=str(tmp_path / 'w2'), progress_bar=False, log=lambda m: None)
  assert out.done == [floor.runs[0].name]
  assert not any(n.startswith('base_') for n in os.listdir(tmp_path / 'w2'))
  res = runner.load_result(str(tmp_path / 'results'), floor.runs[0])
  assert res['base'] == {'dir': mine}
  # (gin's config_str breaks a long line after ' = ')
  assert re.search(rf"^INITIAL_CHECKPOINT_PATH = [\\\s]*'{re.escape(mine)}'$", res['gin_config'],
                   re.M), res['gin_config']


def test_limit_leaves_the_other_unfinished_runs_for_later(tmp_path):
  # --limit=0: nothing runs (no base either); no run counts as finished before, all are left.
  sweep = _tiny_sweep()
  out = runner.run_sweep(sweep, results_dir=str(tmp_path / 'results'),
                         work_dir=str(tmp_path / 'work'), progress_bar=False, limit=0,
                         log=lambda m: None)
  assert out.done == out.skipped == [] and out.later == [r.name for r in sweep.runs]
  assert not os.path.exists(tmp_path / 'work')


def _git_repo(path) -> str:
  """A git checkout at `path` with one committed file, `tracked.txt`."""
  path.mkdir()
  git = lambda *a: subprocess.run(['git', '-C', str(path), *a], check=True,  # noqa: E731
                                  capture_output=True)
  git('init', '-q')
  (path / 'tracked.txt').write_text('a\n')
  git('add', 'tracked.txt')
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'one')
  return str(path)


def test_a_modified_tracked_file_is_refused_and_named(tmp_path):
  repo = _git_repo(tmp_path / 'repo')
  (tmp_path / 'repo' / 'untracked.txt').write_text('new\n')  # untracked files do not count
  runner.check_clean_tree(repo)
  assert not runner.git_revision(repo).endswith('+dirty')
  (tmp_path / 'repo' / 'tracked.txt').write_text('b\n')
  with pytest.raises(runner.UsageError) as e:
    runner.check_clean_tree(repo)
  assert str(e.value) == (
      f'the git tree {repo} has modified tracked files (tracked.txt), so a result would name no '
      'commit: commit or stash them, or pass --allow_dirty (results then record the commit with '
      '+dirty)')
  assert runner.git_revision(repo).endswith('+dirty')
  with pytest.raises(runner.UsageError, match='cannot read the git state of .*--allow_dirty'):
    runner.check_clean_tree(str(tmp_path))   # not a git checkout
  # The command line, with the runner's repository pointed at the modified checkout: refused in
  # one line before anything runs.
  proc = _cli_in(repo, '--sweep=c1', '--limit=1', tmp_path=tmp_path)
  assert _error_line(proc) == f'error: {e.value}'
  assert not os.path.exists(tmp_path / 'work')


def _cli_in(repo, *args, tmp_path):
  """The runner's command line with its repository (REPO: whose git state it checks and records)
  the checkout `repo`."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  return subprocess.run(
      [sys.executable, '-c', 'import sys; from experiments import runner; '
       'runner.REPO = sys.argv.pop(1); runner.cli()', repo, *args,
       f'--results_dir={tmp_path / "results"}', f'--work_dir={tmp_path / "work"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_allow_dirty_runs_and_records_the_commit_as_dirty(tmp_path):
  repo = _git_repo(tmp_path / 'repo')
  (tmp_path / 'repo' / 'tracked.txt').write_text('b\n')
  tiny = ['TRAIN_STEPS=1', 'BATCH_SIZE=8', 'EMBED_DIM=16', 'MLP_DIM=32', 'NUM_HEADS=2',
          'HEAD_DIM=8', 'NUM_ENCODER_LAYERS=1', 'NUM_DECODER_LAYERS=1',
          "MIXTURE_OR_TASK_NAME='offline_currency_en'"]
  proc = _cli_in(repo, '--sweep=c1', '--limit=1', '--eval_examples=1', '--allow_dirty',
                 *(f'--binding={b}' for b in tiny), tmp_path=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  sweep = sweeps_lib.with_overrides(sweeps_lib.get_sweep('c1'), tiny, eval_num_examples=1)
  res = runner.load_result(str(tmp_path / 'results'), sweep.runs[0])
  assert res['git_revision'] == runner.git_revision(repo) and res['git_revision'].endswith('+dirty')
