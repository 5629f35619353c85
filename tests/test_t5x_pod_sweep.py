"""End to end with real T5X (skipped where t5x is not importable, as in CI): a tiny XTREME-UP
sweep (translation, sw and yo, fixture data in the release's format) through
`python -m experiments.runner --backend=t5x` on CPU, collected, then `python -m
experiments.report`; the report's numbers are read back from T5X's own metrics files. Several
minutes on a 2-core CPU (tests/t5x_pod_sweep.py)."""
import glob
import json
import os

import numpy as np
import pytest

pytest.importorskip('t5x')

import t5x_pod_sweep  # noqa: E402
from experiments import benchmarks  # noqa: E402
from experiments import t5x_backend  # noqa: E402


def _t5x_chrf(spec, run, split):
  """Mean over tasks of chrF in T5X's metrics files of `run` on `split` (the evaluated step)."""
  step = benchmarks.checkpoint_step(t5x_backend.eval_checkpoint(run, spec))
  files = glob.glob(os.path.join(t5x_backend.eval_dir(spec, run, split), 'inference_eval',
                                 '*-metrics.jsonl'))
  assert len(files) == 2  # xtreme_up_translation_en_sw, _en_yo
  vals = []
  for path in files:
    with open(path) as f:
      rows = [json.loads(line) for line in f]
    vals.append([r for r in rows if r['step'] == step][-1]['chrf'])
  return float(np.mean(vals))


def _table(report, heading):
  """{point: {column: cell}} of the first table after `heading`."""
  lines = report[report.index(heading):].splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith('| point'))
  head = [c.strip() for c in lines[start].strip('|').split('|')]
  rows = {}
  for line in lines[start + 2:]:
    if not line.startswith('|'):
      break
    cells = [c.strip() for c in line.strip('|').split('|')]
    rows[cells[0]] = dict(zip(head, cells))
  return rows


@pytest.mark.slow
def test_tiny_xtreme_up_sweep_through_t5x_collected_and_reported(tmp_path):
  report_path = t5x_pod_sweep.run_sweep(str(tmp_path))
  with open(report_path) as f:
    report = f.read()
  spec = benchmarks.read_spec(t5x_pod_sweep.results_dir(str(tmp_path)))
  sweep = benchmarks.pod_sweep(t5x_pod_sweep.SWEEP, spec)
  runs = {r.name: r for r in sweep.runs if r.name in t5x_pod_sweep.RUNS}
  assert len(runs) == 3
  # The report chose SiRA's rate by validation chrF (ties: the smaller rate), as T5X scored it.
  sira = {r.learning_rate: r for name, r in runs.items() if name.startswith('sira')}
  val = {lr: _t5x_chrf(spec, r, 'validation') for lr, r in sira.items()}
  chosen = max(sorted(val), key=lambda lr: val[lr])
  table = _table(report, '## c3')
  assert table['sira E8 k2']['LR (chosen on validation)'] == f'{chosen:g}'
  assert table['sira E8 k2']['test chrF'] == (
      f'{_t5x_chrf(spec, sira[chosen], "test"):.2f} ± 0.00')
  floor = runs['floor (frozen base)-s0']
  assert table['floor (frozen base)']['test chrF'] == f'{_t5x_chrf(spec, floor, "test"):.2f} ± 0.00'
  assert table['floor (frozen base)']['trainable params'] == '0'
  # Three of c3's runs: the verdict and the run count say partial.
  assert f'(partial: 3 of {len(sweep.runs)} runs finished)' in report
  with open(os.path.join(os.path.dirname(report_path), 'c3.json')) as f:
    agg = json.load(f)
  assert agg['points']['sira E8 k2']['validation_by_lr'] == {str(k): v for k, v in val.items()}
