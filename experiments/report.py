r"""Turn sweeps' result files into a markdown report with tables, plots and a verdict per claim.

  python -m experiments.report                # every sweep -> experiments/results/REPORT.md
  python -m experiments.report --sweep=c1 --sweep=c3 --out_dir=/tmp/report
  python -m experiments.report --results_dir=<output_root>/<benchmark>/<model_size>/results

A results dir of T5X runs (`experiments.t5x_backend`) holds the spec its sweeps are rebuilt from
(`benchmarks.read_spec`); its `--sweep`s are the claims c1-c7.

On the bundled benchmark REPORT.md opens with the claims of both regimes side by side
(`claims_table.regimes_section`): the regime selection's checks per candidate
(`claims_table.selection_table`), then per claim c1-c7 the verdict and headline numbers (`headline`)
in the under-fit regime (sweeps c1-c7) and in the regime `experiments.regime_selection` chose
(sweeps f'{claim}@{regime}'). Writing the default REPORT.md of every claim also rewrites
README.md's reproduction summary from the same numbers (`--readme`, `claims_table.readme_block`;
`--readme=''`: not).

For each sweep: per point (a compared configuration) the learning rate is the one its tuning runs
chose (best mean validation metric over the tuning seeds, `sweeps.choose_learning_rate`, as the
runner chose it), and the test metrics at that rate are reported as mean +- standard deviation over
seeds (n shown); the claim's comparisons are repeated on token accuracy and chrF. Plots (PNG, in <out_dir>/plots/): the metric against each numeric
axis of the sweep (rank, experts, capacity factor, k, ...), per-family and per-language bars, and
the routing of the sweep's routing points (`report_plots.plot_routing`: NMI(expert; family /
language) per adapted site as bars, the expert load per task of the most specialised sites as
heatmaps), with a table per site of the evaluation-mode statistics and the training-mode ones
measured on the run's own training batches (`experiments.evaluation`; older result files' drops,
measured in training mode on padded evaluation batches, are labelled as that old measurement).
A sweep with checkpoint selection (`Sweep.select_checkpoint_every`) shows per point the step chosen on
validation for each seed and a plot of the validation curves (`checkpoint_selection_section`). A
diagnostic sweep (`Sweep.training_evidence`, e.g. sira_defaults) adds a table of its training
evidence. Every number comes from the `result.json` files of the sweep's runs;
`<out_dir>/<sweep>.json` holds the aggregated numbers the tables and plots show.

Comparisons use Welch's t interval (95%, scipy's `ttest_ind` with unequal variances) of the
difference of per-seed test metrics; each sweep's verdict (`claim_verdict`) is reproduced / not
reproduced / inconclusive, marked partial while runs are unfinished. c6 also lists each ablation
against the default SiRA point (`ablation_comparisons`), outside the verdict.

An unreadable `result.json` (truncated by a killed run, not JSON, not UTF-8) does not stop the
report: the file is skipped with a one-line warning on stderr naming its path and the parse error,
the runs that need it (the run itself; runs whose learning rate its tuning run chooses) are left
out, and the sweep's table and verdict are marked partial, listing each skipped file.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from experiments import report_plots
from experiments import routing_stats
from experiments import runner
from experiments import sweeps as sweeps_lib

# The bundled benchmark's metrics, then those only T5X runs on XTREME-UP report
# (`experiments.benchmarks`).
METRICS = ('sequence_accuracy', 'chrf', 'cer', 'token_accuracy', 'span_f1', 'f1', 'accuracy_at_1',
           'xtreme_up_score')
LABELS = {'sequence_accuracy': 'sequence accuracy', 'chrf': 'chrF', 'cer': 'CER',
          'token_accuracy': 'token accuracy (teacher-forced)', 'span_f1': 'span F1',
          'f1': 'F1', 'accuracy_at_1': 'accuracy@1',
          'xtreme_up_score': 'XTREME-UP score (official metrics, CER as 100 - CER)',
          sweeps_lib.TRAIN_CE_LAST_100: 'training cross-entropy, last 100 steps (nats/token)'}


def metric_label(metric: str) -> str:
  """A metric's display name (`LABELS`; the metric's own name where it has none)."""
  return LABELS.get(metric, metric)


# ------------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------------
def _mean_std(vals: Sequence[float]) -> tuple[float, float, int]:
  vals = [v for v in vals if v is not None]
  if not vals:
    return float('nan'), float('nan'), 0
  return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def _params(res: Mapping) -> dict:
  """The result's parameter counts as trained (`runner.trained_counts`: result files written before
  the runner applied it say trainable 0 for full fine-tuning)."""
  return runner.trained_counts(dict(res['params']), res.get('gin_config', ''))


class _ResultFiles:
  """Parse checks of result files, each file once: an unreadable one (truncated, not UTF-8) is
  skipped with a one-line warning on stderr naming its path and the parse error."""

  def __init__(self, results_dir: str):
    self.results_dir = results_dir
    self.errors: dict[str, str] = {}   # path -> parse error
    self._checked: set[str] = set()

  def unreadable(self, runs: Sequence[sweeps_lib.Run]) -> list[str]:
    """The paths among `runs`' existing result files that do not parse as JSON."""
    bad = []
    for run in runs:
      path = runner.result_path(self.results_dir, run)
      if path not in self._checked and os.path.exists(path):
        self._checked.add(path)
        try:
          runner.read_result(path)
        except runner.UnreadableResultError as e:
          self.errors[path] = e.error
          print(f'warning: skipping unreadable result file {path}: {e.error}', file=sys.stderr)
      if path in self.errors:
        bad.append(path)
    return bad


