r"""The offline default job: pretrain a tiny T5, fine-tune SiRA and LoRA on it, evaluate, compare.

  python -m sira_jax.main                       # gin/main.gin; work dir ./runs/main
  python -m sira_jax.main --gin.WORK_DIR=/tmp/m --gin.FINETUNE_STEPS=1000

1. Pretrain a tiny byte-level T5 on the bundled span-corruption task. The base is cached in
   WORK_DIR/base_<config hash>/ and reused by later runs with the same settings.
2. Fine-tune each method of METHODS (SiRA and LoRA by default) on the bundled multitask mixture,
   the base frozen, each in WORK_DIR/<method>_<settings hash>/ (re-running resumes / reuses
   finished runs; changed settings start a new run and never replace an old one).
3. Evaluate each on the mixture's validation split with seqio's Evaluator and print a table.
Everything runs offline on CPU; sizes in gin/main.gin keep it well under 15 minutes on 2 cores.
"""

from __future__ import annotations

if __name__ == '__main__':
  # Run the CLI from the importable module `sira_jax.main`, so gin registers its configurables once
  # (not a second time as `__main__.*`).
  from sira_jax import gin_utils as _gin_utils
  _gin_utils.exit_if_help(__doc__, ('main.gin',))
  _gin_utils.import_tensorflow_quietly()
  from sira_jax import main as _module  # pylint: disable=import-self
  _module.cli()

import hashlib
import json
import os
import sys
import time
from typing import Any, Mapping

import gin
import jax
import numpy as np
from absl import flags

from sira_jax import data as data_lib
from sira_jax import eval as eval_lib
from sira_jax import optim
from sira_jax import train as train_lib
from sira_jax import trainer as trainer_lib
from sira_jax.adapters import AdapterConfig
from sira_jax.t5.config import T5Config


def _hash(obj) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _log(msg: str):
  print(f'[main {time.strftime("%H:%M:%S")}] {msg}', flush=True)


