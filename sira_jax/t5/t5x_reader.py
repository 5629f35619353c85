"""Read T5X example-network params (orbax or legacy msgpack + tensorstore checkpoints) for
`t5.loading`, and infer the T5Config their shapes (and a `config.json` beside them) determine."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from sira_jax.checkpoints import CheckpointError
from sira_jax.t5 import scan_layout
from sira_jax.t5.config import ARCHITECTURE_FIELDS, T5Config
from sira_jax.t5.loading import _check_shape, read_json


class T5XReader:
  """Reads T5X example-network params from an orbax or legacy (msgpack + tensorstore) checkpoint."""

  def __init__(self, path: str):
    self.path = path
    self._flat = None

  @staticmethod
  def is_t5x(path: str) -> bool:
    names = set(os.listdir(path))
    return bool(names & {'_METADATA', '_CHECKPOINT_METADATA', 'manifest.ocdbt', 'checkpoint',
                         '_sharding'}) or any(n.startswith('ocdbt.process') for n in names)

  def _load(self) -> dict[str, np.ndarray]:
    if self._flat is None:
      if os.path.isfile(os.path.join(self.path, 'checkpoint')) and not os.path.exists(
          os.path.join(self.path, '_METADATA')):
        tree = _read_legacy_t5x(self.path)
      else:
        tree = _read_orbax(self.path)
      self._flat = _unscanned(_find_params(tree, self.path))
    return self._flat

  def config_from_shapes(self) -> tuple[T5Config, set[str]]:
    """(config, the architecture fields the checkpoint determines)."""
    return _infer_t5x_config(self._load(), self.path)

  def read(self, cfg: T5Config, flat_shapes: Mapping[str, Any]) -> dict[str, np.ndarray]:
    flat = self._load()
    out = {}
    for name, arr in flat.items():
      if name not in flat_shapes:
        raise CheckpointError(f'T5X checkpoint {self.path!r} has parameter {name!r} '
                              f'{tuple(np.shape(arr))} that the model does not have')
      _check_shape(name, flat_shapes[name].shape, np.shape(arr),
                   f'T5X checkpoint {self.path!r}')
      out[name] = np.asarray(arr)
    base_missing = [k for k in flat_shapes if k not in out and k.endswith(
        ('/kernel', '/scale', '/embedding', '/rel_embedding'))]
    if base_missing:
      raise CheckpointError(f'T5X checkpoint {self.path!r} lacks parameters '
                            f'{base_missing[:6]} (shape {tuple(flat_shapes[base_missing[0]].shape)})')
    return out


def _read_orbax(path: str) -> Any:
  import orbax.checkpoint as ocp
  try:
    return ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
  except Exception as e:  # pragma: no cover - message passthrough
    raise CheckpointError(f'could not read orbax checkpoint {path!r}: {e}') from e


def _read_legacy_t5x(path: str) -> Any:
  """T5X's pre-orbax format: msgpack `checkpoint` with tensorstore-spec leaves."""
  import tensorstore as ts
  from flax import serialization
  fname = os.path.join(path, 'checkpoint')
  with open(fname, 'rb') as f:
    tree = serialization.msgpack_restore(f.read())

  def visit(x):
    if isinstance(x, dict) and 'driver' in x and ('kvstore' in x or 'path' in x):
      spec = json.loads(json.dumps(x))
      if 'kvstore' not in spec:  # oldest T5X specs: {'driver': 'zarr', 'path': name}
        spec['kvstore'] = {'driver': 'file', 'path': spec.pop('path')}
      kv = spec['kvstore']
      if kv.get('driver') not in (None, 'file'):
        raise CheckpointError(f'{fname!r}: array {kv.get("path")!r} lives on {kv.get("driver")!r} '
                              f'storage; copy the checkpoint directory to a local disk first')
      if kv.get('driver') == 'file' and not os.path.isabs(kv.get('path', '')):
        kv['path'] = os.path.join(path, kv['path'])
      try:
        return ts.open(spec, open=True).result().read().result()
      except Exception as e:
        raise CheckpointError(f'{fname!r}: cannot read tensorstore array {kv.get("path")!r}: {e}')
    if isinstance(x, dict):
      return {k: visit(v) for k, v in x.items()}
    return x
  return visit(tree)


