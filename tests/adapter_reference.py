"""A plain per-token numpy (float64) reference of the routed adapters.

Written independently of sira_jax.routing: loops over groups, choice levels and
tokens in priority order, counting each expert's slots.
"""

import math

import numpy as np


def softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def group_layout(n, max_group_size):
  """G groups of T tokens; the last G * T - n positions are padding."""
  g = math.ceil(n / max_group_size)
  return g, math.ceil(n / g)


def top_k_indices(p, k):
  """Largest first; ties go to the lower index (like lax.top_k)."""
  return sorted(range(len(p)), key=lambda e: (-p[e], e))[:k]


def capacity(count, group_size, num_experts, top_k, capacity_factor,
             min_capacity):
  """Slots per expert for `count` counted tokens in a group of group_size."""
  if capacity_factor is None:
    return group_size
  return min(group_size, max(min_capacity,
                             math.ceil(top_k * capacity_factor * count / num_experts)))


def routed_reference(x, mask, params, *, num_experts, top_k, capacity_factor,
                     min_capacity, max_group_size, scale, renormalize=False,
                     batch_prioritized=False, capacity_counts='real_tokens'):
  """Returns (y [..., d_out], info) for sira (top_k < E) or molora (top_k = E).

  params: kernel [d_in, d_out], lora_a [E, r, d_in], lora_b [E, r, d_out],
  router_kernel [d_in, E]. capacity_factor None: no drops. capacity_counts:
  'real_tokens' counts a group's capacity over its unmasked tokens, 'positions'
  over all its positions (padding included).
  info: per-token kept expert lists, dropped fraction, usage, the capacity of
  each group, and kept[g][e]: tokens expert e kept in group g.
  """
  x = np.asarray(x, np.float64)
  lead, d_in = x.shape[:-1], x.shape[-1]
  xs = x.reshape(-1, d_in)
  ms = np.asarray(mask, bool).reshape(-1)
  w = np.asarray(params['kernel'], np.float64)
  a = np.asarray(params['lora_a'], np.float64)
  b = np.asarray(params['lora_b'], np.float64)
  router = np.asarray(params['router_kernel'], np.float64)
  n = xs.shape[0]
  g, t = group_layout(n, max_group_size)
  y = xs @ w
  kept = [[] for _ in range(n)]
  dropped = active = 0
  usage = np.zeros(num_experts)
  caps, kept_per_expert = [], []
  for gi in range(g):
    idx = list(range(gi * t, min((gi + 1) * t, n)))  # past n: padding
    counted = t if capacity_counts == 'positions' else int(ms[idx].sum())
    cap = capacity(counted, t, num_experts, top_k, capacity_factor, min_capacity)
    caps.append(cap)
    probs = {i: softmax(xs[i] @ router) for i in idx}
    choices = {i: top_k_indices(probs[i], top_k) for i in idx}
    gates = {}
    for i in idx:
      gv = np.array([probs[i][e] for e in choices[i]])
      if renormalize:
        gv = gv / gv.sum()
      gates[i] = gv
    order = idx
    if batch_prioritized:
      order = sorted(idx, key=lambda i: (-(probs[i][choices[i][0]]
                                           if ms[i] else -1.0), i))
    count = np.zeros(num_experts, int)
    for j in range(top_k):
      for i in order:
        if not ms[i]:
          continue
        active += 1
        e = choices[i][j]
        if count[e] < cap:
          count[e] += 1
          usage[e] += 1
          kept[i].append((e, gates[i][j]))
        else:
          dropped += 1
    kept_per_expert.append(count)
  for i in range(n):
    for e, gate in kept[i]:
      y[i] += scale * gate * ((xs[i] @ a[e].T) @ b[e])
  info = dict(kept=kept, dropped_fraction=dropped / max(active, 1),
              expert_usage=usage / max(active, 1), capacity=caps,
              kept_per_expert=np.array(kept_per_expert))
  return y.reshape(lead + (w.shape[1],)), info