def aggregate(sweep: sweeps_lib.Sweep, results_dir: str) -> dict[str, Any]:
  """Per point: the chosen learning rate, per-seed and mean/std metrics, params, times.

  Returns {'points': {point: {...}}, 'missing': [run names], 'unreadable': {path: parse error},
  'unreadable_runs': [run names skipped for them], 'finished': n, 'total': n}. A run is skipped
  as unreadable when its result file, or (rate still to resolve) one of its tuning runs' files,
  does not parse.
  """
  by_point: dict[str, dict[Any, list]] = {}
  missing, skipped = [], []
  files = _ResultFiles(results_dir)
  for run in sweep.runs:
    if not run.resolved and files.unreadable(sweep.tuning_runs(run.lr_from)):
      skipped.append(run.name)
      continue
    run = runner.resolve(run, sweep, results_dir) or run
    if run.resolved and files.unreadable([run]):
      skipped.append(run.name)
      continue
    res = runner.load_result(results_dir, run)
    if res is None:
      missing.append(run.name)
      continue
    by_point.setdefault(run.point, {}).setdefault(run.learning_rate, []).append((run, res))
  points = {}
  for point in sweep.points():
    lrs = by_point.get(point)
    if not lrs:
      continue
    lr, scores = sweeps_lib.chosen_learning_rate(sweep, point, lrs)  # as the runner chooses
    items = sorted(lrs[lr], key=lambda x: x[0].seed)
    runs_here = [r for r in sweep.runs if r.point == point]
    rep = [res['metrics'][sweep.report_split] for _, res in items]
    entry = dict(
        learning_rate=lr, seeds=[r.seed for r, _ in items], axes=dict(items[0][0].axes),
        kind=items[0][0].kind, runs=[r.key for r, _ in items],
        expected_runs=len(runs_here), finished_runs=sum(len(v) for v in lrs.values()),
        validation_by_lr={str(k): float(np.mean(v)) for k, v in scores.items()},
        params=_params(items[0][1]),
        train_time_s=float(np.mean([res['wall_time_s']['train'] for _, res in items])),
        train_steps=[(res.get('train') or {}).get('steps') for _, res in items],
        per_seed={m: [s['summary'].get(m) for s in rep] for m in METRICS
                  if any(m in s['summary'] for s in rep)})
    for evidence in sweep.training_evidence:
      entry['per_seed'][evidence] = [TRAINING_EVIDENCE[evidence](res) for _, res in items]
    entry['mean'] = {m: _mean_std(v)[0] for m, v in entry['per_seed'].items()}
    entry['std'] = {m: _mean_std(v)[1] for m, v in entry['per_seed'].items()}
    tasks = sorted(rep[0]['tasks'])
    entry['per_task'] = {t: {m: float(np.mean([s['tasks'][t][m] for s in rep]))
                             for m in rep[0]['tasks'][t]} for t in tasks}
    selections = [res.get('checkpoint_selection') for _, res in items]
    if any(selections):
      entry['checkpoint_selection'] = checkpoint_choices(selections)
    routing = [res['routing'] for _, res in items if res.get('routing')]
    if routing:
      entry['routing'] = routing[0]
      entry['routing_seed'] = [r.seed for r, res in items if res.get('routing')][0]
    points[point] = entry
  return dict(points=points, missing=missing, unreadable=files.errors, unreadable_runs=skipped,
              finished=len(sweep.runs) - len(missing) - len(skipped), total=len(sweep.runs))


def checkpoint_choices(selections: Sequence[Mapping | None]) -> dict[str, Any]:
  """A point's checkpoint selections (`checkpoint_selection.Selection.as_dict` of each seed's
  result, None where a run has none) as {'split', 'metric', 'chosen_step': [per seed],
  'curves': [{step: score} per seed]}, in the seeds' order."""
  first = next(s for s in selections if s)
  return dict(split=first['split'], metric=first['metric'],
              chosen_step=[s['chosen_step'] if s else None for s in selections],
              curves=[{int(k): float(v) for k, v in s['curve'].items()} if s else {}
                      for s in selections])


def train_cross_entropy_tail(res: Mapping, steps: int = 100) -> float | None:
  """The training cross-entropy over a run's last `steps` steps: the mean of the logged steps of
  its train summary among them (`res['train']['history']`); None without a logged one."""
  train = res.get('train') or {}
  last = train.get('steps')
  vals = [h['cross_entropy'] for h in train.get('history') or ()
          if last is not None and h['step'] > last - steps and 'cross_entropy' in h]
  return float(np.mean(vals)) if vals else None


