"""A tiny XTREME-UP pod sweep through real T5X on CPU, as the README documents it: fixture data in
the release's JSONL format (translation, sw and yo), a tiny byte-level base pretrained by
`python -m t5x.train`, then three runs of sweep c3 (the floor and SiRA at two learning rates of its
grid) through `python -m experiments.runner --backend=t5x`, collected into result files, then
`python -m experiments.report`. Used by tests/test_t5x_pod_sweep.py (end to end) and, run as a
script with the T5X environment's python, regenerates the collector's fixture files:

  ~/.cache/t5x-venv/bin/python tests/t5x_pod_sweep.py --fixture_dir=tests/fixtures/t5x_pod_sweep

(copies what T5X wrote for each run, checkpoint data aside: config.gin, model-info.txt (t5x.eval's
for the floor), the train event files, each checkpoint's commit_success.txt and per split the
inference_eval metrics files; about 250 KB).
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]

from test_xtreme_up import write_release  # noqa: E402

SWEEP = 'c3'
RUNS = ('floor (frozen base)-s0', 'sira E8 k2-lr0.01-s0', 'sira E8 k2-lr0.03-s0')
BASE_STEPS = 30
FINETUNE_STEPS = 200
# Tiny sizes for every run (the sweep's --binding): short rows, small batches, no training-time
# eval (train.* bindings reach t5x.train only); adapters on the FFN too, and Adafactor's updates
# not scaled by each parameter's size (LoRA B starts at 0: scaled, it would barely move in 200
# steps), so the runs learn enough to score above 0. (t5x/runs/finetune.gin now sets the latter
# itself; the binding stays, as it is part of the committed fixtures' run keys.)
BINDINGS = ('BATCH_SIZE=8', "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}",
            'train.train_eval_dataset_cfg=None', "ADAPTER_TARGETS=('*/query', '*/value', '*/mlp/*')",
            'adafactor.Adafactor.multiply_by_parameter_scale=False')


def env() -> dict:
  return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
              XLA_FLAGS='', JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')


def run(argv, log_path):
  with open(log_path, 'w') as f:
    rc = subprocess.run(argv, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT,
                        check=False).returncode
  if rc:
    with open(log_path) as f:
      raise RuntimeError(f'{argv[:3]} exited {rc}:\n' + ''.join(f.readlines()[-40:]))


def sweep_flags(root: str) -> list[str]:
  """The runner's and report's flags of the tiny sweep under `root`."""
  return [f'--sweep={SWEEP}', '--backend=t5x', '--benchmark=xtreme_up_translation',
          '--model_size=t5_tiny', f'--base_checkpoint={root}/base/checkpoint_{BASE_STEPS}',
          f'--data_dir={root}/xtreme-up-v1.1.jsonl', f'--output_root={root}/out',
          f'--finetune_steps={FINETUNE_STEPS}', '--eval_examples=2',
          *(f'--binding={b}' for b in BINDINGS)]


def results_dir(root: str) -> str:
  return os.path.join(root, 'out', 'xtreme_up_translation', 't5_tiny', 'results')


def commands(root: str, python: str = 'python') -> list[list[str]]:
  """The sweep's commands (docs/scale.md, "Reproducing the paper at scale", the block run here): the
  base, the three runs through the T5X backend, the report."""
  base = [python, '-m', 't5x.train', '--gin_search_paths=gin',
          '--gin_file=t5x/models/t5_tiny.gin', '--gin_file=t5x/runs/pretrain.gin',
          f"--gin.MODEL_DIR='{root}/base'",
          "--gin.MIXTURE_OR_TASK_NAME='offline_span_corruption'",
          f'--gin.TRAIN_STEPS={BASE_STEPS}', '--gin.BATCH_SIZE=8',
          "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}",
          '--gin.train.train_eval_dataset_cfg=None']
  sweep = [python, '-m', 'experiments.runner', *sweep_flags(root), *(f'--run={r}' for r in RUNS)]
  report = [python, '-m', 'experiments.report', f'--results_dir={results_dir(root)}',
            f'--sweep={SWEEP}', f'--out_dir={root}/report']
  return [base, sweep, report]


def run_sweep(root: str, python: str = sys.executable) -> str:
  """Data, then `commands`; returns the report's path."""
  write_release(os.path.join(root, 'xtreme-up-v1.1.jsonl'), families=('translation',),
                languages=['sw', 'yo'])
  for argv, log in zip(commands(root, python), ('base', 'sweep', 'report')):
    run(argv, os.path.join(root, f'{log}.log'))
  return os.path.join(root, 'report', 'REPORT.md')


def copy_fixture(root: str, fixture_dir: str) -> None:
  """Copies what T5X wrote for each run (module docstring) to `fixture_dir/<run key>/`."""
  runs = os.path.join(root, 'out', 'xtreme_up_translation', 't5_tiny', 'runs')
  patterns = ('config.gin', 'model-info.txt', 'train/events.out.tfevents.*',
              'checkpoint_*/commit_success.txt', 'eval_*/inference_eval/*-metrics.jsonl')
  # The floor trains nothing: its config and model info are t5x.eval's (the first split's).
  floor = ('eval_validation/config.gin', 'eval_validation/model-info.txt')
  if os.path.exists(fixture_dir):
    shutil.rmtree(fixture_dir)
  for key in sorted(os.listdir(runs)):
    trained = os.path.exists(os.path.join(runs, key, 'config.gin'))
    for pattern in patterns + (() if trained else floor):
      for path in glob.glob(os.path.join(runs, key, pattern)):
        dest = os.path.join(fixture_dir, key, os.path.relpath(path, os.path.join(runs, key)))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy(path, dest)
  shutil.copy(os.path.join(results_dir(root), 'spec.json'), os.path.join(fixture_dir, 'spec.json'))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--fixture_dir', required=True)
  parser.add_argument('--keep', help='run here instead of a temporary directory')
  args = parser.parse_args()
  root = args.keep or tempfile.mkdtemp(prefix='t5x_pod_sweep_')
  os.makedirs(root, exist_ok=True)
  print(run_sweep(root))
  copy_fixture(root, os.path.abspath(args.fixture_dir))


if __name__ == '__main__':
  main()
