"""The T5X backend's command printer (experiments/t5x_backend.py) and the pod sweeps it prints
(experiments/benchmarks.py): exact commands, quoting, per-run directories, launch wrappers, the
same runs and rules as the CPU sweeps. Needs no t5x (nothing is run)."""
import os
import shlex
import subprocess
import sys

import pytest

from experiments import benchmarks
from experiments import sweeps as sweeps_lib
from experiments import t5x_backend

REPO = benchmarks.REPO


def _spec(**kw):
  args = dict(benchmark='xtreme_up_semantic_parsing', model_size='mt5_base',
              base_checkpoint='/ckpt/mt5 base/checkpoint_1000000',
              vocabulary='/ckpt/spiece.model', data_dir='/data/xtreme-up', output_root='/out',
              finetune_steps=2000, single_task='xtreme_up_semantic_parsing_sw')
  return benchmarks.PodSpec(**dict(args, **kw))


def _run(sweep, name):
  (run,) = [r for r in sweep.runs if r.name == name]
  return run


def test_train_and_eval_commands_are_exact():
  spec = _spec()
  sweep = benchmarks.pod_sweep('c2', spec)
  run = _run(sweep, 'lora r4-lr0.001-s0')
  model_dir = f'/out/xtreme_up_semantic_parsing/mt5_base/runs/{run.key}'
  assert spec.model_dir(run) == model_dir
  common = ['--gin_search_paths=gin', '--gin_file=t5x/models/mt5_base.gin',
            '--gin_file=t5x/adapters/lora.gin']
  data = ["--gin.VOCABULARY_PATH='/ckpt/spiece.model'",
          "--gin.XTREME_UP_DATA_DIR='/data/xtreme-up'"]
  assert t5x_backend.train_argv(run, spec) == [
      'python', '-m', 't5x.train', *common, '--gin_file=t5x/runs/finetune.gin',
      '--gin_file=t5x/tasks/xtreme_up.gin', *data,
      "--gin.INITIAL_CHECKPOINT_PATH='/ckpt/mt5 base/checkpoint_1000000'",
      '--gin.TRAIN_STEPS=1002000', "--gin.TASK_NAME='xtreme_up_semantic_parsing_sw'",
      f"--gin.MODEL_DIR='{model_dir}'", '--gin.RANDOM_SEED=0', '--gin.LEARNING_RATE=0.001']
  assert t5x_backend.eval_argv(run, spec, 'test', None) == [
      'python', '-m', 't5x.eval', *common, '--gin_file=t5x/runs/eval.gin',
      '--gin_file=t5x/tasks/xtreme_up.gin', *data,
      "--gin.TASK_NAME='xtreme_up_semantic_parsing_sw'",
      f"--gin.CHECKPOINT_PATH='{model_dir}/checkpoint_1002000'",
      f"--gin.EVAL_OUTPUT_DIR='{model_dir}/eval_test'", "--gin.SPLIT='test'"]
  lines = t5x_backend.run_commands(run, sweep, spec)
  assert lines[0] == f'# c2 / lora r4-lr0.001-s0 (run {run.key}, MODEL_DIR {model_dir})'
  assert lines[1] == (
      'python -m t5x.train --gin_search_paths=gin --gin_file=t5x/models/mt5_base.gin '
      '--gin_file=t5x/adapters/lora.gin --gin_file=t5x/runs/finetune.gin '
      '--gin_file=t5x/tasks/xtreme_up.gin "--gin.VOCABULARY_PATH=\'/ckpt/spiece.model\'" '
      '"--gin.XTREME_UP_DATA_DIR=\'/data/xtreme-up\'" '
      '"--gin.INITIAL_CHECKPOINT_PATH=\'/ckpt/mt5 base/checkpoint_1000000\'" '
      '--gin.TRAIN_STEPS=1002000 "--gin.TASK_NAME=\'xtreme_up_semantic_parsing_sw\'" '
      f'"--gin.MODEL_DIR=\'{model_dir}\'" --gin.RANDOM_SEED=0 --gin.LEARNING_RATE=0.001')
  assert [shlex.split(line) for line in lines[1:]] == [
      t5x_backend.train_argv(run, spec), t5x_backend.eval_argv(run, spec, 'validation', None),
      t5x_backend.eval_argv(run, spec, 'test', None)]