# Evidence a diagnostic sweep reports per run (`Sweep.training_evidence`): name -> (result -> value).
TRAINING_EVIDENCE = {sweeps_lib.TRAIN_CE_LAST_100: train_cross_entropy_tail}


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95
                   ) -> tuple[float, float, float]:
  """(mean(a) - mean(b), low, high): Welch's t interval at `level` (scipy's `ttest_ind` with
  unequal variances); nan bounds with fewer than 2 seeds each, the point itself when neither
  sample varies."""
  from scipy import stats
  a, b = np.asarray(a, float), np.asarray(b, float)
  diff = float(a.mean() - b.mean())
  if len(a) < 2 or len(b) < 2:
    return diff, float('nan'), float('nan')
  if np.ptp(a) == 0 and np.ptp(b) == 0:  # zero standard error (scipy would warn, then agree)
    return diff, diff, diff
  ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(level)
  return diff, float(ci.low), float(ci.high)


def compare(agg: Mapping, a: str, b: str, metric: str) -> dict:
  """Per-seed `metric` of point a minus point b: mean difference, Welch 95% interval, outcome
  ('a higher', 'b higher', 'no significant difference', 'fewer than 2 seeds', 'not measured')."""
  pa, pb = agg['points'].get(a), agg['points'].get(b)
  if pa is None or pb is None:
    return dict(a=a, b=b, outcome='not measured')
  diff, lo, hi = welch_interval(pa['per_seed'][metric], pb['per_seed'][metric])
  if math.isnan(lo):
    outcome = 'fewer than 2 seeds'
  elif lo > 0:
    outcome = 'a higher'
  elif hi < 0:
    outcome = 'b higher'
  else:
    outcome = 'no significant difference'
  return dict(a=a, b=b, diff=diff, low=lo, high=hi, outcome=outcome,
              n=(len(pa['per_seed'][metric]), len(pb['per_seed'][metric])))


def format_comparison(c: Mapping, metric: str) -> str:
  if 'diff' not in c:
    return f'{c["a"]} vs {c["b"]}: not measured'
  ci = '' if math.isnan(c['low']) else f', 95% CI [{c["low"]:+.2f}, {c["high"]:+.2f}]'
  outcome = {'a higher': f'{c["a"]} significantly higher',
             'b higher': f'{c["b"]} significantly higher'}.get(c['outcome'], c['outcome'])
  return (f'{c["a"]} - {c["b"]}: {c["diff"]:+.2f} {metric_label(metric)}{ci} '
          f'(seeds {c["n"][0]}/{c["n"][1]}): {outcome}')


# ------------------------------------------------------------------------------------------------
# Claims: which comparisons decide each sweep's verdict
# ------------------------------------------------------------------------------------------------
# The paper's claims: the sweeps of the under-fit regime, and of a candidate regime as
# f'{claim}@{candidate}' (`Sweep.claim_id` names the claim).
CLAIMS = ('c1', 'c2', 'c3', 'c4', 'c5', 'c6', 'c7')


def claim_comparisons(sweep: sweeps_lib.Sweep, agg: Mapping) -> list[tuple[str, str]]:
  """(A, B) pairs where the paper claims A >= B (c1: higher ranks vs rank 4, which it claims do
  *not* help: 'reproduced' there means the higher rank is *not* better)."""
  claim = sweep.claim_id
  pts = [p for p in sweep.points() if p in agg['points']]
  find = lambda prefix: [p for p in pts if p.startswith(prefix)]  # noqa: E731
  sira = [p for p in pts if p.startswith('sira')]
  if claim == 'c1':
    return [(p, 'lora r4') for p in find('lora r') if p != 'lora r4']
  if claim in ('c2', 'c3', 'main') and sira:
    return [(sira[0], p) for p in pts if p.split()[0] in ('lora', 'adamix', 'molora')]
  if claim == 'c4':
    return [('sira E16 k2', p) for p in find('sira E') if p != 'sira E16 k2']
  if claim == 'c5':
    return [('sira cf4', p) for p in find('sira cf') if p != 'sira cf4']
  if claim == 'c6':
    return [('sira E8 k2', 'sira no expert dropout'), ('sira E8 k2', 'smoe_dropout E8')]
  return []


def ablation_comparisons(sweep: sweeps_lib.Sweep, agg: Mapping) -> list[tuple[str, str]]:
  """(ablation, default) pairs shown beside the claim's comparisons but not read by the verdict:
  in c6 every SiRA point other than the default (rate, placement, k, aux factor, gates) against
  the default SiRA point."""
  if sweep.claim_id != 'c6':
    return []
  claimed = {pair for pair in claim_comparisons(sweep, agg)}
  default = 'sira E8 k2'
  return [(p, default) for p in sweep.points()
          if p in agg['points'] and p.startswith('sira') and p != default
          and (default, p) not in claimed]


def partial_note(agg: Mapping) -> str:
  """' (partial: ...)' while runs are unfinished or skipped for unreadable result files, else ''."""
  if not agg['missing'] and not agg.get('unreadable_runs'):
    return ''
  skipped = len(agg.get('unreadable_runs', ()))
  return (f' (partial: {agg["finished"]} of {agg["total"]} runs finished' +
          (f', {skipped} skipped for unreadable result files' if skipped else '') + ')')


