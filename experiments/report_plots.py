"""The report's figures (PNG, matplotlib's Agg backend): a sweep's metric against a numeric axis
(`plot_axis`) and per task family or language (`plot_groups`), one point's checkpoint-selection
curves (`plot_validation_curves`) and one run's routing (`plot_routing`). Each takes the
aggregated numbers `experiments.report` computes and the metric's display name, writes one file and
returns the data it plotted."""
from __future__ import annotations

from typing import Mapping

import numpy as np

import tasks as tasks_lib
from experiments import routing_stats
from experiments import sweeps as sweeps_lib


def _plt():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_axis(agg, sweep, x_axis, series, metric, label, path) -> dict | None:
  """The metric (display name `label`) against the numeric axis `x_axis`, one line per value of
  `series`, mean +- sd over seeds. Returns {series value: [[x, mean, sd], ...]}; None when no point
  has the axis."""
  pts = {p: e for p, e in agg['points'].items() if x_axis in e['axes']}
  if not pts:
    return None
  plt = _plt()
  data: dict[str, list] = {}
  for p, e in pts.items():
    data.setdefault(str(e['axes'].get(series, '')), []).append(
        (e['axes'][x_axis], e['mean'].get(metric), e['std'].get(metric), p))
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for s, rows in sorted(data.items()):
    rows.sort(key=lambda r: r[0])
    xs = [r[0] for r in rows]
    ax.errorbar(range(len(xs)) if not all(isinstance(x, (int, float)) for x in xs) else xs,
                [r[1] for r in rows], yerr=[r[2] for r in rows], marker='o', capsize=3, label=s)
  if all(isinstance(e['axes'][x_axis], (int, float)) and e['axes'][x_axis] > 0
         for e in pts.values()) and x_axis in ('rank', 'experts'):
    ax.set_xscale('log', base=2)
  ax.set_xlabel(x_axis)
  ax.set_ylabel(f'{sweep.report_split} {label}')
  ax.set_title(f'{sweep.name}: {label} vs {x_axis} (mean +- sd over seeds)',
               fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return {s: [[r[0], r[1], r[2]] for r in rows] for s, rows in data.items()}


def plot_groups(agg, sweep, metric, label, idx, path) -> dict | None:
  """Bars of the metric (display name `label`) per task family (idx 0) or language (idx 1), one
  bar per point. Returns {group: {point: mean}}; None without points."""
  pts = agg['points']
  if not pts:
    return None
  groups: dict[str, dict[str, float]] = {}
  for p, e in pts.items():
    per: dict[str, list] = {}
    for t, m in e['per_task'].items():
      if metric in m:
        per.setdefault(tasks_lib.family_and_language(t)[idx], []).append(m[metric])
    for g, v in per.items():
      groups.setdefault(g, {})[p] = float(np.mean(v))
  if not groups:
    return None
  plt = _plt()
  names = sorted(groups)
  width = 0.8 / max(len(pts), 1)
  fig, ax = plt.subplots(figsize=(max(5.5, 0.5 * len(names) * len(pts) ** 0.5 + 2), 3.6))
  for i, p in enumerate(pts):
    ax.bar(np.arange(len(names)) + i * width, [groups[g].get(p, np.nan) for g in names],
           width, label=p)
  ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha='right',
                fontsize=8)
  ax.set_ylabel(f'{sweep.report_split} {label}')
  ax.set_title(f'{sweep.name}: per {"family" if idx == 0 else "language"} (mean over seeds)',
               fontsize=9)
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return groups


