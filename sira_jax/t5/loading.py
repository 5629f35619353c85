"""Load pretrained T5-family weights into the Flax `Transformer` (adapters created fresh).

    model, params = sira_jax.load_pretrained('/path/to/flan-t5-base')          # HF directory
    model, params = sira_jax.load_pretrained('/path/to/t5x/checkpoint_1000000')  # T5X checkpoint
    model, params = sira_jax.load_pretrained(path, adapter=AdapterConfig(kind='sira', ...),
                                             adapter_targets=('*/query', '*/value'))
    logits = model.apply({'params': params}, enc_tokens, dec_inputs, dec_targets,
                         enable_dropout=False)

Formats:
  (a) Hugging Face: `config.json` (model_type t5 / mt5 / umt5-less T5 family, T5ForConditionalGeneration
      or MT5ForConditionalGeneration) + `model.safetensors`, or sharded safetensors listed in
      `model.safetensors.index.json`. Read with the `safetensors` numpy API (no torch).
  (b) T5X: an orbax checkpoint directory whose tree holds T5X example-network names (under
      'target', 'params' or at the root; optimizer state is ignored), or a legacy T5X checkpoint
      directory (a msgpack file named `checkpoint` whose leaves are tensorstore specs of
      `target.<path>` arrays). The architecture comes from the parameter shapes and a
      `config.json` saved beside them, if any (see `t5x_reader`).

The checkpoint's architecture always wins: a `config=` must agree with every architecture field
the checkpoint records (sizes, activations, tying, logit scaling, relative-position buckets and
max distance, layer-norm epsilon), or loading raises ArchitectureMismatchError naming the field
and both values. Fields that do not change what the weights compute (dropout, dtypes, adapters)
are taken from `config=`.

If the models' variables hold non-params collections (e.g. the SMoE-Dropout 'schedule'), use
`load_pretrained_variables`, which returns them all.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import TYPE_CHECKING, Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
import flax.linen as nn

from sira_jax import model_init
from sira_jax.adapters import AdapterConfig
from sira_jax.checkpoints import CheckpointError  # one error class for every checkpoint problem
from sira_jax.t5 import scan_layout
from sira_jax.t5.config import T5Config, with_checkpoint_architecture
from sira_jax.t5.network import Transformer

if TYPE_CHECKING:
  from sira_jax.t5.t5x_reader import T5XReader  # imported where used: it imports this module

Params = dict




# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
def load_pretrained(path: str | os.PathLike, adapter: AdapterConfig | None = None, *,
                    config: T5Config | None = None, rng: jax.Array | int = 0,
                    **config_overrides) -> tuple[Transformer, Params]:
  """(model, params) from a Hugging Face T5 directory or a T5X checkpoint directory.

  Args:
    path: the directory.
    adapter: AdapterConfig for the adapted sites (default: none, the plain pretrained model).
    config: a T5Config to use instead of the one read/inferred from the checkpoint (its shapes
      must match the weights).
    rng: PRNG key or seed for the fresh adapter params.
    **config_overrides: further T5Config fields, e.g. adapter_targets=('*',), dtype='bfloat16',
      dropout_rate=0.0, param_dtype='bfloat16'.
  Returns:
    (Transformer, params): params is a plain nested dict (no partitioning boxes).
  """
  model, variables = load_pretrained_variables(path, adapter, config=config, rng=rng,
                                               **config_overrides)
  return model, variables['params']


def load_pretrained_variables(path, adapter=None, *, config=None, rng=0, **config_overrides):
  """Like `load_pretrained` but returns (model, all variables) including e.g. 'schedule'.

  A given `config` must agree with the checkpoint on every architecture field the checkpoint
  records (`T5Config.architecture`); a disagreement raises ArchitectureMismatchError.
  """
  reader, file_cfg, known = open_checkpoint(path)
  cfg = file_cfg if config is None else with_checkpoint_architecture(
      config, known, source=os.fspath(path))
  if adapter is not None:
    config_overrides['adapter'] = adapter
  if config_overrides:
    cfg = cfg.replace(**config_overrides)
  model = Transformer(cfg)
  if isinstance(rng, int):
    rng = jax.random.PRNGKey(rng)

  shapes = nn.unbox(model_init.abstract_variables(model))
  flat_shapes = traverse_util.flatten_dict(shapes['params'], sep='/')
  loaded = _read_in_layout(reader, cfg, shapes['params'])
  missing = [k for k in flat_shapes if k not in loaded]

  def init_rest(r):
    v = nn.unbox(model_init.init_fn(model)(r))
    flat = traverse_util.flatten_dict(v['params'], sep='/')
    rest = {k: flat[k] for k in missing}
    others = {c: x for c, x in v.items() if c != 'params'}
    return rest, others

  # jit drops the (discarded) random init of every loaded kernel.
  rest, others = jax.jit(init_rest)(rng)
  flat = {k: jnp.asarray(loaded[k], flat_shapes[k].dtype) for k in loaded}
  flat.update(rest)
  variables = {'params': traverse_util.unflatten_dict(flat, sep='/'), **others}
  return model, variables


def open_checkpoint(path) -> tuple['HFReader | T5XReader', T5Config, dict[str, Any]]:
  """(reader, the checkpoint's T5Config, the architecture fields it records) of a HF / T5X dir.

  HF: every architecture field comes from config.json (and the weights, for tying). T5X: the
  fields the parameter shapes determine, plus those of a `config.json` saved beside it.
  `reader.read(cfg, flat_param_shapes)` then returns the checked base tensors.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f'checkpoint path {path!r} does not exist')
  if detect_format(path) == 'hf':
    reader = HFReader(path)
    cfg = hf_config_to_t5(read_json(os.path.join(path, 'config.json')),
                          os.path.join(path, 'config.json'), reader)
    return reader, cfg, cfg.architecture()
  from sira_jax.t5.t5x_reader import T5XReader
  reader = T5XReader(path)
  cfg, known = reader.config_from_shapes()
  return reader, cfg, {k: v for k, v in cfg.architecture().items() if k in known}