def claim_verdict(sweep: sweeps_lib.Sweep, agg: Mapping, comps: Sequence[Mapping]) -> str:
  """'reproduced' / 'not reproduced' / 'inconclusive' (+ why) for the sweep's claim.

  c1 (higher ranks do not help): reproduced when no higher rank is significantly better than r4
  and every comparison has >= 2 seeds. Others (A beats B): reproduced when every A - B interval is
  above 0, not reproduced when one is below 0. c7: reproduced when some adapted site's NMI between
  expert and family or language reaches `routing_stats.SPECIALISED_NMI`, not reproduced when none
  exceeds `routing_stats.UNSPECIALISED_NMI`. Unfinished runs and unreadable result files make the
  verdict partial.
  """
  partial = partial_note(agg)
  claim = sweep.claim_id
  if claim == 'c7':
    largest = largest_specialisation(agg)
    if largest is None:
      return 'not measured' + partial
    top = largest['nmi']
    word = ('reproduced' if top >= routing_stats.SPECIALISED_NMI else
            'not reproduced' if top <= routing_stats.UNSPECIALISED_NMI else 'inconclusive')
    return f'{word}: largest NMI(expert; family or language) over sites {top:.3f}' + partial
  measured = [c for c in comps if 'diff' in c]
  if sweep.training_evidence and not comps:
    return ('diagnostic, no claim of the paper: read the training evidence table' if agg['points']
            else 'not measured') + partial
  if not comps or not measured:
    return 'not measured' + partial
  if any(c['outcome'] == 'fewer than 2 seeds' for c in measured) or len(measured) < len(comps):
    return 'inconclusive: comparisons without 2 seeds per point' + partial
  if claim == 'c1':
    better = [c['a'] for c in measured if c['outcome'] == 'a higher']
    if better:
      return f'not reproduced: {", ".join(better)} significantly better than lora r4' + partial
    return 'reproduced: no higher rank significantly better than lora r4' + partial
  lost = [c['b'] for c in measured if c['outcome'] == 'b higher']
  if lost:
    return f'not reproduced: {", ".join(lost)} significantly better' + partial
  if all(c['outcome'] == 'a higher' for c in measured):
    return 'reproduced: significantly better than every comparison point' + partial
  ns = [c['b'] for c in measured if c['outcome'] == 'no significant difference']
  return f'inconclusive: no significant difference to {", ".join(ns)}' + partial


def largest_specialisation(agg: Mapping) -> dict[str, Any] | None:
  """The largest NMI(expert; family or language) over the points' adapted sites (their
  'specialisation', `routing_stats.specialisation`): {'nmi', 'point', 'kind', 'site'}; None
  without one."""
  found = [dict(nmi=v, point=p, kind=kind, site=site) for p, e in agg['points'].items()
           for kind, sites in e.get('specialisation', {}).items() for site, v in sites.items()]
  return max(found, key=lambda f: f['nmi']) if found else None


def verdict_word(agg: Mapping) -> str:
  """The verdict without its reasons and partial note: 'reproduced', 'not reproduced',
  'inconclusive', 'not measured' (or a diagnostic sweep's words)."""
  verdict, note = agg['verdict'], partial_note(agg)
  if note and verdict.endswith(note):
    verdict = verdict[:-len(note)]
  return verdict.split(':')[0]


def headline(sweep: sweeps_lib.Sweep, agg: Mapping) -> dict[str, Any] | None:
  """The claim's numbers in one line. For c7 the largest NMI (`largest_specialisation`). Else the
  claim's comparison least favourable to it, the one its verdict turns on: one significantly
  against the claim first, then one without a significant difference, then one for it; among
  those the smallest difference in the claim's direction (A - B; B - A for c1, which claims that
  rank does not help). Returns {'comparison': `compare`'s dict, 'a' / 'b': {'point', 'mean',
  'sd', 'n'} of `sweep.metric`, 'of': the number of comparisons}; None when none is measured."""
  if sweep.claim_id == 'c7':
    return largest_specialisation(agg)
  comps = agg.get('comparisons') or []
  measured = [c for c in comps if 'diff' in c]
  if not measured:
    return None
  sign, against, for_ = ((-1, 'a higher', 'b higher') if sweep.claim_id == 'c1'
                         else (1, 'b higher', 'a higher'))
  order = {against: 0, for_: 2}
  c = min(measured, key=lambda c: (order.get(c['outcome'], 1), sign * c['diff']))
  side = lambda p: dict(point=p, mean=agg['points'][p]['mean'][sweep.metric],  # noqa: E731
                        sd=agg['points'][p]['std'][sweep.metric],
                        n=len(agg['points'][p]['per_seed'][sweep.metric]))
  return dict(comparison=c, a=side(c['a']), b=side(c['b']), of=len(comps))


def format_headline(h: Mapping | None) -> str:
  """`headline` in one line: 'A mean ± sd (n=k) vs B mean ± sd (n=k): difference, 95% CI [low,
  high]' (the interval Welch's, `compare`); '-' for None."""
  if h is None:
    return '-'
  if 'nmi' in h:
    return f'largest NMI(expert; {h["kind"]}) {h["nmi"]:.3f} ({h["point"]}, {h["site"]})'
  c = h['comparison']
  side = lambda s: f'{s["point"]} {s["mean"]:.2f} ± {s["sd"]:.2f} (n={s["n"]})'  # noqa: E731
  ci = ('no interval (fewer than 2 seeds)' if math.isnan(c['low']) else
        f'95% CI [{c["low"]:+.2f}, {c["high"]:+.2f}]')
  of = f' (least favourable of {h["of"]})' if h['of'] > 1 else ''
  return f'{side(h["a"])} vs {side(h["b"])}: {c["diff"]:+.2f}, {ci}{of}'


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------
def _slug(s: str) -> str:
  return ''.join(c if c.isalnum() else '_' for c in s).strip('_')