@gin.configurable
def run_main(
    *,
    work_dir: str = 'runs/main',
    model_config: T5Config = gin.REQUIRED,
    pretrain_task: str = 'offline_span_corruption',
    pretrain_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    pretrain_steps: int = gin.REQUIRED,
    pretrain_batch_size: int = 32,
    pretrain_learning_rate: float = 1e-2,
    finetune_mixture: str = 'offline_suite_mix',
    finetune_feature_lengths: Mapping[str, int] = gin.REQUIRED,
    finetune_steps: int = gin.REQUIRED,
    finetune_batch_size: int = 32,
    finetune_learning_rate: float = 1e-2,
    methods: Mapping[str, AdapterConfig] = gin.REQUIRED,
    adapter_targets: tuple[str, ...] = ('*/query', '*/value'),
    eval_split: str = 'validation',
    eval_num_examples: int | None = 20,
    eval_batch_size: int = 128,
    val_batches: int = 8,
    seed: int = 0,
    progress_bar: bool = True,
) -> dict:
  """Runs the three stages; returns {'table': str, 'results': {...}, 'wall_time': s}."""
  t0 = time.time()
  work_dir = os.path.abspath(work_dir)
  os.makedirs(work_dir, exist_ok=True)
  for name in (pretrain_task, finetune_mixture):
    data_lib.get_mixture_or_task(name)
  base_cfg = model_config.replace(adapter=AdapterConfig(kind='none'), adapter_overrides=())
  pre_key = dict(model=train_lib.config_to_dict(base_cfg), task=pretrain_task,
                 lengths=dict(pretrain_feature_lengths), steps=pretrain_steps,
                 batch=pretrain_batch_size, lr=pretrain_learning_rate, seed=seed)
  base_run = os.path.join(work_dir, f'base_{_hash(pre_key)}')
  base_dir = train_lib.resolve_base_dir(base_run)
  if base_dir is not None:
    _log(f'[1/3] reusing the cached pretrained base {base_dir}')
    pre_time = 0.0
  else:
    _log(f'[1/3] pretraining a tiny T5 ({optim.count_params(_base_params(base_cfg))/1e6:.2f}M '
         f'params) on {pretrain_task} for {pretrain_steps} steps -> {base_run}')
    r = train_lib.train(
        model_dir=base_run, mixture_or_task_name=pretrain_task,
        task_feature_lengths=pretrain_feature_lengths, train_steps=pretrain_steps,
        batch_size=pretrain_batch_size, model_config=base_cfg, pretrain=True,
        learning_rate=pretrain_learning_rate, seed=seed, progress_bar=progress_bar,
        initial_checkpoint_path=None)
    if r.stopped_by != 'done':
      _log('pretraining interrupted; re-run to resume')
      sys.exit(0)
    base_dir = r.base_dir
    pre_time = r.wall_time
    _log(f'      pretraining done in {pre_time:.0f}s, final loss {r.last_metrics["loss"]:.3f}')

  results, run_dirs = {}, []
  for i, (method, adapter) in enumerate(methods.items()):
    cfg = model_config.replace(adapter=adapter, adapter_targets=tuple(adapter_targets))
    # Keyed by its settings like the base: a changed setting starts a new run beside the old one
    # instead of replacing it; the same settings resume / reuse the finished run.
    ft_key = dict(model=train_lib.config_to_dict(cfg), base=base_dir, task=finetune_mixture,
                  lengths=dict(finetune_feature_lengths), steps=finetune_steps,
                  batch=finetune_batch_size, lr=finetune_learning_rate, seed=seed)
    run_dir = os.path.join(work_dir, f'{method}_{_hash(ft_key)}')
    run_dirs.append(run_dir)
    _log(f'[2/3] fine-tuning {method} ({i + 1}/{len(methods)}) on {finetune_mixture} for '
         f'{finetune_steps} steps -> {run_dir}')
    r = train_lib.train(
        model_dir=run_dir, mixture_or_task_name=finetune_mixture,
        task_feature_lengths=finetune_feature_lengths, train_steps=finetune_steps,
        batch_size=finetune_batch_size, model_config=cfg, pretrain=False,
        initial_checkpoint_path=base_dir, learning_rate=finetune_learning_rate, seed=seed,
        progress_bar=progress_bar)
    if r.stopped_by != 'done':
      _log('fine-tuning interrupted; re-run to resume')
      sys.exit(0)
    steps_run = [h for h in r.history if 'step_time' in h]
    _log(f'[3/3] evaluating {method} on {finetune_mixture}/{eval_split} '
         f'({eval_num_examples or "all"} examples per task)')
    t_eval = time.time()
    metrics = eval_lib.evaluate(
        model_dir=run_dir, mixture_or_task_name=finetune_mixture, split=eval_split,
        task_feature_lengths=finetune_feature_lengths, batch_size=eval_batch_size,
        num_examples=eval_num_examples)
    trainable = optim.count_params(r.state.params)
    val = validation_loss(run_dir, finetune_mixture, finetune_feature_lengths,
                          finetune_batch_size, val_batches, eval_split)
    results[method] = dict(
        metrics=metrics, trainable_params=trainable, validation=val,
        final_loss=r.last_metrics.get('cross_entropy'),
        step_time=float(np.median([h['step_time'] for h in steps_run])) if steps_run else None,
        train_time=r.wall_time, eval_time=time.time() - t_eval)
  table = format_table(results)
  wall = time.time() - t0
  print(table)
  print(f'total wall time {wall:.0f}s (pretraining {pre_time:.0f}s)')
  # One results file per set of runs (named by their settings hashes): never replaces another's.
  path = os.path.join(work_dir, f'results_{_hash(sorted(run_dirs))}.json')
  with open(path, 'w') as f:
    json.dump(dict(results=results, wall_time=wall, runs=run_dirs), f, indent=1, sort_keys=True,
              default=float)
  _log(f'results written to {path}')
  return dict(table=table, results=results, wall_time=wall)


