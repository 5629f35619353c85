"""Statistics of a run's routing analysis (`experiments.evaluation.routing_analysis`, stored in its
result file): the current layout of older files (`routing_view`), the specialisation of experts to
task families and languages as normalised mutual information per adapted site
(`specialisation`), the load imbalance per site, the most specialised sites, and the NMI
thresholds c7's verdict uses."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

import tasks as tasks_lib

# c7's verdict (`report.claim_verdict`) on the largest NMI(expert; family or language) over the
# adapted sites: specialised at or above SPECIALISED_NMI, not at or below UNSPECIALISED_NMI.
SPECIALISED_NMI = 0.10
UNSPECIALISED_NMI = 0.02


# The dropped fraction result files before the training-batch analysis hold: training mode on
# shuffled, padded evaluation batches. Shown under this label, apart from the training-batch one.
OLD_DROP_LABEL = 'dropped (train mode on padded eval batches: old measurement)'


def routing_view(routing: Mapping) -> dict[str, Any]:
  """A result's routing analysis in the current layout (`experiments.evaluation.routing_analysis`:
  'sites', 'tasks', 'num_experts', 'eval', 'train_batches'). An older file (eval statistics and
  'usage' at the top, 'router_confidence' for the gate mass, 'dropped_fraction_train') maps to
  'eval', and its drops to 'old_train_mode_on_eval_batches' (`OLD_DROP_LABEL`), never to
  'train_batches'."""
  if 'eval' in routing:
    return dict(routing)
  ev = dict(mode='eval', usage=routing['usage'], summary={})
  for old, new in (('gate_entropy', 'gate_entropy'), ('router_confidence', 'gate_mass')):
    if old in routing:
      ev[new] = routing[old]
      ev['summary'][new] = float(np.mean(list(routing[old].values())))
  out = {k: routing[k] for k in ('sites', 'tasks', 'num_experts') if k in routing}
  out['eval'] = ev
  if 'dropped_fraction_train' in routing:
    out['old_train_mode_on_eval_batches'] = dict(dropped_fraction=routing['dropped_fraction_train'])
  return out


def specialisation(routing: Mapping) -> dict[str, dict[str, float]]:
  """Normalised mutual information between routed expert and task family / language, per site.

  I(G; X) / H(X) for a uniform choice of task within the group, X the expert a routed choice goes
  to (shares from `usage`); 0 when every group routes alike, 1 when the expert identifies the group.
  """
  routing = routing_view(routing)
  usage = routing['eval']['usage']
  out: dict[str, dict[str, float]] = {'family': {}, 'language': {}}
  tasks = routing['tasks']
  for kind, idx in (('family', 0), ('language', 1)):
    groups: dict[str, list[str]] = {}
    for t in tasks:
      groups.setdefault(tasks_lib.family_and_language(t)[idx], []).append(t)
    if len(groups) < 2:
      continue
    for site in routing['sites']:
      rows = np.array([np.mean([usage[t][site] for t in g], axis=0)
                       for g in groups.values()])  # [groups, E]
      px = rows.mean(0)
      h = lambda p: -float(np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-30)), 0.0)))  # noqa
      hx = h(px)
      mi = hx - float(np.mean([h(r) for r in rows]))
      out[kind][site] = mi / hx if hx > 0 else 0.0
  return out


def load_imbalance(routing: Mapping) -> dict[str, float]:
  """Per site: KL(evaluation load over all tasks || uniform) in nats (0 at balance, log E when
  one expert takes everything)."""
  routing = routing_view(routing)
  usage, out = routing['eval']['usage'], {}
  for site in routing['sites']:
    load = np.mean([usage[t][site] for t in routing['tasks']], axis=0)
    load = load / max(float(load.sum()), 1e-12)
    out[site] = float(np.sum(np.where(load > 0, load * np.log(
        np.maximum(load, 1e-30) * len(load)), 0.0)))
  return out


def nmi_defined(spec: Mapping) -> bool:
  """Whether `specialisation` measured any site (the routed tasks span 2+ families or languages)."""
  return any(spec.get(k) for k in ('family', 'language'))


def most_specialised_sites(routing: Mapping, spec: Mapping, n: int = 4) -> list[str]:
  """The `n` sites of the largest NMI(expert; family or language); where NMI is undefined (one
  family and one language, e.g. one task), the `n` of the most uneven load (`load_imbalance`)."""
  sites = list(routing_view(routing)['sites'])
  if nmi_defined(spec):
    score = {s_: max([spec[k].get(s_, 0.0) for k in ('family', 'language')]) for s_ in sites}
  else:
    score = load_imbalance(routing)
  return sorted(sites, key=lambda s_: -score[s_])[:n]