def _cell(e, m):
  mean, std = e['mean'].get(m), e['std'].get(m)
  if mean is None or (isinstance(mean, float) and math.isnan(mean)):
    return '-'
  return f'{mean:.2f} ± {std:.2f}'


def points_table(agg: Mapping, sweep: sweeps_lib.Sweep) -> str:
  pts = agg['points']
  metrics = [m for m in METRICS if any(m in e['mean'] for e in pts.values())]
  head = (['point', 'seeds'] + [f'{sweep.report_split} {LABELS[m]}' for m in metrics] +
          ['trainable params', 'active params / token', 'LR (chosen on validation)',
           'train time (s)'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for p, e in pts.items():
    lr = '-' if e['learning_rate'] is None else f'{e["learning_rate"]:g}'
    lines.append('| ' + ' | '.join(
        [p, str(len(e['seeds']))] + [_cell(e, m) for m in metrics] +
        [f'{e["params"]["trainable"]:,}', f'{e["params"]["active_per_token"]:,}', lr,
         f'{e["train_time_s"]:.0f}']) + ' |')
  return '\n'.join(lines)


def _fmt(v, digits=3) -> str:
  return '-' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{v:.{digits}f}'


def routing_section(sweep: sweeps_lib.Sweep, point: str, e: dict, plots_dir: str, out_dir: str,
                    plots: dict) -> list[str]:
  """Markdown of one point's routing analysis: its figure (`report_plots.plot_routing`), per site
  the NMI, the evaluation-mode statistics and the training-batch ones, each column saying where it
  was measured. Sets e['specialisation'] (unless `analyse` did) and plots[<figure>]."""
  r = routing_stats.routing_view(e['routing'])
  ev, tr = r['eval'], r.get('train_batches')
  old = r.get('old_train_mode_on_eval_batches')
  path = os.path.join(plots_dir, f'{sweep.name}_routing_{_slug(point)}.png')
  spec = e['specialisation'] = e.get('specialisation') or routing_stats.specialisation(r)
  shown = report_plots.plot_routing(
      r, spec, f'{sweep.name} / {point} (seed {e["routing_seed"]}): routing',
      path)
  rel = os.path.relpath(path, out_dir)
  plots[rel] = dict(usage=ev['usage'], specialisation=spec, heatmap_sites=shown)
  md = ['', f'Routing of {point} (seed {e["routing_seed"]}): ![routing]({rel})', '']
  if tr is not None:
    md.append(f'Training batches (train mode: the run\'s first {tr["num_batches"]} training '
              f'batches of {tr["batch_size"]} rows{", packed" if tr.get("pack") else ""}, each with '
              f'its step\'s dropout rng, cf {tr["capacity_factor"]}): dropped fraction '
              f'{_fmt(tr["summary"].get("dropped_fraction"))}, gate mass '
              f'{_fmt(tr["summary"].get("gate_mass"))} (layer means, as training logs them).')
  summary = [f'{label} {_fmt(ev["summary"][k])}' for k, label in (
      ('dropped_fraction', 'dropped fraction'), ('gate_mass', 'gate mass')) if k in ev['summary']]
  md.append(f'Evaluation (eval mode: {ev.get("split", sweep.select_split)} split' +
            (f', cf {ev["capacity_factor"]}' if 'capacity_factor' in ev else '') + '): ' +
            ', '.join(summary) + '.')
  if old is not None:
    md.append('This result file predates the training-batch analysis: its drops are the old '
              f'measurement ({routing_stats.OLD_DROP_LABEL}). Padded evaluation batches hold fewer '
              'real tokens per routing group than the packed training batches, so they understate '
              'the drops training had; rerun the run for the training-batch figures.')
  cols = [('NMI(expert; family)', lambda s_: spec['family'].get(s_)),
          ('NMI(expert; language)', lambda s_: spec['language'].get(s_)),
          ('eval gate entropy (nats)', lambda s_: ev.get('gate_entropy', {}).get(s_)),
          ('eval gate mass', lambda s_: ev.get('gate_mass', {}).get(s_))]
  if tr is not None:
    cols += [('train-batch dropped', lambda s_: tr['dropped_fraction'].get(s_)),
             ('train-batch gate mass', lambda s_: tr['gate_mass'].get(s_))]
  if old is not None:
    cols.append((routing_stats.OLD_DROP_LABEL, lambda s_: old['dropped_fraction'].get(s_)))
  md += ['', '| site | ' + ' | '.join(c for c, _ in cols) + ' |', '|---|' + '---|' * len(cols)]
  md += [f'| {s_} | ' + ' | '.join(_fmt(f(s_)) for _, f in cols) + ' |' for s_ in r['sites']]
  md.append(f'(log E = {math.log(max(r.get("num_experts", 1), 1)):.3f} nats is the entropy of a '
            'uniform router; gate mass: the kept top-k gates a token receives.' +
            ('' if spec['family'] and spec['language'] else
             ' -: NMI is undefined where the routed tasks have a single family or language.') + ')')
  return md


def checkpoint_selection_section(sweep: sweeps_lib.Sweep, agg: dict, plots_dir: str,
                                 out_dir: str) -> list[str]:
  """Markdown of a sweep with checkpoint selection (`Sweep.select_checkpoint_every`): per point
  the step chosen for each seed out of the run's steps, and a figure of its validation curves
  (`report_plots.plot_validation_curves`, added to agg['plots']); [] for a sweep without
  selection."""
  pts = {p: e for p, e in agg['points'].items() if 'checkpoint_selection' in e}
  if not pts:
    return []
  first = next(iter(pts.values()))['checkpoint_selection']
  label = metric_label(first['metric'])
  seeds = sorted({s_ for e in pts.values() for s_ in e['seeds']})
  md = ['', f'Checkpoints chosen on {first["split"]} (the best {label} among those kept at every '
        f'{sweep.select_checkpoint_every:.0%} of the run; ties: the earlier step), per seed: '
        'chosen step / the run\'s steps:', '',
        '| point | ' + ' | '.join(f'seed {s_}' for s_ in seeds) + ' |',
        '|---|' + '---|' * len(seeds)]
  figures = []
  for p, e in pts.items():
    sel = e['checkpoint_selection']
    by_seed = {seed: ('-' if chosen is None else f'{chosen} / {steps}')
               for seed, chosen, steps in zip(e['seeds'], sel['chosen_step'], e['train_steps'])}
    md.append(f'| {p} | ' + ' | '.join(by_seed.get(s_, '') for s_ in seeds) + ' |')
    path = os.path.join(plots_dir, f'{sweep.name}_validation_curve_{_slug(p)}.png')
    agg['plots'][os.path.relpath(path, out_dir)] = report_plots.plot_validation_curves(
        sweep, p, e, label, path)
    figures.append(f'![{p}: validation curves]({os.path.relpath(path, out_dir)})')
  return md + [''] + figures


def training_evidence_section(sweep: sweeps_lib.Sweep, agg: dict) -> list[str]:
  """A diagnostic sweep's evidence (`Sweep.training_evidence`, then the select split's sequence
  and token accuracy) per point, and each point against the sweep's first (the unchanged method):
  the difference and its Welch 95% interval. Sets agg['training_evidence_comparisons']."""
  pts = agg['points']
  metrics = [m for m in (*sweep.training_evidence, 'sequence_accuracy', 'token_accuracy')
             if any(m in e['mean'] for e in pts.values())]
  label = lambda m: (metric_label(m) if m in sweep.training_evidence  # noqa: E731
                     else f'{sweep.select_split} {metric_label(m)}')
  head = ['point', 'seeds', 'LR (chosen on validation)'] + [label(m) for m in metrics]
  md = ['', 'Training evidence (what this sweep is decided on; no test number is read):', '',
        '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for p, e in pts.items():
    md.append('| ' + ' | '.join([p, str(len(e['seeds'])), f'{e["learning_rate"]:g}'] +
                                [_cell(e, m) for m in metrics]) + ' |')
  base = sweep.points()[0]
  comps = []
  for p in pts:
    if p == base or base not in pts:
      continue
    for m in metrics:
      if all(v is not None for q in (p, base) for v in pts[q]['per_seed'].get(m, [None])):
        comps.append(dict(compare(agg, p, base, m), metric=m))
  agg['training_evidence_comparisons'] = comps
  if comps:
    md += ['', f'Against {base} (a lower training cross-entropy is better):']
    md += [f'- {format_comparison(c, c["metric"])}' for c in comps]
  return md + ['']


def analyse(sweep: sweeps_lib.Sweep, results_dir: str) -> dict[str, Any]:
  """Every number the report shows of `sweep` (no plot, no file written): `aggregate`, then the
  claim's comparisons on `sweep.metric` and the secondary metrics, c6's ablations, each routing
  point's specialisation, the verdict (`claim_verdict`; 'verdict_word': `verdict_word`) and its
  `headline`."""
  agg = aggregate(sweep, results_dir)
  pairs = claim_comparisons(sweep, agg)
  agg['comparisons'] = [compare(agg, a, b, sweep.metric) for a, b in pairs]
  if pairs:
    # The same pairs on the secondary metrics (the verdict reads only sweep.metric): exact match
    # is a steep function of per-token quality, so these show effects it may hide in seed noise.
    agg['secondary_comparisons'] = {
        m: [compare(agg, a, b, m) for a, b in pairs
            if all(m in agg['points'][p]['per_seed'] for p in (a, b) if p in agg['points'])]
        for m in ('token_accuracy', 'chrf') if m != sweep.metric}
  ablations = [compare(agg, a, b, sweep.metric) for a, b in ablation_comparisons(sweep, agg)]
  if ablations:
    agg['ablation_comparisons'] = ablations
  for e in agg['points'].values():
    if 'routing' in e:
      e['specialisation'] = routing_stats.specialisation(e['routing'])
  agg['verdict'] = claim_verdict(sweep, agg, agg['comparisons'])
  agg['verdict_word'] = verdict_word(agg)
  agg['headline'] = headline(sweep, agg)
  return agg


def sweep_section(sweep: sweeps_lib.Sweep, agg: dict, out_dir: str) -> str:
  """The markdown of one sweep from its `analyse`d numbers, its plots written to
  <out_dir>/plots/ (their data added to agg['plots'])."""
  plots_dir = os.path.join(out_dir, 'plots')
  os.makedirs(plots_dir, exist_ok=True)
  md = [f'## {sweep.name}: {sweep.claim}', '',
        f'{agg["finished"]} of {agg["total"]} runs finished.']
  unreadable = []
  if agg['unreadable']:
    unreadable = [f'**Partial table:** {len(agg["unreadable_runs"])} run(s) skipped, their result '
                  'files unreadable (delete them and rerun the sweep to redo those runs):']
    unreadable += [f'- `{path}`: {error}' for path, error in agg['unreadable'].items()] + ['']
  if not agg['points']:
    md += ['', '**Verdict at this scale: not measured** (no results yet).', ''] + unreadable
    return '\n'.join(md) + '\n'
  md += [f'**Verdict at this scale: {agg["verdict"]}.**', '', points_table(agg, sweep), '']
  md += unreadable
  if sweep.training_evidence:
    md += training_evidence_section(sweep, agg)
  if agg['comparisons']:
    md.append('Comparisons (test, at each point\'s chosen learning rate):')
    md += [f'- {format_comparison(c, sweep.metric)}' for c in agg['comparisons']]
    for m, cs in agg['secondary_comparisons'].items():
      md += [f'- ({LABELS[m]}) {format_comparison(c, m)}' for c in cs]
    md.append('')
  if agg.get('ablation_comparisons'):
    md.append('Ablations against the default (test, at the default\'s learning rate; not read by '
              'the verdict):')
    md += [f'- {format_comparison(c, sweep.metric)}' for c in agg['ablation_comparisons']]
    md.append('')
  agg['plots'] = {}
  rel = lambda p: os.path.relpath(p, out_dir)  # noqa: E731
  label = metric_label(sweep.metric)
  for x_axis, series in sweep.plots:
    path = os.path.join(plots_dir, f'{sweep.name}_{sweep.metric}_vs_{x_axis}.png')
    data = report_plots.plot_axis(agg, sweep, x_axis, series, sweep.metric, label, path)
    if data is not None:
      agg['plots'][rel(path)] = data
      md.append(f'![{sweep.metric} vs {x_axis}]({rel(path)})')
  for idx, kind in ((0, 'family'), (1, 'language')):
    path = os.path.join(plots_dir, f'{sweep.name}_per_{kind}.png')
    data = report_plots.plot_groups(agg, sweep, sweep.metric, label, idx, path)
    if data is not None:
      agg['plots'][rel(path)] = data
      md.append(f'![per {kind}]({rel(path)})')
  md += checkpoint_selection_section(sweep, agg, plots_dir, out_dir)
  for point, e in agg['points'].items():
    if 'routing' not in e:
      continue
    md += routing_section(sweep, point, e, plots_dir, out_dir, agg['plots'])
  if agg['missing']:
    md += ['', f'Unfinished runs ({len(agg["missing"])}): ' + ', '.join(agg['missing'][:20]) +
           (' ...' if len(agg['missing']) > 20 else '')]
  return '\n'.join(md) + '\n'


README = os.path.join(runner.REPO, 'README.md')


def write_report(sweep_names: Sequence[str] | None = None, *,
                 results_dir: str = runner.DEFAULT_RESULTS_DIR, out_dir: str | None = None,
                 title: str = 'SiRA reproduction on the bundled benchmark',
                 regimes: Mapping[str, sweeps_lib.Sweep] | None = None,
                 readme: str | None = None, list_unstarted: bool | None = None) -> str:
  """Writes <out_dir>/REPORT.md (+ plots/ and <sweep>.json); returns the report path.

  list_unstarted (default: when no sweep is named, i.e. every sweep): the claims in a regime
  (`Sweep.claim_id` != name) without a finished run are named in one line, not given sections.

  regimes: the sweeps by name to put the claims of both regimes side by side from, at the top
  (`claims_table.regimes_section`; None: no such section). readme: a README whose reproduction
  summary is rewritten from the claims' analyses (`claims_table.readme_block`; every claim must
  be among the sweeps)."""
  from experiments import claims_table
  out_dir = out_dir or results_dir
  chosen = [sweeps_lib.get_sweep(n) if isinstance(n, str) else n
            for n in (sweep_names or sweeps_lib.SWEEPS)]
  missing = [c for c in CLAIMS if c not in {s.name for s in chosen}]
  if readme and missing:
    raise ValueError(f'the README summary needs every claim; the report lacks {missing} (report '
                     "every sweep, or pass --readme='')")
  if readme:
    with open(readme) as f:
      claims_table.check_markers(f.read())
  os.makedirs(out_dir, exist_ok=True)
  analyses = {s.name: analyse(s, results_dir) for s in chosen}
  # Every sweep by default: the claims in a regime not started yet are named, not given sections.
  if list_unstarted is None:
    list_unstarted = not sweep_names
  unstarted = [] if not list_unstarted else [
      s.name for s in chosen if s.claim_id != s.name and not analyses[s.name]['finished']]
  chosen = [s for s in chosen if s.name not in unstarted]
  parts = [f'# {title}', '', 'Generated by `python -m experiments.report` from the result files '
           f'in `{os.path.relpath(results_dir, out_dir)}/runs/`; see the module docstring for '
           'how points, learning rates and verdicts are chosen.', '']
  if regimes is not None:
    parts.append(claims_table.regimes_section(regimes, dict(analyses), results_dir,
                                              claims_table.read_selection(results_dir)))
  for sweep in chosen:
    parts.append(sweep_section(sweep, analyses[sweep.name], out_dir))
    with open(os.path.join(out_dir, f'{sweep.name}.json'), 'w') as f:
      json.dump(analyses[sweep.name], f, indent=1, sort_keys=True, default=runner.json_default)
  if unstarted:
    parts += ['## Not started', '', 'No finished run yet (`python -m experiments.runner --list`): '
              + ', '.join(f'`{n}`' for n in unstarted) + '.', '']
  path = os.path.join(out_dir, 'REPORT.md')
  with open(path, 'w') as f:
    f.write('\n'.join(parts))
  if readme:
    link = os.path.relpath(path, os.path.dirname(os.path.abspath(readme)))
    claims_table.write_readme(readme, claims_table.readme_block(
        analyses, {s.name: s for s in chosen}, link))
  return path


def default_readme(*, results_dir: str, out_dir: str | None, bindings: Sequence[str],
                   eval_examples: int | None, sweep_names: Sequence[str]) -> str:
  """The README `--readme` rewrites when not given: `README` when the report is the default one
  (the default results and out dir, no --binding or --eval_examples, every claim among
  `sweep_names`), else '' (none)."""
  default = os.path.abspath(runner.DEFAULT_RESULTS_DIR)
  is_default = (os.path.abspath(results_dir) == default and
                os.path.abspath(out_dir or results_dir) == default and not bindings and
                eval_examples is None and set(CLAIMS) <= set(sweep_names))
  return README if is_default else ''


def define_flags() -> None:
  """The report's flags (absl), defined when its CLI starts."""
  from absl import flags
  if 'out_dir' in flags.FLAGS:
    return
  flags.DEFINE_multi_string('sweep', [], 'sweeps to report (default: all); repeatable')
  flags.DEFINE_string('results_dir', runner.DEFAULT_RESULTS_DIR, 'the result files (runner)')
  flags.DEFINE_string('out_dir', None, 'where REPORT.md and plots/ go (default: --results_dir)')
  flags.DEFINE_multi_string(
      'binding', [], 'the extra bindings the sweep was run with (experiments.runner --binding)')
  flags.DEFINE_integer('eval_examples', None, 'the --eval_examples the sweep was run with',
                       lower_bound=1)
  flags.DEFINE_string(
      'readme', None, 'the README whose reproduction summary (between its markers) is rewritten; '
      "'' for none (default: README.md when writing the default REPORT.md of every claim)")


def main(argv):
  """Writes the report; a user error (unknown sweep or flag, a bad value) is one line on stderr
  and exit status 2 (`runner.usage_error`)."""
  from absl import flags
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    runner.usage_error(f'unexpected argument {argv[1]!r} (flags are --name=value)')
  from experiments import benchmarks
  spec = benchmarks.read_spec(FLAGS.results_dir)  # a T5X sweep's results: its spec
  names = FLAGS.sweep or (list(benchmarks.CLAIMS) if spec else list(sweeps_lib.SWEEPS))
  try:
    chosen = ([benchmarks.pod_sweep(n, spec) for n in names] if spec
              else runner.chosen_sweeps(names, FLAGS.binding, FLAGS.eval_examples))
    # Both regimes' claims (the bundled benchmark's only), with the same overrides.
    regimes = None if spec else dict(zip(sweeps_lib.SWEEPS, runner.chosen_sweeps(
        list(sweeps_lib.SWEEPS), FLAGS.binding, FLAGS.eval_examples)))
  except (runner.UsageError, benchmarks.SpecError) as e:
    runner.usage_error(str(e))
  readme = FLAGS.readme
  if readme is None:
    readme = '' if spec else default_readme(
        results_dir=FLAGS.results_dir, out_dir=FLAGS.out_dir, bindings=FLAGS.binding,
        eval_examples=FLAGS.eval_examples, sweep_names=names)
  if readme and not os.path.isfile(readme):
    runner.usage_error(f'--readme={readme}: no such file')
  title = (f'SiRA reproduction with T5X: {spec.benchmark}, {spec.model_size}' if spec else
           'SiRA reproduction on the bundled benchmark')
  try:
    path = write_report(chosen, results_dir=FLAGS.results_dir, out_dir=FLAGS.out_dir, title=title,
                        regimes=regimes, readme=readme, list_unstarted=not FLAGS.sweep)
  except ValueError as e:  # a README summary without every claim, or without its markers
    runner.usage_error(f'--readme={readme}: {e}')
  print(path)
  if readme:
    print(f'reproduction summary rewritten: {readme}')
  return 0


def cli():
  from absl import app
  define_flags()
  app.run(main, flags_parser=runner.parse_flags)


if __name__ == '__main__':
  from experiments import report as _module  # one copy, not a second as __main__
  _module.cli()