def validation_loss(model_dir: str, mixture: str, lengths: Mapping[str, int], batch_size: int,
                    num_batches: int, split: str = 'validation') -> dict:
  """Teacher-forced validation cross-entropy and token accuracy (no dropout, eval capacity).

  Averaged over `num_batches` batches of the mixture's validation split (fixed seed, so every
  method sees the same examples); a smooth companion of the decoded metrics.
  """
  model, variables, _, _ = train_lib.load_trained(model_dir)
  mt = data_lib.get_mixture_or_task(mixture)
  ds = mt.get_dataset(dict(lengths), split=split, shuffle=True, seed=1234,
                      num_epochs=1, use_cached=False)
  ds = data_lib.feature_converter(False)(ds, dict(lengths))
  step = jax.jit(trainer_lib.make_eval_step(model, trainer_lib.LossConfig(z_loss=0.0)))
  ce_sum = acc_sum = tok = 0.0
  for batch in ds.batch(batch_size, drop_remainder=True).take(num_batches).as_numpy_iterator():
    m = jax.device_get(step(variables, batch))
    n = float(m['target_tokens'])
    ce_sum += float(m['cross_entropy']) * n
    acc_sum += float(m['accuracy']) * n
    tok += n
  return dict(cross_entropy=ce_sum / max(tok, 1.0), token_accuracy=100.0 * acc_sum / max(tok, 1.0))


def _base_params(cfg):
  model = train_lib.build_model(cfg)
  return train_lib.init_variables(model, cfg)['params']


def _family(task: str) -> str:
  parts = task.split('_')
  return '_'.join(parts[:2]) if len(parts) > 2 else task


def format_table(results: Mapping[str, Any]) -> str:
  """Markdown table: per task family, the mean of each metric over its languages, per method."""
  methods = list(results)
  fam: dict[tuple[str, str], dict[str, list]] = {}
  for m in methods:
    for task, mets in results[m]['metrics'].items():
      for k, v in mets.items():
        fam.setdefault((_family(task), k), {}).setdefault(m, []).append(v)
  header = '| metric | ' + ' | '.join(methods) + ' |'
  lines = [header, '|' + '---|' * (len(methods) + 1)]
  overall = {m: [] for m in methods}
  for (f, k), per in sorted(fam.items()):
    row = [f'{f} {k}']
    for m in methods:
      vals = per.get(m, [])
      row.append(f'{np.mean(vals):.1f}' if vals else '-')
      if vals and k in ('sequence_accuracy', 'accuracy'):
        overall[m].append(np.mean(vals))
    lines.append('| ' + ' | '.join(row) + ' |')
  lines.append('| mean sequence accuracy | ' + ' | '.join(
      f'{np.mean(overall[m]):.1f}' if overall[m] else '-' for m in methods) + ' |')
  lines.append('| trainable params | ' + ' | '.join(
      f'{results[m]["trainable_params"]:,}' for m in methods) + ' |')
  lines.append('| validation token accuracy (teacher-forced) | ' + ' | '.join(
      f'{results[m]["validation"]["token_accuracy"]:.1f}' for m in methods) + ' |')
  lines.append('| validation cross-entropy (teacher-forced) | ' + ' | '.join(
      f'{results[m]["validation"]["cross_entropy"]:.3f}' for m in methods) + ' |')
  lines.append('| final train cross-entropy | ' + ' | '.join(
      f'{results[m]["final_loss"]:.3f}' if results[m]['final_loss'] is not None else '-'
      for m in methods) + ' |')
  lines.append('| median step time (ms) | ' + ' | '.join(
      f'{1000 * results[m]["step_time"]:.0f}' if results[m]['step_time'] else '-'
      for m in methods) + ' |')
  lines.append('| train / eval wall time (s) | ' + ' | '.join(
      f'{results[m]["train_time"]:.0f} / {results[m]["eval_time"]:.0f}' for m in methods) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  gin_utils.quiet_logs()
  data_lib.import_task_modules()
  FLAGS = flags.FLAGS
  files = FLAGS.gin_file or ['main.gin']
  try:
    gin_utils.parse_gin(files, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    data_lib.register_after_gin()
    run_main()
  except (train_lib.ConfigError, gin_utils.GinConfigError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)



def cli():
  from sira_jax import gin_utils  # pylint: disable=import-outside-toplevel
  gin_utils.define_gin_flags()
  gin_utils.run(main)