def test_floor_evaluates_the_base_and_tuned_runs_wait_for_their_rate():
  spec = _spec(eval_examples=50)
  sweep = benchmarks.pod_sweep('c2', spec)
  floor = _run(sweep, 'floor (frozen base)-s0')
  lines = t5x_backend.run_commands(floor, sweep, spec)
  assert len(lines) == 3 and all('t5x.train' not in line for line in lines)
  argv = shlex.split(lines[1])
  assert argv[:3] == ['python', '-m', 't5x.eval']
  assert "--gin.CHECKPOINT_PATH='/ckpt/mt5 base/checkpoint_1000000'" in argv
  assert '--gin.EVALUATOR_NUM_EXAMPLES=50' in argv
  assert not [a for a in argv if 'adapters/' in a or 'INITIAL_CHECKPOINT' in a]
  tuned = _run(sweep, 'lora r4-lrtuned-s1')
  assert t5x_backend.run_commands(tuned, sweep, spec) == [
      "# c2 / lora r4-lrtuned-s1: learning rate chosen by the tuning runs of 'lora r4' once they "
      'are collected; print the commands again then']


def test_quoting_round_trips_through_the_shell():
  for arg in ["--gin.MODEL_DIR='/a b/c'", "--gin.X='it''s'", '--gin.Y="q"', "--gin.Z='$HOME'",
              '--gin.T={"inputs": 8}', 'plain', "--gin.U='a\\b'", "--gin.W='!x'"]:
    line = t5x_backend.command_line(['python', arg])
    assert shlex.split(line) == ['python', arg]
    out = subprocess.run(['bash', '-c', f'printf "%s\\n" {line}'], capture_output=True,
                         text=True, check=True).stdout
    assert out == f'python\n{arg}\n'


def test_every_run_has_its_own_directories_under_benchmark_and_size():
  spec = _spec()
  dirs = set()
  for name in benchmarks.CLAIMS:
    for run in benchmarks.pod_sweep(name, spec).runs:
      if run.resolved:
        dirs.add(spec.model_dir(run))
        assert spec.model_dir(run).startswith('/out/xtreme_up_semantic_parsing/mt5_base/runs/')
        assert t5x_backend.eval_dir(spec, run, 'test') == os.path.join(spec.model_dir(run),
                                                                       'eval_test')
  runs = {r.key for n in benchmarks.CLAIMS for r in benchmarks.pod_sweep(n, spec).runs
          if r.resolved}
  assert len(dirs) == len(runs)
  assert spec.results_dir == '/out/xtreme_up_semantic_parsing/mt5_base/results'
  other = _spec(model_size='mt5_xxl')
  assert other.results_dir == '/out/xtreme_up_semantic_parsing/mt5_xxl/results'


@pytest.mark.parametrize('name', benchmarks.CLAIMS)
def test_pod_sweeps_are_the_cpu_sweeps_runs(name):
  cpu = sweeps_lib.get_sweep(name)
  pod = benchmarks.pod_sweep(name, _spec(benchmark='xtreme_up_multitask', single_task='x_sw'))
  fields = lambda r: (r.point, r.seed, r.learning_rate, r.kind, r.lr_from, r.axes)  # noqa: E731
  assert [fields(r) for r in pod.runs] == [fields(r) for r in cpu.runs]
  for point in cpu.points():
    assert ([r.name for r in pod.tuning_runs(point)] ==
            [r.name for r in cpu.tuning_runs(point)])
  assert pod.metric == benchmarks.XTREME_UP_SCORE and pod.name == name
  for r in pod.runs:
    assert all(f.startswith('t5x/') for f in r.gin_files)
    assert not any(b.startswith(('train.', 'LossConfig')) for b in r.bindings)