def plot_validation_curves(sweep: sweeps_lib.Sweep, point: str, e: Mapping, label: str,
                           path: str) -> dict[str, list[list[float]]]:
  """One point's checkpoint-selection curves (`report.checkpoint_choices`): the select split's
  metric (display name `label`) against the training step, one line per seed, its chosen step
  ringed. Returns {seed: [[step, score], ...]} as plotted."""
  plt = _plt()
  sel = e['checkpoint_selection']
  data = {}
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for seed, curve, chosen in zip(e['seeds'], sel['curves'], sel['chosen_step']):
    if not curve:
      continue
    steps = sorted(curve)
    line, = ax.plot(steps, [curve[s_] for s_ in steps], marker='.', label=f'seed {seed}')
    ax.plot([chosen], [curve[chosen]], marker='o', ms=10, mfc='none', color=line.get_color())
    data[str(seed)] = [[s_, curve[s_]] for s_ in steps]
  ax.set_xlabel('training step')
  ax.set_ylabel(f'{sel["split"]} {label}')
  lr = '' if e['learning_rate'] is None else f', LR {e["learning_rate"]:g}'
  ax.set_title(f'{sweep.name} / {point}{lr}: checkpoint selection (ringed: chosen)', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return data


def plot_routing(routing, spec, title, path, num_heatmaps: int = 4) -> list[str]:
  """NMI(expert; family) and NMI(expert; language) per adapted site as bars (where NMI is
  undefined, one task: the load imbalance per site), and the expert load per task (evaluation
  mode) of the `num_heatmaps` most specialised sites (`most_specialised_sites`) as heatmaps.
  Returns those sites."""
  plt = _plt()
  routing = routing_stats.routing_view(routing)
  sites = routing['sites']
  shown = routing_stats.most_specialised_sites(routing, spec, num_heatmaps)
  tasks = sorted(routing['tasks'], key=tasks_lib.family_and_language)
  usage = routing['eval']['usage']
  cols = max(len(shown), 1)
  fig = plt.figure(figsize=(max(9.0, 3.2 * cols), 4.0 + 0.16 * len(tasks) + 1.5))
  grid = fig.add_gridspec(2, cols, height_ratios=(1.0, max(1.0, 0.06 * len(tasks) + 0.6)))
  ax = fig.add_subplot(grid[0, :])
  x = np.arange(len(sites))
  if routing_stats.nmi_defined(spec):
    for j, kind in enumerate(('family', 'language')):
      vals = [spec.get(kind, {}).get(site, np.nan) for site in sites]
      ax.bar(x + (j - 0.5) * 0.4, vals, 0.4, label=f'NMI(expert; {kind})')
    ax.axhline(routing_stats.SPECIALISED_NMI, color='k', lw=0.8, ls='--',
               label=f'specialised ({routing_stats.SPECIALISED_NMI})')
    ax.set_ylabel('NMI')
    ax.set_title('specialisation per adapted site (evaluation mode)', fontsize=8)
    heading = 'the {} most specialised sites'
  else:
    imbalance = routing_stats.load_imbalance(routing)
    ax.bar(x, [imbalance[site] for site in sites], 0.6, label='KL(load || uniform)')
    ax.set_ylabel('nats')
    ax.set_title('load imbalance per adapted site (evaluation mode; NMI is undefined: the routed '
                 'tasks have one family and one language)', fontsize=8)
    heading = 'the {} sites of the most uneven load'
  ax.set_xticks(x, sites, rotation=90, fontsize=5)
  ax.legend(fontsize=6)
  for i, site in enumerate(shown):
    hax = fig.add_subplot(grid[1, i])
    mat = np.array([usage[t][site] for t in tasks])
    im = hax.imshow(mat, aspect='auto', cmap='viridis', vmin=0, vmax=max(float(mat.max()), 1e-6))
    hax.set_yticks(range(len(tasks)), tasks if i == 0 else [], fontsize=5)
    hax.set_xticks(range(mat.shape[1]), range(mat.shape[1]), fontsize=6)
    hax.set_xlabel('expert', fontsize=6)
    nmi = ', '.join(f'{k} {spec[k][site]:.3f}' for k in ('family', 'language')
                    if site in spec.get(k, {}))
    hax.set_title(site + (f'\nNMI: {nmi}' if nmi else ''), fontsize=6)
    fig.colorbar(im, ax=hax, fraction=0.05)
  fig.suptitle(f'{title}\nexpert load per task: ' + heading.format(len(shown)), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return shown

