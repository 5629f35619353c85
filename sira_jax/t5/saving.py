"""Write T5-family base params as a T5X orbax checkpoint or a Hugging Face directory: what
`t5.loading` reads (export, and test fixtures of both formats)."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from sira_jax.t5 import scan_layout
from sira_jax.t5.config import T5Config
from sira_jax.t5.loading import hf_name_map


def save_t5x_orbax(path: str, params: Mapping[str, Any], *, config: T5Config | None = None,
                   step: int = 0) -> None:
  """Writes `{'target': params, 'state': {'step': step}}` as an orbax checkpoint (T5X layout)."""
  import orbax.checkpoint as ocp
  params = scan_layout.to_layout(nn.unbox(dict(params)), scanned=False)  # T5X's layer names
  tree = {'target': jax.tree.map(np.asarray, params),
          'state': {'step': np.asarray(step, np.int64)}}
  ocp.PyTreeCheckpointer().save(os.path.abspath(path), tree)
  if config is not None:
    cfg = {k: getattr(config, k) for k in ('vocab_size', 'd_model', 'd_ff', 'num_heads', 'd_kv',
                                           'num_encoder_layers', 'num_decoder_layers',
                                           'mlp_activations', 'tie_word_embeddings',
                                           'relative_attention_num_buckets',
                                           'relative_attention_max_distance',
                                           'layer_norm_epsilon')}
    cfg['scale_logits'] = config.logits_scaled
    with open(os.path.join(path, 'config.json'), 'w') as f:
      json.dump(cfg, f, indent=1)


def save_hf_safetensors(path: str, params: Mapping[str, Any], config: T5Config, *,
                        max_shard_bytes: int | None = None) -> None:
  """Writes base params as a Hugging Face T5 directory (config.json + safetensors).

  Adapter params are not written (merge LoRA first with `adapters.merged_kernel` if wanted).
  `max_shard_bytes` splits the weights into `model-0000i-of-0000n.safetensors` files with a
  `model.safetensors.index.json`, like transformers' sharded checkpoints.
  """
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  flat = traverse_util.flatten_dict(
      scan_layout.to_layout(nn.unbox(dict(params)), scanned=False), sep='/')
  tensors = {}
  for flax_name, (hf_name, transpose) in hf_name_map(config).items():
    arr = np.asarray(flat[flax_name], np.float32)
    tensors[hf_name] = np.ascontiguousarray(arr.T if transpose else arr)
  gated = len(config.mlp_activations) > 1
  act = {'gelu': 'gelu_new', 'gelu_new': 'gelu_new', 'gelu_tanh': 'gelu_new',
         'gelu_exact': 'gelu', 'relu': 'relu', 'silu': 'silu', 'swish': 'silu'}[
             config.mlp_activations[0]]
  hf_cfg = {
      'architectures': ['T5ForConditionalGeneration'], 'model_type': 't5',
      'vocab_size': config.vocab_size, 'd_model': config.d_model, 'd_ff': config.d_ff,
      'd_kv': config.d_kv, 'num_heads': config.num_heads, 'num_layers': config.num_encoder_layers,
      'num_decoder_layers': config.num_decoder_layers, 'dropout_rate': config.dropout_rate,
      'feed_forward_proj': (f'gated-{act}' if gated else act), 'dense_act_fn': act,
      'is_gated_act': gated, 'tie_word_embeddings': config.tie_word_embeddings,
      'scale_decoder_outputs': config.logits_scaled,
      'relative_attention_num_buckets': config.relative_attention_num_buckets,
      'relative_attention_max_distance': config.relative_attention_max_distance,
      'layer_norm_epsilon': config.layer_norm_epsilon, 'decoder_start_token_id': 0,
      'eos_token_id': 1, 'pad_token_id': 0, 'is_encoder_decoder': True}
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf_cfg, f, indent=2)
  if not max_shard_bytes:
    save_file(tensors, os.path.join(path, 'model.safetensors'))
    return
  shards, cur, size = [], {}, 0
  for name, arr in tensors.items():
    if cur and size + arr.nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[name] = arr
    size += arr.nbytes
  shards.append(cur)
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    save_file(shard, os.path.join(path, fname))
    weight_map.update({k: fname for k in shard})
  with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': sum(a.nbytes for a in tensors.values())},
               'weight_map': weight_map}, f, indent=2)
