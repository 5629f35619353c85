"""Model level: where SiRA's extra train-step time goes, as a differential profile.

The T5-small train step of `experiments.bench.model` (q/k/v/o, SiRA E=8 k=2 r=4, the dense form
`auto` picks there) is compiled several times, each time with one part of the routing replaced
by a trivial stand-in while the model is traced; the step-time difference to the full SiRA step is
what that part costs at model level. All variants are timed in one interleaved run, so their
differences share the load. The stand-ins change what the model computes (they are profiling
probes, never a model to train):

  - stats: `routing.routing_statistics` returns zeros (no aux/z losses, no usage, entropy...).
  - slots: `routing.assign_slots` gives every active choice slot 0 (no capacity accounting).
  - top-k: `routing.top_k` takes experts 0..k-1 (no sort).
  - routing: all three at once: what is left is the fused router + A matmul, the softmax and
    the gating of the E*r columns.

LoRA at rank 4 and at rank E*r = 32 bracket the cost of the wider low-rank matmuls alone.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import jax.numpy as jnp

from experiments.bench import common, model
from sira_jax import routing
from sira_jax.adapters import AdapterConfig


def _zero_statistics(logits, probs, instructions, token_mask):
  del logits, token_mask
  zero = jnp.zeros((), jnp.float32)
  return dict(aux_loss=zero, router_z_loss=zero, dropped_fraction=zero,
              expert_usage=jnp.zeros(probs.shape[-1], jnp.float32), gate_entropy=zero,
              router_confidence=jnp.sum(instructions.weight) * 0.0)


def _slot_zero(expert_index, active, num_experts, capacity, priority_order=None):
  del expert_index, num_experts, capacity, priority_order
  return jnp.where(active, 0, -1).astype(jnp.int32)


def _first_k(probs, k):
  index = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), probs.shape[:-1] + (k,))
  return probs[..., :k], index


STUBS = {
    'stats': {'routing_statistics': _zero_statistics},
    'slots': {'assign_slots': _slot_zero},
    'top-k': {'top_k': _first_k},
}
STUBS['routing'] = {k: v for stub in STUBS.values() for k, v in stub.items()}


@contextlib.contextmanager
def stubbed(names: dict):
  """Replaces `sira_jax.routing` functions while a model is traced."""
  with contextlib.ExitStack() as stack:
    for attr, fn in names.items():
      stack.enter_context(mock.patch.object(routing, attr, fn))
    yield


def run(*, small: bool, repeats: int, batch_size: int, inputs: int, targets: int,
        num_experts: int = 8, progress=print) -> dict:
  """Times LoRA r4, LoRA r=E*4, SiRA and SiRA with each stand-in; rows carry `minus_s`, the time
  a stand-in saves against the full SiRA step."""
  sira = AdapterConfig(kind='sira', rank=4, num_experts=num_experts, top_k=2)
  variants = {'lora r4': (AdapterConfig(kind='lora', rank=4), {}),
              f'lora r{4 * num_experts}': (AdapterConfig(kind='lora', rank=4 * num_experts), {}),
              f'sira E={num_experts}': (sira, {})}
  variants.update({f'sira E={num_experts} without {n}': (sira, s) for n, s in STUBS.items()})
  fns, facts = {}, {}
  for name, (adapter, stubs) in variants.items():
    cfg = model.t5_small(adapter, 'qkvo', small=small)
    progress(f'profile: {name}: compiling the train step')
    with stubbed(stubs):  # Traced (and compiled) inside: the stand-ins are baked in.
      fns[name], facts[name] = model._train_step_variant(
          cfg, model.batch(cfg, batch_size, inputs, targets))
  progress(f'profile: timing {len(fns)} train steps x {repeats}')
  timing = common.interleaved(fns, repeats)
  full = timing[f'sira E={num_experts}']['median_s']
  lora = timing['lora r4']['median_s']
  rows = {n: dict(median_s=timing[n]['median_s'], compile_s=facts[n]['compile_s'],
                  over_lora_s=timing[n]['median_s'] - lora,
                  minus_s=full - timing[n]['median_s'])
          for n in variants}
  return dict(rows=rows, load=timing['_load'], sira=f'sira E={num_experts}')


def markdown(res: dict) -> list[str]:
  rows, sira = res['rows'], res['sira']
  gap = rows[sira]['over_lora_s']
  out = [f'load {res["load"]["before"][0]}-{res["load"]["after"][0]}; SiRA step - LoRA r4 step = '
         f'{1e3 * gap:.0f} ms.', '',
         '| variant | step ms | / LoRA r4 | saved vs SiRA, ms | share of the SiRA-LoRA gap | '
         'compile s |', '|---|---|---|---|---|---|']
  lora = rows['lora r4']['median_s']
  for name, r in rows.items():
    share = (f'{100 * r["minus_s"] / gap:.0f}%' if name.startswith(sira + ' without') and gap > 0
             else '')
    saved = f'{1e3 * r["minus_s"]:.0f}' if name.startswith(sira + ' without') else ''
    out.append(f'| {name} | {1e3 * r["median_s"]:.0f} | {r["median_s"] / lora:.2f} | {saved} | '
               f'{share} | {r["compile_s"]:.1f} |')
  return out