def _read_in_layout(reader, cfg: T5Config, shapes: Params) -> dict[str, np.ndarray]:
  """The checkpoint's base tensors, {flat '/' name: array}, in the layout of `cfg.scan_layers`:
  the files name every layer (layers_N), so they are read unscanned and stacked after."""
  unscanned = traverse_util.flatten_dict(scan_layout.to_layout(shapes, scanned=False), sep='/')
  loaded = traverse_util.unflatten_dict(reader.read(cfg, unscanned), sep='/')
  return traverse_util.flatten_dict(scan_layout.to_layout(loaded, cfg.scan_layers), sep='/')


def detect_format(path: str) -> str:
  """'hf' or 't5x' for a checkpoint directory; raises CheckpointError otherwise."""
  if not os.path.isdir(path):
    raise CheckpointError(f'{path!r} is not a directory (expected a HF model directory or a '
                          f'T5X checkpoint directory)')
  names = set(os.listdir(path))
  if 'config.json' in names and any(n.endswith('.safetensors') or n.endswith('.safetensors.index.json')
                                    for n in names):
    return 'hf'
  from sira_jax.t5.t5x_reader import T5XReader
  if T5XReader.is_t5x(path):
    return 't5x'
  if 'config.json' in names:
    raise CheckpointError(
        f'{path!r} has config.json but neither model.safetensors nor '
        f'model.safetensors.index.json (PyTorch .bin weights are not read: convert them with '
        f'`save_pretrained(..., safe_serialization=True)`)')
  raise CheckpointError(
      f'{path!r} is neither a Hugging Face model directory (config.json + model.safetensors) nor '
      f'a T5X checkpoint (orbax metadata or a `checkpoint` file); found {sorted(names)[:10]}')


def read_json(filename: str) -> dict:
  if not os.path.exists(filename):
    raise CheckpointError(f'missing file {filename!r}')
  with open(filename) as f:
    return json.load(f)