def test_bindings_translate_to_t5x_macros():
  spec = _spec(bindings=('BATCH_SIZE=256',))
  c6 = benchmarks.pod_sweep('c6', spec)
  aux = [r for r in c6.runs if r.point == 'sira aux 0.1'][0]
  assert 'AUX_LOSS_FACTOR=0.1' in aux.bindings and aux.bindings[-1] == 'BATCH_SIZE=256'
  smoe = [r for r in c6.runs if r.point.startswith('smoe_dropout')][0]
  assert 'SMOE_SCHEDULE_STEPS=2000' in smoe.bindings
  c2 = benchmarks.pod_sweep('c2', spec)
  ceiling = [r for r in c2.runs if r.point.startswith('ceiling')][0]
  assert 't5x/runs/full_finetune.gin' in ceiling.gin_files
  for r in c2.runs:
    assert [b for b in r.bindings if b.startswith('TASK_NAME=')] == [
        "TASK_NAME='xtreme_up_semantic_parsing_sw'"]
  c3 = benchmarks.pod_sweep('c3', spec)
  assert [b for b in c3.runs[1].bindings if b.startswith('TASK_NAME=')] == [
      "TASK_NAME='xtreme_up_semantic_parsing'"]


def test_seqio_mixture_benchmark_and_tfds_data_dir():
  spec = _spec(benchmark='seqio_mixture', mixture='tfds_offline_mix',
               task_gin=('tasks/tfds_task.gin',), data_dir='/tfds', model_size='t5_tiny',
               vocabulary=None)
  run = _run(benchmarks.pod_sweep('c3', spec), 'lora r4-lr0.001-s0')
  argv = t5x_backend.train_argv(run, spec)
  assert '--gin_file=tasks/tfds_task.gin' in argv and argv[-1] == '--tfds_data_dir=/tfds'
  assert "--gin.TASK_NAME='tfds_offline_mix'" in argv
  assert spec.root == '/out/seqio_tfds_offline_mix/t5_tiny'


def test_launch_wrappers():
  spec = _spec()
  sweep = benchmarks.pod_sweep('c1', spec)
  run = _run(sweep, 'lora r4-lr0.001-s0')
  argv = t5x_backend.train_argv(run, spec)
  tpu = t5x_backend.Launch('tpu_vm', tpu_name='v4-64', zone='us-central2-b',
                           remote_repo='/home/me/sira')
  line = tpu.train(argv)
  words = shlex.split(line)
  assert words[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'v4-64',
                       '--zone=us-central2-b', '--worker=all']
  assert words[8].startswith('--command=') and len(words) == 9
  remote = shlex.split(words[8][len('--command='):])
  assert remote[:3] == ['cd', '/home/me/sira', '&&'] and remote[3:] == argv
  gpu = t5x_backend.Launch('multiprocess_gpu', coordinator_address='10.0.0.1:1234',
                           process_count=4)
  line = gpu.train(argv)
  assert line.startswith(t5x_backend.command_line(argv) + ' --multiprocess_gpu '
                         '--coordinator_address=10.0.0.1:1234 --process_count=4 --process_index=')
  for index in ('0', '3'):
    out = subprocess.run(['bash', '-c', f'printf "%s\\n" {line}'], capture_output=True, text=True,
                         env=dict(os.environ, PROCESS_INDEX=index), check=True).stdout
    assert out.splitlines()[-1] == f'--process_index={index}'
  unset = subprocess.run(['bash', '-c', f'printf "%s\\n" {line}'], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != 'PROCESS_INDEX'})
  assert unset.returncode != 0 and 'set PROCESS_INDEX' in unset.stderr
  for index, ran in (('0', 'python -m t5x.eval'), ('2', '')):
    out = subprocess.run(['bash', '-c', gpu.eval(['echo', 'python', '-m', 't5x.eval'])],
                         capture_output=True, text=True, env=dict(os.environ, PROCESS_INDEX=index))
    assert out.returncode == 0 and out.stdout.strip() == ran
  home = shlex.split(t5x_backend.Launch('tpu_vm', tpu_name='t', remote_repo='~/my repo')
                     .eval(['python']))[-1]
  assert home == "--command=cd ~/'my repo' && python"
  with pytest.raises(benchmarks.SpecError, match='--tpu_name'):
    t5x_backend.Launch('tpu_vm')


