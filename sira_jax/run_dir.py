"""MODEL_DIR bookkeeping of a training run: the run's fingerprint (run_config.json), config.gin,
the training summary, and refusing a directory that holds another run.

  MODEL_DIR/run_config.json       what the run is (config, task, optimizer, ...): resume key
  MODEL_DIR/config.gin            the operative gin config
  MODEL_DIR/train_summary.json    last metrics and the logged history across resumes (written
                                  at every log window)
  MODEL_DIR/checkpoints/<step>/   train-state checkpoints (train.RunCheckpoints)
  MODEL_DIR/damaged_checkpoints/  damaged steps set aside on resume
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Mapping

import gin
import jax
from jax.experimental import multihost_utils

from sira_jax import model_init
from sira_jax.t5.config import T5Config

RUN_CONFIG = 'run_config.json'
SUMMARY = 'train_summary.json'
DAMAGED = 'damaged_checkpoints'


class ConfigError(ValueError):
  """A run configuration refused before anything is trained or written."""


def say(msg: str):
  """A line for the user (stderr, process 0 only): resume, fallbacks, nothing to do."""
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def dict_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = '') -> str:
  """'key.sub: old -> new; ...' for every leaf where nested dicts `a` and `b` differ ('': none)."""
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      sub = dict_diff(va, vb, f'{prefix}{k}.')
      if sub:
        out.append(sub)
    elif va != vb:
      out.append(f'{prefix}{k}: {va!r} -> {vb!r}')
  return '; '.join(out)


def read_run_config(model_dir: str) -> dict:
  """The fingerprint a training run recorded in MODEL_DIR/run_config.json."""
  path = os.path.join(model_dir, RUN_CONFIG)
  if not os.path.exists(path):
    from sira_jax import checkpoints as ckpt_lib
    raise ckpt_lib.CheckpointError(f'{model_dir} holds no training run ({RUN_CONFIG} missing)')
  with open(path) as f:
    return json.load(f)


def check_model_dir_path(model_dir: str):
  """MODEL_DIR must be a directory or creatable as one."""
  check_dir_path(model_dir, 'MODEL_DIR', 'it holds checkpoints, config and logs')


def check_dir_path(path: str, what: str, holds: str = 'it is written to'):
  """`path` must be a writable directory or creatable as one; ConfigError naming `what` if not."""
  p = path
  while not os.path.exists(p):
    parent = os.path.dirname(p)
    if parent == p:
      break
    p = parent
  if not os.path.isdir(p):
    where = what if p == path else f'{what} {path}: its parent'
    raise ConfigError(f'{where} {p} is a file, not a directory; choose a directory path for '
                      f'{what} ({holds}).')
  if not os.access(p, os.W_OK):
    raise ConfigError(f'{what} {path}: {p} is not writable')


def check_model_dir(model_dir: str, fingerprint: Mapping[str, Any], overwrite: bool) -> bool:
  """Refuses a MODEL_DIR that holds a run with another config (unless overwrite, which clears it).

  Returns True when the directory holds this same run (resume). With several processes, every
  process reads the directory before any clears it, and process 0 alone clears it (the others wait).
  """
  resume, clear = _model_dir_decision(model_dir, fingerprint, overwrite)
  if clear:
    multi = jax.process_count() > 1
    if multi:
      multihost_utils.sync_global_devices('sira_jax.run_dir: MODEL_DIR read before clearing')
    if jax.process_index() == 0:
      _clear_run(model_dir)
    if multi:
      multihost_utils.sync_global_devices('sira_jax.run_dir: MODEL_DIR cleared')
  return resume


def _model_dir_decision(model_dir: str, fingerprint: Mapping[str, Any], overwrite: bool
                        ) -> tuple[bool, bool]:
  """(resume, clear) for MODEL_DIR; reads only. ConfigError for another run without overwrite."""
  path = os.path.join(model_dir, RUN_CONFIG)
  if not os.path.exists(path):
    ckpt_dir = os.path.join(model_dir, 'checkpoints')
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
      if not overwrite:
        raise ConfigError(f'MODEL_DIR {model_dir} holds checkpoints but no {RUN_CONFIG}; refusing '
                          'to mix runs. Use another MODEL_DIR or pass --overwrite.')
      return False, True
    return False, False
  with open(path) as f:
    old = _with_new_config_fields(json.load(f))
  if old == json.loads(json.dumps(fingerprint)):
    return True, False
  if not overwrite:
    diff = dict_diff(old, json.loads(json.dumps(fingerprint)))
    raise ConfigError(
        f'MODEL_DIR {model_dir} holds a run with another config ({diff}); refusing to overwrite '
        'it. Use another MODEL_DIR or pass --overwrite to replace that run.')
  return False, True


def _with_new_config_fields(recorded: dict) -> dict:
  """A run_config.json as this version writes it: T5Config fields added since the run was
  recorded (e.g. scan_layers, remat_policy) take their defaults, which are what that run used."""
  model_config = recorded.get('model_config')
  if not isinstance(model_config, dict):
    return recorded
  defaults = model_init.config_to_dict(T5Config())
  added = {k: v for k, v in defaults.items() if k not in model_config}
  return dict(recorded, model_config={**added, **model_config})


def _clear_run(model_dir: str):
  for name in ('checkpoints', 'train', 'base', 'eval', 'infer', RUN_CONFIG, 'config.gin', SUMMARY):
    p = os.path.join(model_dir, name)
    if os.path.isdir(p):
      shutil.rmtree(p)
    elif os.path.exists(p):
      os.remove(p)


def write_run_files(model_dir: str, fingerprint: Mapping[str, Any]):
  """run_config.json and config.gin: written once every input has been validated."""
  os.makedirs(model_dir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(model_dir, RUN_CONFIG), 'w') as f:
      json.dump(fingerprint, f, indent=1, sort_keys=True)
    with open(os.path.join(model_dir, 'config.gin'), 'w') as f:
      f.write(gin.config_str())


def write_summary(model_dir: str, history: list, last_metrics: Mapping[str, Any], step: int,
                  start_step: int) -> tuple[dict, list]:
  """Appends this session's logged `history` to MODEL_DIR/train_summary.json (history up to
  `start_step`, the step resumed from, kept across resumes); returns (last_metrics, full history).

  Called at every logged window and at the end (each call rewrites the same session's part), so
  an interrupted run keeps the history it logged and its resume continues it.
  """
  path = os.path.join(model_dir, SUMMARY)
  old = dict(last_metrics={}, history=[])
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  full = [h for h in old['history'] if h['step'] <= start_step] + list(history)
  last = dict(last_metrics or old['last_metrics'])
  if history and jax.process_index() == 0:
    write_json_atomically(path, dict(step=int(step), last_metrics=last, history=full))
  return last, full


def write_json_atomically(path: str, obj: Any):
  """Writes `obj` as JSON to `path` through a temporary file and a rename: a reader (or a run
  interrupted while writing) sees the old file or the new one, never half of one."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)