def _check_shape(param: str, want: tuple, got: tuple, source: str):
  if tuple(want) != tuple(got):
    raise CheckpointError(f'shape mismatch for parameter {param!r}: the model config expects '
                          f'{tuple(want)}, but {source} has {tuple(got)}')


# ----------------------------------------------------------------------------------------------
# Hugging Face
# ----------------------------------------------------------------------------------------------
_HF_ARCHS = ('T5ForConditionalGeneration', 'MT5ForConditionalGeneration')
_HF_ACTS = {'relu': 'relu', 'gelu_new': 'gelu', 'gelu': 'gelu_exact',
            'gelu_pytorch_tanh': 'gelu', 'silu': 'silu', 'swish': 'silu'}


def hf_config_to_t5(c: Mapping[str, Any], source: str = 'config.json',
                    reader: 'HFReader | None' = None) -> T5Config:
  """T5Config from a HF T5/mT5 config.json dict (and the weight files, for tying).

  Tying: untied when the files hold an `lm_head.weight` that the config declares untied or that
  differs from `shared.weight` (what transformers does); tied otherwise. Logit scaling follows
  `scale_decoder_outputs` when present (transformers>=5 T5), else `tie_word_embeddings` (T5 and
  transformers<5), and is off for MT5 saved by transformers>=5 (that class never scales).
  """
  model_type = c.get('model_type')
  archs = c.get('architectures') or []
  if model_type not in ('t5', 'mt5') or (archs and not any(a in _HF_ARCHS for a in archs)):
    raise CheckpointError(
        f'{source}: unknown architecture (model_type={model_type!r}, architectures={archs}); '
        f'supported: model_type t5/mt5 with {_HF_ARCHS}')
  proj = c.get('feed_forward_proj', 'relu')
  gated = proj.startswith('gated-')
  act_name = c.get('dense_act_fn') or proj.split('-')[-1]
  if act_name == 'gelu' and gated:
    act_name = 'gelu_new'  # HF maps 'gated-gelu' to gelu_new.
  if act_name not in _HF_ACTS:
    raise CheckpointError(f'{source}: unsupported feed_forward_proj/dense_act_fn {proj!r}/{act_name!r}')
  act = _HF_ACTS[act_name]
  n_enc = int(c['num_layers'])
  declared_tie = c.get('tie_word_embeddings', True)
  has_lm = reader is not None and 'lm_head.weight' in reader.files
  if has_lm:
    tie = declared_tie is not False and reader.same_tensor('lm_head.weight', 'shared.weight')
  else:
    if declared_tie is False and reader is not None:
      raise CheckpointError(f'{source} declares tie_word_embeddings=false but parameter '
                            f"'lm_head.weight' is missing from the weights in {reader.path!r}")
    tie = True
  if 'scale_decoder_outputs' in c:
    scale = bool(c['scale_decoder_outputs'])
  elif model_type == 'mt5' and int(str(c.get('transformers_version', '4')).split('.')[0]) >= 5:
    scale = False
  else:
    scale = declared_tie is not False
  return T5Config(
      vocab_size=int(c['vocab_size']), d_model=int(c['d_model']), d_ff=int(c['d_ff']),
      num_heads=int(c['num_heads']), d_kv=int(c['d_kv']), num_encoder_layers=n_enc,
      num_decoder_layers=int(c.get('num_decoder_layers') or n_enc),
      dropout_rate=float(c.get('dropout_rate', 0.1)),
      mlp_activations=(act, 'linear') if gated else (act,),
      tie_word_embeddings=tie, scale_logits=None if scale == tie else scale,
      relative_attention_num_buckets=int(c.get('relative_attention_num_buckets', 32)),
      relative_attention_max_distance=int(c.get('relative_attention_max_distance', 128)),
      layer_norm_epsilon=float(c.get('layer_norm_epsilon', 1e-6)))