@pytest.mark.parametrize('kw,flag', [
    (dict(base_checkpoint=''), '--base_checkpoint is required'),
    (dict(base_checkpoint='/ckpt/mt5_base'), 'checkpoint_<step>'),
    (dict(vocabulary=None), '--vocabulary is required'),
    (dict(data_dir=None), '--data_dir is required'),
    (dict(finetune_steps=None), '--finetune_steps is required'),
    (dict(model_size='mt5_huge'), '--model_size=mt5_huge'),
    (dict(benchmark='glue'), '--benchmark=glue'),
    (dict(benchmark='seqio_mixture'), '--mixture is required'),
])
def test_missing_settings_are_named(kw, flag):
  with pytest.raises(benchmarks.SpecError, match=flag.replace('<', '.').replace('>', '.')):
    _spec(**kw)


def test_single_task_is_required_for_c2_and_trainer_bindings_are_refused():
  with pytest.raises(benchmarks.SpecError, match='--single_task'):
    benchmarks.pod_sweep('c2', _spec(single_task=None))
  with pytest.raises(benchmarks.SpecError, match='c1, c2'):
    benchmarks.pod_sweep('sira_defaults', _spec())
  with pytest.raises(benchmarks.SpecError, match='no T5X equivalent'):
    benchmarks.t5x_run(sweeps_lib.SWEEPS['sira_defaults'].runs[0], _spec())


def _cli(*args):
  flags = ['--backend=t5x', '--benchmark=xtreme_up_translation', '--model_size=mt5_small',
           '--base_checkpoint=/ckpt/checkpoint_1000', '--vocabulary=/ckpt/spiece.model',
           '--data_dir=/data/xu', '--finetune_steps=100', '--print_commands']
  return subprocess.run([sys.executable, '-m', 'experiments.runner', *flags, *args], cwd=REPO,
                        capture_output=True, text=True)


def test_cli_prints_every_paper_sweep(tmp_path):
  out = _cli(*(f'--sweep={n}' for n in benchmarks.CLAIMS), f'--output_root={tmp_path}',
             '--single_task=xtreme_up_translation_en_sw')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  spec = benchmarks.read_spec(str(tmp_path / 'xtreme_up_translation' / 'mt5_small' / 'results'))
  assert spec.finetune_steps == 100 and spec.benchmark == 'xtreme_up_translation'
  for name in benchmarks.CLAIMS:
    sweep = benchmarks.pod_sweep(name, spec)
    heads = [line for line in lines if line.startswith(f'# {name} / ')]
    assert len(heads) == len(sweep.runs)
    trains = sum(r.kind == 'finetune' and r.resolved for r in sweep.runs)
    evals = sum(r.resolved for r in sweep.runs) * 2
    start = lines.index(heads[0])
    block = lines[start:lines.index(heads[-1]) + 1 + 3 * sweep.runs[-1].resolved]
    assert sum('-m t5x.train ' in line for line in block) == trains
    assert sum('-m t5x.eval ' in line for line in block) == evals


def test_cli_names_a_missing_flag():
  out = _cli('--sweep=c1')
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1] == (
      'error: --output_root is required with --backend=t5x (nothing defaults to a bucket or a '
      'hub)')


def test_readme_block_run_here_is_the_tested_sweep():
  """docs/scale.md's "Reproducing the paper at scale" commands that ran here are the ones
  tests/t5x_pod_sweep.py runs (with /tmp/pod as its root)."""
  import re
  import t5x_pod_sweep
  from readme_blocks import sh_block
  block = re.sub(r'\\\n\s*', ' ', sh_block('docs/scale.md', 'xtreme_up_translation'))
  assert [shlex.split(line) for line in block.splitlines() if line.strip()] == (
      t5x_pod_sweep.commands('/tmp/pod'))
