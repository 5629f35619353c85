"""load_pretrained: HF (single/sharded safetensors), T5X (orbax, legacy msgpack+tensorstore), errors."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import sira_jax
from sira_jax import model_init
from sira_jax.adapters import AdapterConfig, trainable_mask
from sira_jax.t5 import loading
from sira_jax.t5 import saving
from sira_jax.t5.config import small_test_config
from sira_jax.t5.network import Transformer

CFG = small_test_config(num_encoder_layers=2, num_decoder_layers=1)
ENC = jnp.array([[5, 6, 7, 1, 0], [9, 3, 1, 0, 0]], jnp.int32)
TGT = jnp.array([[11, 12, 1], [13, 1, 0]], jnp.int32)
DEC = jnp.array([[0, 11, 12], [0, 13, 1]], jnp.int32)


@pytest.fixture(scope='module')
def base():
  params = nn.unbox(model_init.init_fn(Transformer(CFG))(jax.random.PRNGKey(1)))['params']
  params = jax.tree.map(np.asarray, params)
  logits = Transformer(CFG).apply({'params': params}, ENC, DEC, TGT, enable_dropout=False)
  return params, np.asarray(logits)


def _logits(model, params):
  return np.asarray(model.apply({'params': params}, ENC, DEC, TGT, enable_dropout=False))


def _assert_same_tree(a, b):
  fa, fb = (traverse_util.flatten_dict(x, sep='/') for x in (a, b))
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _rewrite_as_bf16(filename):
  """Rewrites a safetensors file with every tensor in BF16."""
  import ml_dtypes
  from safetensors import safe_open
  from safetensors.numpy import load_file, save_file
  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(filename).items()}, filename)
  with safe_open(filename, framework='numpy') as f:  # BF16 in the header, as in HF bf16 files
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {'BF16'}


@pytest.mark.parametrize('variant', ['single', 'sharded', 'bf16'])
@pytest.mark.slow
def test_hf_roundtrip_single_sharded_bf16(tmp_path, base, variant):
  params, ref = base
  saving.save_hf_safetensors(tmp_path, params, CFG,
                              max_shard_bytes=4000 if variant == 'sharded' else None)
  if variant == 'sharded':
    index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())
    assert len(set(index['weight_map'].values())) > 2
  if variant == 'bf16':
    import ml_dtypes
    _rewrite_as_bf16(str(tmp_path / 'model.safetensors'))
    params = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32), params)
  model, loaded = sira_jax.load_pretrained(tmp_path)
  assert model.config.replace(dropout_rate=0.0) == CFG.replace(dropout_rate=0.0)
  _assert_same_tree(loaded, params)
  if variant != 'bf16':
    np.testing.assert_array_equal(_logits(model, loaded), ref)


def test_hf_hub_style_flan_t5_directory(tmp_path, base):
  """A transformers-4 era Flan-T5 layout: hub config keys, duplicated embeddings, extra bias."""
  from safetensors.numpy import load_file, save_file
  params, ref = base
  saving.save_hf_safetensors(tmp_path, params, CFG)
  t = load_file(str(tmp_path / 'model.safetensors'))
  t['encoder.embed_tokens.weight'] = t['shared.weight']
  t['decoder.embed_tokens.weight'] = t['shared.weight']
  t['decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight'] = np.zeros(
      (8, 2), np.float32)
  save_file(t, str(tmp_path / 'model.safetensors'))
  hub = {'architectures': ['T5ForConditionalGeneration'], 'd_ff': 32, 'd_kv': 8, 'd_model': 16,
         'decoder_start_token_id': 0, 'dense_act_fn': 'gelu_new', 'dropout_rate': 0.1,
         'eos_token_id': 1, 'feed_forward_proj': 'gated-gelu', 'initializer_factor': 1.0,
         'is_encoder_decoder': True, 'is_gated_act': True, 'layer_norm_epsilon': 1e-06,
         'model_type': 't5', 'n_positions': 512, 'num_decoder_layers': 1, 'num_heads': 2,
         'num_layers': 2, 'output_past': True, 'pad_token_id': 0,
         'relative_attention_max_distance': 16, 'relative_attention_num_buckets': 8,
         'tie_word_embeddings': False, 'torch_dtype': 'float32',
         'transformers_version': '4.23.1', 'use_cache': True, 'vocab_size': 64}
  (tmp_path / 'config.json').write_text(json.dumps(hub))
  model, loaded = sira_jax.load_pretrained(tmp_path, dropout_rate=0.0)
  assert model.config == CFG
  np.testing.assert_array_equal(_logits(model, loaded), ref)


def test_t5x_orbax_with_fresh_adapters(tmp_path, base):
  params, ref = base
  ckpt = tmp_path / 'checkpoint_100'
  saving.save_t5x_orbax(str(ckpt), params, step=100)
  assert loading.detect_format(str(ckpt)) == 't5x'
  sira = AdapterConfig(kind='sira', num_experts=4, top_k=2)
  model, loaded = sira_jax.load_pretrained(ckpt, sira, adapter_targets=('*/query', '*/mlp/wo'),
                                           rng=3)
  assert model.config.adapter == sira and model.config.tie_word_embeddings is False
  flat = traverse_util.flatten_dict(loaded, sep='/')
  base_flat = traverse_util.flatten_dict(params, sep='/')
  mask = traverse_util.flatten_dict(trainable_mask(loaded), sep='/')
  for k, v in flat.items():
    if k in base_flat:
      np.testing.assert_array_equal(v, base_flat[k], err_msg=k)
      assert not mask[k], k
    else:
      assert k.endswith(('lora_a', 'lora_b', 'router_kernel')), k
      assert mask[k], k
  assert 'encoder/layers_1/attention/query/lora_a' in flat
  assert 'decoder/layers_0/mlp/wo/router_kernel' in flat
  assert np.abs(flat['encoder/layers_0/attention/query/lora_a']).max() > 0  # freshly initialised
  # lora_b starts at zero: the adapted model reproduces the base logits.
  np.testing.assert_allclose(_logits(model, loaded), ref, atol=1e-6)


def test_t5x_legacy_msgpack_tensorstore(tmp_path, base):
  import tensorstore as ts
  from flax import serialization
  params, ref = base
  flat = traverse_util.flatten_dict(params)
  specs = {}
  for k, v in flat.items():
    name = 'target.' + '.'.join(k)
    spec = {'driver': 'zarr', 'kvstore': {'driver': 'file', 'path': name}}
    arr = ts.open({**spec, 'kvstore': {'driver': 'file', 'path': str(tmp_path / name)}},
                  create=True, dtype=ts.float32, shape=v.shape).result()
    arr.write(np.asarray(v)).result()
    specs[k] = spec
  tree = {'optimizer': {'target': traverse_util.unflatten_dict(specs),
                        'state': {'step': np.asarray(7)}}, 'version': 3}
  (tmp_path / 'checkpoint').write_bytes(serialization.msgpack_serialize(tree))
  model, loaded = sira_jax.load_pretrained(tmp_path)
  _assert_same_tree(loaded, params)
  np.testing.assert_array_equal(_logits(model, loaded), ref)


def test_errors_name_file_parameter_and_shapes(tmp_path, base):
  params, _ = base
  with pytest.raises(loading.CheckpointError, match='does not exist'):
    sira_jax.load_pretrained(tmp_path / 'nope')
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(loading.CheckpointError, match='neither a Hugging Face'):
    sira_jax.load_pretrained(empty)
  # config.json without weights.
  (empty / 'config.json').write_text('{}')
  with pytest.raises(loading.CheckpointError, match='model.safetensors'):
    sira_jax.load_pretrained(empty)

  hf = tmp_path / 'hf'
  saving.save_hf_safetensors(hf, params, CFG)
  cfg = json.loads((hf / 'config.json').read_text())
  # Unknown architecture.
  (hf / 'config.json').write_text(json.dumps({**cfg, 'model_type': 'bart',
                                               'architectures': ['BartForConditionalGeneration']}))
  with pytest.raises(loading.CheckpointError, match=r"unknown architecture.*'bart'"):
    sira_jax.load_pretrained(hf)
  # Config and weights disagree: the message names the file, the parameter and both shapes.
  (hf / 'config.json').write_text(json.dumps({**cfg, 'd_ff': 40}))
  with pytest.raises(loading.CheckpointError) as e:
    sira_jax.load_pretrained(hf)
  msg = str(e.value)
  assert 'model.safetensors' in msg and 'encoder/layers_0/mlp/wi_0/kernel' in msg
  assert '(16, 40)' in msg and '(16, 32)' in msg and 'DenseReluDense.wi_0.weight' in msg
  # A missing tensor (config has more layers than the file).
  (hf / 'config.json').write_text(json.dumps({**cfg, 'num_layers': 3}))
  with pytest.raises(loading.CheckpointError, match=r"encoder\.block\.2\.layer\.0.*missing"):
    sira_jax.load_pretrained(hf)
  # Sharded index pointing at a file that is not there.
  (hf / 'config.json').write_text(json.dumps(cfg))
  (hf / 'model.safetensors.index.json').write_text(json.dumps(
      {'weight_map': {'shared.weight': 'model-00001-of-00002.safetensors'}}))
  with pytest.raises(loading.CheckpointError, match='missing file.*model-00001-of-00002'):
    sira_jax.load_pretrained(hf)

  # T5X: an explicit config whose shapes differ from the checkpoint.
  ckpt = tmp_path / 't5x'
  saving.save_t5x_orbax(str(ckpt), params)
  with pytest.raises(ValueError) as e:
    sira_jax.load_pretrained(ckpt, config=CFG.replace(d_model=24))
  assert 'd_model: configured 24 vs checkpoint 16' in str(e.value)
  assert str(ckpt) in str(e.value)


def test_checkpoint_architecture_wins_and_disagreement_is_an_error(tmp_path):
  """Issue 11: a tied HF T5 saved with scale_decoder_outputs=false must load unscaled."""
  cfg = CFG.replace(tie_word_embeddings=True, scale_logits=False, layer_norm_epsilon=1e-5)
  params = nn.unbox(model_init.init_fn(Transformer(cfg))(jax.random.PRNGKey(3)))['params']
  params = jax.tree.map(np.asarray, params)
  hf = tmp_path / 'hf_unscaled'
  saving.save_hf_safetensors(hf, params, cfg)
  assert json.loads((hf / 'config.json').read_text())['scale_decoder_outputs'] is False
  want = _logits(Transformer(cfg), params)
  model, loaded = sira_jax.load_pretrained(hf)
  assert model.config.logits_scaled is False and model.config.layer_norm_epsilon == 1e-5
  np.testing.assert_allclose(_logits(model, loaded), want, rtol=1e-5, atol=1e-5)
  # A config that would scale (the T5 default for tied embeddings) is refused, naming the field
  # and both values, instead of silently changing the logits.
  with pytest.raises(ValueError, match=r'scale_logits: configured True vs checkpoint False.*'
                                       r'layer_norm_epsilon: configured 1e-06 vs checkpoint 1e-05'):
    sira_jax.load_pretrained(hf, config=CFG.replace(tie_word_embeddings=True))
  with pytest.raises(ValueError, match=r"mlp_activations: configured \('relu',\) vs checkpoint "
                                       r"\('gelu', 'linear'\)"):
    sira_jax.load_pretrained(hf, config=cfg.replace(mlp_activations=('relu',)))
  # Aliases of one function are not a disagreement.
  model, _ = sira_jax.load_pretrained(hf, config=cfg.replace(mlp_activations=('gelu_new', 'linear')))
  assert model.config.architecture() == cfg.architecture()
