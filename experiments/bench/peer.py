"""The Hugging Face PEFT peer: PyTorch T5 with PEFT LoRA on the same shapes as `model.py`.

Same config (d_model 512, d_ff 2048 relu, 8 x 64 heads, 6+6 layers, vocab 32128 tied, float32),
same batch (8 x 128 / 64 random tokens), LoRA r=4 on q/k/v/o (or q/v), AdamW on the LoRA
params, torch's CPU threads set to the number of cores jax uses. One step = forward with labels,
backward, optimizer step, zero_grad. Requirements: experiments/bench/requirements.txt.
"""
from __future__ import annotations

import os


def available() -> str | None:
  """None when torch, transformers and peft import; else the reason."""
  try:
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    return f'{e} (pip install -r experiments/bench/requirements.txt)'
  return None


def peft_step(targets: str, *, small: bool, batch_size: int, inputs: int, target_len: int,
              threads: int | None = None):
  """(run closure, facts) for one PEFT LoRA train step."""
  import numpy as np
  import peft
  import torch
  import transformers

  torch.set_num_threads(threads or os.cpu_count() or 1)
  torch.manual_seed(0)
  if small:
    config = transformers.T5Config(vocab_size=128, d_model=32, d_ff=64, num_heads=2, d_kv=16,
                                   num_layers=1, num_decoder_layers=1, dropout_rate=0.0,
                                   feed_forward_proj='relu', tie_word_embeddings=True,
                                   decoder_start_token_id=0, pad_token_id=0)
  else:
    config = transformers.T5Config(vocab_size=32128, d_model=512, d_ff=2048, num_heads=8,
                                   d_kv=64, num_layers=6, num_decoder_layers=6,
                                   dropout_rate=0.0, feed_forward_proj='relu',
                                   tie_word_embeddings=True, decoder_start_token_id=0,
                                   pad_token_id=0)
  model = transformers.T5ForConditionalGeneration(config)
  modules = ['q', 'k', 'v', 'o'] if targets == 'qkvo' else ['q', 'v']
  model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=4, lora_dropout=0.0,
                                                     target_modules=modules))
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=1e-4)
  rs = np.random.RandomState(0)
  enc = torch.from_numpy(rs.randint(2, config.vocab_size, (batch_size, inputs)))
  labels = torch.from_numpy(rs.randint(2, config.vocab_size, (batch_size, target_len)))

  def run():
    out = model(input_ids=enc, labels=labels)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

  facts = dict(trainable_params=int(sum(p.numel() for p in params)),
               torch=torch.__version__, transformers=transformers.__version__,
               peft=peft.__version__, threads=torch.get_num_threads())
  return run, facts