def hf_name_map(cfg: T5Config) -> dict[str, tuple[str, bool]]:
  """{flax path: (HF tensor name, transpose)} for the base params of `cfg`."""
  m: dict[str, tuple[str, bool]] = {'token_embedder/embedding': ('shared.weight', False)}
  attn = {'query': 'q', 'key': 'k', 'value': 'v', 'out': 'o'}
  acts = cfg.mlp_activations
  wis = ['wi'] if len(acts) == 1 else [f'wi_{i}' for i in range(len(acts))]

  def mlp(prefix_flax, prefix_hf):
    for w in wis + ['wo']:
      m[f'{prefix_flax}/mlp/{w}/kernel'] = (f'{prefix_hf}.DenseReluDense.{w}.weight', True)

  for side, n in (('encoder', cfg.num_encoder_layers), ('decoder', cfg.num_decoder_layers)):
    m[f'{side}/relpos_bias/rel_embedding'] = (
        f'{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight', True)
    m[f'{side}/{side}_norm/scale'] = (f'{side}.final_layer_norm.weight', False)
    for i in range(n):
      f, h = f'{side}/layers_{i}', f'{side}.block.{i}.layer'
      if side == 'encoder':
        m[f'{f}/pre_attention_layer_norm/scale'] = (f'{h}.0.layer_norm.weight', False)
        for p, q in attn.items():
          m[f'{f}/attention/{p}/kernel'] = (f'{h}.0.SelfAttention.{q}.weight', True)
        m[f'{f}/pre_mlp_layer_norm/scale'] = (f'{h}.1.layer_norm.weight', False)
        mlp(f, f'{h}.1')
      else:
        m[f'{f}/pre_self_attention_layer_norm/scale'] = (f'{h}.0.layer_norm.weight', False)
        for p, q in attn.items():
          m[f'{f}/self_attention/{p}/kernel'] = (f'{h}.0.SelfAttention.{q}.weight', True)
        m[f'{f}/pre_cross_attention_layer_norm/scale'] = (f'{h}.1.layer_norm.weight', False)
        for p, q in attn.items():
          m[f'{f}/encoder_decoder_attention/{p}/kernel'] = (f'{h}.1.EncDecAttention.{q}.weight', True)
        m[f'{f}/pre_mlp_layer_norm/scale'] = (f'{h}.2.layer_norm.weight', False)
        mlp(f, f'{h}.2')
  if not cfg.tie_word_embeddings:
    m['decoder/logits_dense/kernel'] = ('lm_head.weight', True)
  return m


# Tensors in HF files that duplicate others (tied copies) or are buffers.
# (transformers itself ignores the never-used cross-attention relative bias some files carry.)
_HF_IGNORABLE = re.compile(r'^(encoder\.embed_tokens\.weight|decoder\.embed_tokens\.weight|'
                           r'lm_head\.weight|'
                           r'decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight)$')


