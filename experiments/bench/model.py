"""Model level: a T5-small-sized train step per adapter (tokens/s, compile time, memory) and
cached greedy decoding, through the project's own trainer (`sira_jax.trainer.make_train_step`).

Shapes (T5-small, the same as the earlier figures in experiments/results/BENCHMARKS.md): d_model
512, d_ff 2048 relu, 8 heads x 64, 6+6 layers, vocab 32128 tied, batch 8 x 128 inputs / 64
targets, r=4, k=2, float32, AdamW on the adapter params only.
"""
from __future__ import annotations

import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.bench import common
from sira_jax import losses, model_init, optim, trainer
from sira_jax.adapters import AdapterConfig, trainable_mask
from sira_jax.t5 import decoding
from sira_jax.t5.config import T5Config
from sira_jax.t5.network import Transformer

TARGETS = {'qkvo': ('*/query', '*/key', '*/value', '*/out'), 'qv': ('*/query', '*/value')}


def t5_small(adapter: AdapterConfig, targets: str, *, small: bool = False) -> T5Config:
  if small:  # the CI smoke: seconds, same code paths
    return T5Config(vocab_size=128, d_model=32, d_ff=64, num_heads=2, d_kv=16,
                    num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0,
                    mlp_activations=('relu',), tie_word_embeddings=True, adapter=adapter,
                    adapter_targets=TARGETS[targets])
  return T5Config(vocab_size=32128, d_model=512, d_ff=2048, num_heads=8, d_kv=64,
                  num_encoder_layers=6, num_decoder_layers=6, dropout_rate=0.0,
                  mlp_activations=('relu',), tie_word_embeddings=True, adapter=adapter,
                  adapter_targets=TARGETS[targets])


def batch(cfg: T5Config, batch_size: int, inputs: int, targets: int, seed: int = 0) -> dict:
  rs = np.random.RandomState(seed)
  enc = rs.randint(2, cfg.vocab_size, (batch_size, inputs)).astype(np.int32)
  tgt = rs.randint(2, cfg.vocab_size, (batch_size, targets)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((batch_size, 1), np.int32), tgt[:, :-1]], 1)
  return dict(encoder_input_tokens=enc, decoder_input_tokens=dec_in, decoder_target_tokens=tgt)


def init_variables(model: Transformer, seed: int = 0) -> dict:
  variables = nn.unbox(jax.jit(model_init.init_fn(model))(jax.random.PRNGKey(seed)))
  # Non-zero B, so the adapters change the output (their init is B = 0).
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.01 if 'lora_b' in jax.tree_util.keystr(p) else x, variables)


def tree_bytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


def checkpoint_bytes(state: trainer.TrainState) -> int:
  """Size of what an adapter run checkpoints (step, rng, trainable params, optimizer state) as
  an uncompressed .npz."""
  leaves = jax.tree.leaves((state.step, state.rng, state.params, state.opt_state))
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'ckpt.npz')
    np.savez(path, *[np.asarray(jax.device_get(x)) for x in leaves])
    return os.path.getsize(path)


_COMPILED: dict = {}


def train_step_variant(cfg: T5Config, b: dict):
  """(run closure, facts) for one jitted train step of `cfg` on batch `b` (compiled once per
  process: the peer comparison reuses the model part's steps)."""
  key = (cfg, tuple((k, v.shape) for k, v in sorted(b.items())))
  if key not in _COMPILED:
    _COMPILED[key] = _train_step_variant(cfg, b)
  return _COMPILED[key]


def jitted_train_step(cfg: T5Config, b: dict):
  """(jitted train step, its arguments (state, batch, total steps)) of `cfg` on batch `b`:
  AdamW on the adapter parameters, not yet traced."""
  model = Transformer(cfg)
  variables = init_variables(model)
  tx = optax.adamw(1e-4)
  state = trainer.create_state(variables, tx, trainable_mask=trainable_mask(variables['params']),
                               rng=jax.random.PRNGKey(0))
  jitted = jax.jit(trainer.make_train_step(model, tx, losses.LossConfig()))
  return jitted, (state, jax.tree.map(jnp.asarray, b), jnp.asarray(1000, jnp.int32))


def _train_step_variant(cfg: T5Config, b: dict):
  jitted, (state, b, total) = jitted_train_step(cfg, b)
  compiled, compile_s = common.timed(lambda: jitted.lower(state, b, total).compile())
  memory = compiled.memory_analysis()
  facts = dict(compile_s=compile_s, temp_bytes=getattr(memory, 'temp_size_in_bytes', None),
               trainable_params=optim.count_params(state.params),
               optimizer_state_bytes=tree_bytes(state.opt_state),
               checkpoint_bytes=checkpoint_bytes(state))
  holder = [state]

  def run():
    new_state, metrics = compiled(holder[0], b, total)
    jax.block_until_ready(metrics['loss'])
    holder[0] = new_state

  return run, facts


def decode_variant(cfg: T5Config, b: dict, steps: int):
  """(run closure, compile seconds) of cached greedy decoding of `steps` tokens (no EOS stop)."""
  model = Transformer(cfg)
  variables = init_variables(model, seed=1)
  enc = jnp.asarray(b['encoder_input_tokens'])

  def run():
    out, _ = decoding.sample_decode(model, variables, enc, max_decode_length=steps, eos_id=-1)
    jax.block_until_ready(out)

  _, compile_s = common.timed(run)
  return run, compile_s


def run_train(variants: dict[str, tuple[AdapterConfig, str]], *, small: bool, repeats: int,
              batch_size: int, inputs: int, targets: int, progress=print) -> dict:
  fns, facts = {}, {}
  for name, (adapter, targets_name) in variants.items():
    cfg = t5_small(adapter, targets_name, small=small)
    progress(f'model: {name}: compiling the train step')
    fns[name], facts[name] = train_step_variant(cfg, batch(cfg, batch_size, inputs, targets))
  progress(f'model: timing {len(fns)} train steps x {repeats}')
  timing = common.interleaved(fns, repeats)
  tokens = batch_size * (inputs + targets)
  rows = {}
  for name in variants:
    rows[name] = dict(facts[name], median_s=timing[name]['median_s'],
                      tokens_per_s=tokens / timing[name]['median_s'])
  return dict(rows=rows, load=timing['_load'], tokens_per_step=tokens)


def run_decode(variants: dict[str, tuple[AdapterConfig, str]], *, small: bool, repeats: int,
               batch_size: int, inputs: int, steps: int, progress=print) -> dict:
  fns, compile_s = {}, {}
  for name, (adapter, targets_name) in variants.items():
    cfg = t5_small(adapter, targets_name, small=small)
    progress(f'decode: {name}: compiling')
    fns[name], compile_s[name] = decode_variant(cfg, batch(cfg, batch_size, inputs, 2), steps)
  progress(f'decode: timing {len(fns)} x {repeats}')
  timing = common.interleaved(fns, repeats)
  return dict(rows={n: dict(median_s=timing[n]['median_s'], first_call_s=compile_s[n])
                    for n in variants}, load=timing['_load'], steps=steps, batch=batch_size)
