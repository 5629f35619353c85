"""Cost model of the expert-computation forms: FLOPs and bytes per device per training step.

For one adapted projection (a `Site`: tokens per step, d_in, d_out, r, E, k, capacity factor,
group size) on a `MeshShape` (data x expert x model), `form_cost` gives, per device and per step
(forward + backward, the input gradient included because adapters sit inside a network):

  * `flops`: multiply-adds x 2 of the adapter's own work (router + experts + dispatch/combine);
    the frozen base projection is the same for every form and is left out.
  * `local_bytes`: bytes the form moves through memory beyond its matmuls (gathers/scatters of
    token rows); 0 for matmul-only forms.
  * `collectives`: {op: (count, result bytes)} as XLA writes them in compiled HLO, checked against
    compiled CPU-mesh programs in tests/test_cost_model.py (`hlo_collectives`).
  * `link_bytes`: bytes each device sends over the interconnect for those collectives (ring
    all-reduce 2(n-1)/n of the buffer, all-gather and all-to-all (n-1)/n).

Forms (`sira_jax.experts`):
  dense    every expert's rank-r columns for every token (a LoRA of rank E*r), gated; expert
           weights used replicated: on an expert-sharded mesh XLA all-gathers A and B (E*r*(d_in
           + d_out) values) and all-reduces their gradients over all devices.
  gather   tokens gathered into capacity buffers [G, E, C, d] by index, per-expert matmuls,
           combined by gathering each token's k outputs: flat in E; weights replicated as dense.
  einsum   one-hot dispatch/combine einsums ([G, T, E, C] masks, cost grows with T) and, on an
           expert axis of size X > 1, expert parallelism: 4 all-to-alls of the local [G_l, E, C, d]
           buffers (forward in/out, backward both), weights stay sharded (E/X per device) and only
           their gradients are all-reduced over 'data'.

Tokens are split over the batch mesh axes (data x expert); 'model' splits d_out of expert B
weights and is ignored here (the adapter weights are tiny). `choose_form` turns costs into a
roofline time with a `Hardware` profile and picks the cheapest form; on one device the measured
CPU crossover (`experiments/bench`) decides between the two local forms.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

from sira_jax import routing

FORMS = ('dense', 'gather', 'einsum')
_DTYPE_BYTES = {'f32': 4, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'pred': 1, 's8': 1, 'u8': 1,
                'f64': 8, 's64': 8}
COLLECTIVES = ('all-to-all', 'all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute')


@dataclasses.dataclass(frozen=True)
class Site:
  """One adapted projection: `tokens` global tokens per step through [d_in] -> [d_out].

  `group_size` is the adapter's `max_group_size`; the group layout on a mesh is `grouping`'s."""
  tokens: int
  d_in: int
  d_out: int
  rank: int = 4
  num_experts: int = 8
  top_k: int = 2
  capacity_factor: float | None = 1.25
  group_size: int = 1024
  min_capacity: int = 4
  dtype_bytes: int = 4


@dataclasses.dataclass(frozen=True)
class MeshShape:
  data: int = 1
  expert: int = 1
  model: int = 1

  @property
  def devices(self) -> int:
    return self.data * self.expert * self.model


@dataclasses.dataclass(frozen=True)
class Cost:
  flops: float
  local_bytes: float
  link_bytes: float
  collectives: Mapping[str, tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class Hardware:
  """Roofline constants (assumptions, per device): FLOP/s, memory B/s, interconnect B/s."""
  name: str
  flops_per_s: float
  memory_bytes_per_s: float
  link_bytes_per_s: float


# Round public figures, for the README table only: a TPU-v4-class chip (bf16 matmuls, HBM, one
# ICI link's worth of bandwidth per collective) and this project's 2-core CPU (measured order).
ACCELERATOR = Hardware('accelerator (TPU-v4-class)', 2.0e14, 1.2e12, 4.5e10)
CPU_2CORE = Hardware('2-core CPU', 5.0e10, 5.0e9, 5.0e9)


def grouping(site: Site, mesh: MeshShape) -> tuple[int, int, int]:
  """(G groups per step, T tokens per group, C capacity) as `AdaptedDense` computes them on
  `mesh`: G a multiple of the batch shards (data x expert) the tokens split into
  (`routing.group_layout`), so T may be below `site.group_size`."""
  shards = routing.group_shards(site.tokens, (mesh.data, mesh.expert))
  g, t = routing.group_layout(site.tokens, site.group_size, shards)
  c = routing.expert_capacity(t, site.num_experts, site.top_k, site.capacity_factor,
                              site.min_capacity)
  return g, t, c


def form_cost(form: str, site: Site, mesh: MeshShape) -> Cost:
  """Per-device cost of one training step (forward + backward) of `site` in `form`."""
  if form not in FORMS:
    raise ValueError(f'unknown form {form!r}; use one of {FORMS}')
  e, r, k, b = site.num_experts, site.rank, site.top_k, site.dtype_bytes
  d_in, d_out = site.d_in, site.d_out
  batch_devices = mesh.data * mesh.expert
  x = mesh.expert
  g, t, c = grouping(site, mesh)
  n = g * t / batch_devices                  # token positions per device (padding included)
  g_local = g / batch_devices                # groups per device
  router_flops = 3 * 2 * n * d_in * e        # forward, input grad, weight grad
  weights = e * r * (d_in + d_out)
  router_bytes = d_in * e * 4                # float32 router, grads all-reduced over all devices
  collectives: dict[str, tuple[int, int]] = {}
  link = 0.0

  def add(op, count, nbytes, link_factor):
    nonlocal link
    old_count, old_bytes = collectives.get(op, (0, 0))
    collectives[op] = (old_count + count, old_bytes + int(count * nbytes))
    link += count * nbytes * link_factor

  devices = mesh.devices
  if form in ('dense', 'gather'):
    if form == 'dense':
      flops = router_flops + 3 * 2 * n * e * r * (d_in + d_out)
      local = 0.0
    else:
      rows = g_local * e * c                 # buffer rows per device (k*cf*n up to rounding)
      flops = router_flops + 3 * 2 * rows * r * (d_in + d_out)
      # forward: gather rows of x, gather k outputs per token; backward: the two scatters.
      local = 2 * (rows * d_in + n * k * d_out) * b
    if devices > 1:
      if x > 1:  # weights sharded over 'expert', used whole: A and B gathered
        add('all-gather', 1, e * r * d_in * b, (x - 1) / x)
        add('all-gather', 1, e * r * d_out * b, (x - 1) / x)
      # full weight and router gradients, one combined all-reduce over every device
      add('all-reduce', 1, (weights * b + router_bytes), 2 * (devices - 1) / devices)
  else:  # einsum
    flops = (router_flops + 3 * 2 * n * e * c * (d_in + d_out)      # dispatch, combine
             + 3 * 2 * g_local * e * c * r * (d_in + d_out))        # experts
    local = 0.0
    if x > 1:
      buf_in = g_local * e * c * d_in * b
      buf_out = g_local * e * c * d_out * b
      add('all-to-all', 2, buf_in, (x - 1) / x)
      add('all-to-all', 2, buf_out, (x - 1) / x)
    if devices > 1:
      if mesh.data > 1:
        add('all-reduce', 1, weights / x * b, 2 * (mesh.data - 1) / mesh.data)
      add('all-reduce', 1, router_bytes, 2 * (devices - 1) / devices)
  return Cost(flops=flops, local_bytes=local, link_bytes=link, collectives=collectives)


def step_seconds(cost: Cost, hardware: Hardware) -> float:
  """Roofline estimate: compute, memory traffic and communication, not overlapped."""
  return (cost.flops / hardware.flops_per_s + cost.local_bytes / hardware.memory_bytes_per_s +
          cost.link_bytes / hardware.link_bytes_per_s)


# Measured on the project's 2-core CPU (experiments/bench, one 512x512 projection, fwd+bwd,
# 8192 tokens, groups of 256 and 1024, r=4): dense/LoRA 1.7-1.9 vs gather 2.3-2.4 at E*r = 128,
# 2.6-3.0 vs 2.1-2.5 at E*r = 256. The dense form up to this many columns E*r, gather above.
CPU_DENSE_MAX_COLUMNS = 128


def choose_form(site: Site, mesh: MeshShape = MeshShape(), backend: str = 'cpu',
                hardware: Hardware = ACCELERATOR) -> str:
  """The default expert form for `site` on `mesh`.

  One device or no expert axis: the faster local form by measurement on CPU (dense up to
  `CPU_DENSE_MAX_COLUMNS` = E*r columns, gather above); on other backends by the roofline.
  An expert axis X > 1: the cheapest of all forms by the roofline (`step_seconds`).
  """
  local = ('dense', 'gather')
  if site.top_k >= site.num_experts:  # a dense mixture (MoLoRA): every expert for every token
    local = ('dense',)
  if mesh.expert == 1 and backend == 'cpu' and len(local) > 1:
    return 'dense' if site.num_experts * site.rank <= CPU_DENSE_MAX_COLUMNS else 'gather'
  candidates = local if mesh.expert == 1 else local + ('einsum',)
  return min(candidates, key=lambda f: step_seconds(form_cost(f, site, mesh), hardware))


_OP_LINE = re.compile(r'=\s*(\(?[^=]*?\)?)\s+(' + '|'.join(COLLECTIVES) + r')(?:-start)?\(')
_SHAPE = re.compile(r'\b(' + '|'.join(_DTYPE_BYTES) + r')\[([0-9,]*)\]')


def hlo_collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
  """{op: (count, total result bytes)} of the collectives in compiled HLO text (per device)."""
  out: dict[str, tuple[int, int]] = {}
  for line in hlo_text.splitlines():
    m = _OP_LINE.search(line)
    if not m:
      continue
    nbytes = sum(_DTYPE_BYTES[dt] * math.prod(int(s) for s in dims.split(',') if s)
                 for dt, dims in _SHAPE.findall(m.group(1)))
    count, total = out.get(m.group(2), (0, 0))
    out[m.group(2)] = (count + 1, total + nbytes)
  return out