class HFReader:
  """Reads base params from a HF T5 directory's safetensors files (numpy, no torch)."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, 'model.safetensors.index.json')
    single = os.path.join(path, 'model.safetensors')
    if os.path.exists(index):
      weight_map = read_json(index).get('weight_map')
      if not weight_map:
        raise CheckpointError(f'{index!r} has no weight_map')
      self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
      for f in sorted(set(self.files.values())):
        if not os.path.exists(f):
          raise CheckpointError(f'missing file {f!r} (listed in {index!r})')
    elif os.path.exists(single):
      from safetensors import safe_open
      with safe_open(single, framework='numpy') as f:
        self.files = {k: single for k in f.keys()}
    else:
      raise CheckpointError(f'missing file {single!r} (and no model.safetensors.index.json)')

  def _tensor(self, name: str) -> np.ndarray:
    """The tensor as stored; BF16 as float32 (ml_dtypes gives numpy the 'bfloat16' dtype that
    safetensors' numpy API reads BF16 into)."""
    import ml_dtypes
    from safetensors import safe_open
    with safe_open(self.files[name], framework='numpy') as f:
      x = f.get_tensor(name)
    return x.astype(np.float32) if x.dtype == ml_dtypes.bfloat16 else x

  def same_tensor(self, a: str, b: str) -> bool:
    if b not in self.files:
      return False
    x, y = self._tensor(a), self._tensor(b)
    return x.shape == y.shape and bool(np.array_equal(x, y))

  def _shape(self, name: str) -> tuple:
    from safetensors import safe_open
    with safe_open(self.files[name], framework='numpy') as f:
      return tuple(f.get_slice(name).get_shape())

  def read(self, cfg: T5Config, flat_shapes: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    names = hf_name_map(cfg)
    for flax_name, (hf_name, transpose) in names.items():
      if flax_name not in flat_shapes:
        raise CheckpointError(f'internal: model has no parameter {flax_name!r}')
      if hf_name == 'shared.weight' and hf_name not in self.files:
        hf_name = 'encoder.embed_tokens.weight'
      if hf_name not in self.files:
        raise CheckpointError(
            f'parameter {hf_name!r} (for {flax_name!r}, shape '
            f'{tuple(flat_shapes[flax_name].shape)}) is missing from the checkpoint in '
            f'{self.path!r}')
      want = tuple(flat_shapes[flax_name].shape)
      got = self._shape(hf_name)
      got_as_flax = got[::-1] if transpose else got
      _check_shape(flax_name, want, got_as_flax,
                   f'{self.files[hf_name]!r} tensor {hf_name!r} (stored {got}'
                   f'{", transposed" if transpose else ""})')
      arr = self._tensor(hf_name)
      out[flax_name] = np.ascontiguousarray(arr.T) if transpose else arr
    used = {hf for hf, _ in names.values()} | {'shared.weight'}
    unexpected = [k for k in self.files if k not in used and not _HF_IGNORABLE.match(k)]
    if unexpected:
      raise CheckpointError(f'checkpoint {self.path!r} has tensors the config does not use '
                            f'(wrong layer count or architecture?): {sorted(unexpected)[:8]}')
    if cfg.tie_word_embeddings is False and 'lm_head.weight' not in self.files:
      raise CheckpointError(f'{self.path!r}: config is untied but lm_head.weight is missing')
    return out


def main(argv) -> None:
  """`python -m sira_jax.t5.loading PATH [--tokens=1,2,3] [--max_decode_length=16]`

  Loads a checkpoint, prints the config and parameter counts, and greedily decodes the given
  token ids (e.g. from the model's SentencePiece vocabulary) as a smoke test.
  """
  from absl import flags
  from sira_jax.t5 import decoding
  from sira_jax.t5.param_count import count_parameters
  FLAGS = flags.FLAGS
  if len(argv) != 2:
    _usage_error(f'give one checkpoint PATH (got {len(argv) - 1} arguments)')
  if not all(t.strip().isdigit() for t in FLAGS.tokens):
    _usage_error(f'--tokens={",".join(FLAGS.tokens)}: give comma-separated token ids, e.g. 1,2,3')
  model, params = load_pretrained(argv[1])
  print(model.config)
  print(count_parameters(model.config).as_dict())
  if FLAGS.tokens:
    ids = jnp.asarray([[int(t) for t in FLAGS.tokens]], jnp.int32)
    out = decoding.predict_batch(model, {'params': params}, {'encoder_input_tokens': ids},
                                 max_decode_length=FLAGS.max_decode_length)
    print('decoded ids:', np.asarray(out)[0].tolist())


def _usage_error(message: str) -> None:
  print(f'error: {message}; usage: {main.__doc__.splitlines()[0]}', file=sys.stderr)
  sys.exit(2)


def cli() -> None:
  from absl import app, flags
  flags.DEFINE_list('tokens', [], 'comma-separated encoder token ids to decode greedily')
  flags.DEFINE_integer('max_decode_length', 16, 'decoded tokens at most', lower_bound=1)
  app.run(main)


if __name__ == '__main__':
  cli()