_T5X_TOP = ('token_embedder', 'encoder', 'decoder')


def _unscanned(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A T5X param tree of this network in the unscanned layout (a run trained with
  `scan_layers=True` stores encoder/layers/... stacked on a leading layer axis)."""
  tree = scan_layout.to_layout(traverse_util.unflatten_dict(flat, sep='/'), scanned=False)
  return traverse_util.flatten_dict(tree, sep='/')


def _find_params(tree: Any, path: str) -> dict[str, np.ndarray]:
  """Locates the T5X param tree (root, 'target', 'params', 'optimizer/target', 'state/params')."""
  def looks_like_params(t):
    return isinstance(t, Mapping) and 'encoder' in t and 'decoder' in t

  stack = [tree]
  while stack:
    t = stack.pop(0)
    if looks_like_params(t):
      flat = traverse_util.flatten_dict(dict(t), sep='/')
      return {k: np.asarray(v) for k, v in flat.items()}
    if isinstance(t, Mapping):
      for key in ('target', 'params', 'optimizer', 'state', 'model'):
        if key in t:
          stack.append(t[key])
  raise CheckpointError(f'{path!r}: no T5X parameter tree (with encoder/decoder) found; top-level '
                        f'keys: {list(tree)[:10] if isinstance(tree, Mapping) else type(tree)}')


def _infer_t5x_config(flat: Mapping[str, np.ndarray], path: str) -> tuple[T5Config, set[str]]:
  """Architecture from T5X param shapes and a config.json beside them if present.

  Returns (config, known): `known` names the architecture fields the checkpoint determines (the
  shapes give sizes, tying and buckets; activations, max distance, epsilon and logit scaling
  only come from config.json)."""
  need = ['token_embedder/embedding', 'encoder/relpos_bias/rel_embedding',
          'encoder/layers_0/attention/query/kernel']
  for n in need:
    if n not in flat:
      raise CheckpointError(f'T5X checkpoint {path!r} lacks {n!r}: unknown architecture')
  vocab, d_model = flat['token_embedder/embedding'].shape
  heads, buckets = flat['encoder/relpos_bias/rel_embedding'].shape
  inner = flat['encoder/layers_0/attention/query/kernel'].shape[1]
  n_enc = len({k.split('/')[1] for k in flat if k.startswith('encoder/layers_')})
  n_dec = len({k.split('/')[1] for k in flat if k.startswith('decoder/layers_')})
  mlp = {k.split('/')[-2] for k in flat if k.startswith('encoder/layers_0/mlp/')}
  gated = 'wi_0' in mlp
  d_ff = flat['encoder/layers_0/mlp/' + ('wi_0' if gated else 'wi') + '/kernel'].shape[1]
  kw = {}
  side = os.path.join(path, 'config.json')
  if os.path.exists(side):
    kw = {k: v for k, v in read_json(side).items() if k in T5Config.__dataclass_fields__}
    if 'mlp_activations' in kw:
      kw['mlp_activations'] = tuple(kw['mlp_activations'])
  base = dict(vocab_size=int(vocab), d_model=int(d_model), d_ff=int(d_ff), num_heads=int(heads),
              d_kv=int(inner // heads), num_encoder_layers=n_enc, num_decoder_layers=n_dec,
              mlp_activations=('gelu', 'linear') if gated else ('relu',),
              tie_word_embeddings='decoder/logits_dense/kernel' not in flat,
              relative_attention_num_buckets=int(buckets))
  base.update(kw)
  known = {'vocab_size', 'd_model', 'd_ff', 'num_heads', 'd_kv', 'num_encoder_layers',
           'num_decoder_layers', 'tie_word_embeddings', 'relative_attention_num_buckets'}
  known |= set(kw) & set(ARCHITECTURE_FIELDS)
  return T5Config(**base), known
