"""The claims c1-c7 in each regime candidate ('c3@data_limited', ...): names, sizes, the candidate's
bindings, base and scoring on every run, and the selection's runs reused by key (no training)."""
import pytest

from experiments import runner
from experiments import sweeps as sweeps_lib
from tests.test_regime_selection import REGISTERED, _config

CLAIMS = ('c1', 'c2', 'c3', 'c4', 'c5', 'c6', 'c7')
CANDIDATES = tuple(sweeps_lib.REGIME_CANDIDATES)


def _sweep(claim, candidate):
  return sweeps_lib.get_sweep(f'{claim}@{candidate}')


def _runs(sweep, point):
  return [r for r in sweep.runs if r.point == point]


def test_every_claim_has_a_sweep_in_every_candidate_listed_after_the_others():
  names = list(sweeps_lib.SWEEPS)
  claimed = [f'{c}@{x}' for x in CANDIDATES for c in CLAIMS]
  assert names[-len(claimed):] == claimed
  assert names[:7] == list(CLAIMS)   # `--sweep=nope` lists c1, c2, ... first
  for name in claimed:
    sweep = sweeps_lib.get_sweep(name)
    claim, candidate = name.split('@')
    assert sweep.claim_id == claim and sweep.claim.startswith(sweeps_lib.CLAIMS[claim])
    assert f'regime {candidate!r}' in sweep.claim
  assert sweeps_lib.get_sweep('c3').claim_id == 'c3'
  assert sweeps_lib.get_sweep('regime_converged').claim_id == 'regime_converged'


@pytest.mark.parametrize('candidate', CANDIDATES)
def test_every_run_carries_the_candidates_bindings_base_and_scoring(candidate):
  what, bindings, base_gin = sweeps_lib.REGIME_CANDIDATES[candidate]
  selection = sweeps_lib.get_sweep(f'regime_{candidate}')
  for claim in CLAIMS:
    sweep = _sweep(claim, candidate)
    assert sweep.base_gin == base_gin and sweep.base_bindings == ()
    assert runner.base_config_hash(sweep)[0] == runner.base_config_hash(selection)[0]
    assert sweep.split_num_examples == sweeps_lib.REGIME_SPLIT_EXAMPLES
    assert sweep.select_checkpoint_every == sweeps_lib.REGIME_CHECKPOINT_EVERY
    assert (sweep.select_split, sweep.report_split, sweep.metric) == (
        selection.select_split, selection.report_split, selection.metric)
    protocol = selection.evaluation_protocol()
    for run in sweep.runs:
      assert run.evaluation == protocol, (sweep.name, run.name)
      mixture = [b for b in run.bindings if b.startswith('MIXTURE_OR_TASK_NAME')]
      if claim == 'c2':  # c2's task instead of the candidate's mixture, its other bindings
        own = {b for b in bindings if not b.startswith('MIXTURE_OR_TASK_NAME')}
        assert own <= set(run.bindings), (sweep.name, run.name)
        assert mixture == list(sweeps_lib.single_task(sweeps_lib.C2_TASK))
      else:
        assert set(bindings) <= set(run.bindings), (sweep.name, run.name)
        assert mixture == [b for b in bindings if b.startswith('MIXTURE_OR_TASK_NAME')]


def test_the_runs_train_and_score_what_the_candidate_registers():
  import seqio
  # c2 scores every test example of its task: 500 (the unit task's 200 and 300 more).
  assert seqio.get_mixture_or_task(sweeps_lib.C2_TASK).num_input_examples('test') == 500
  assert _sweep('c2', 'converged').num_examples('test') is None
  for candidate in CANDIDATES:
    examples, steps, _, mixture = REGISTERED[f'regime_{candidate}']
    for claim, task in (('c3', mixture), ('c2', sweeps_lib.C2_TASK), ('c6', mixture)):
      sweep = _sweep(claim, candidate)
      for run in (sweep.runs[0], sweep.runs[-1]):
        assert _config(run, sweep) == (steps, examples, task), (sweep.name, run.name)


def _resolved(runs, lr):
  return {r.seed: (r.with_learning_rate(lr) if not r.resolved else r) for r in runs
          if not r.resolved or r.learning_rate == lr}


@pytest.mark.parametrize('candidate', CANDIDATES)
def test_a_run_equal_to_a_selection_run_has_its_key(candidate):
  selection = sweeps_lib.get_sweep(f'regime_{candidate}')
  c1, c3 = _sweep('c1', candidate), _sweep('c3', candidate)
  by_name = lambda sweep: {r.name: r for r in sweep.runs}  # noqa: E731
  # LoRA r4 seed 0 at 1e-3: one run, one result file.
  assert by_name(c1)['lora r4-lr0.001-s0'].key == by_name(selection)['lora r4-lr0.001-s0'].key
  assert by_name(c3)['lora r4-lr0.001-s0'].key == by_name(selection)['lora r4-lr0.001-s0'].key
  # Every point the selection trained, at any rate its tuning may choose: the floor, LoRA r4, r8
  # and r32 (c3's 'params of E=8' and 'k·r' points included), the ceiling.
  pairs = [(c1, 'lora r4', 'lora r4'), (c1, 'lora r8', 'lora r8'), (c1, 'lora r32', 'lora r32'),
           (c3, 'lora r4', 'lora r4'), (c3, sweeps_lib.ACTIVE_RANK_POINT, 'lora r8'),
           (c3, f'lora r32 (params of E={sweeps_lib.SIRA_E})', 'lora r32'),
           (c3, 'ceiling (full fine-tuning)', 'ceiling (full fine-tuning)')]
  for sweep, point, sel_point in pairs:
    for lr in {r.learning_rate for r in selection.tuning_runs(sel_point)}:
      ours, theirs = _resolved(_runs(sweep, point), lr), _resolved(_runs(selection, sel_point), lr)
      # Every seed both run (c1: the selection's REGIME_SEEDS, c3: HEADLINE_SEEDS, SEEDS of r8
      # and the ceiling), at every rate.
      shared = set(ours) & set(theirs)
      assert len(shared) >= len(sweeps_lib.SEEDS), (sweep.name, point)
      assert all(ours[s].key == theirs[s].key for s in shared), (sweep.name, point, lr)
  assert c3.runs[0].key == c1.runs[0].key == selection.runs[0].key   # the floor
  # The same SiRA runs answer c3 and are the default point of the ablations and c7.
  sira = {r.key for r in _runs(c3, sweeps_lib.SIRA)}
  for claim in ('c4', 'c5', 'c6', 'c7'):
    assert {r.key for r in _runs(_sweep(claim, candidate), sweeps_lib.SIRA)} == sira
  # Nothing is shared with the sweeps as first run (another regime, another scoring).
  first = {r.key for c in CLAIMS for r in sweeps_lib.get_sweep(c).runs}
  assert first.isdisjoint(r.key for c in CLAIMS for r in _sweep(c, candidate).runs)


def test_lora_at_sira_active_rank_joins_the_headline_comparisons_with_five_seeds():
  assert sweeps_lib.ACTIVE_RANK == sweeps_lib.SIRA_TOP_K * sweeps_lib.RANK == 8
  headline = {'floor (frozen base)', 'lora r4', sweeps_lib.SIRA, sweeps_lib.ACTIVE_RANK_POINT,
              'lora r32 (params of E=8)', 'molora E8', 'adamix E8', 'ceiling (full fine-tuning)'}
  for candidate in CANDIDATES:
    for claim in ('c2', 'c3'):
      sweep = _sweep(claim, candidate)
      assert set(sweep.points()) == headline
      kr = _runs(sweep, sweeps_lib.ACTIVE_RANK_POINT)
      assert all('ADAPTER_RANK=8' in r.bindings and r.axes == {'method': 'lora', 'rank': 8}
                 for r in kr)
      for point in headline - {'floor (frozen base)'}:
        runs = _runs(sweep, point)
        assert {r.seed for r in runs} == set(sweeps_lib.HEADLINE_SEEDS) == set(range(5))
        grid = (sweeps_lib.FULL_FT_LR_GRID if point.startswith('ceiling') else
                sweeps_lib.LR_GRID)
        assert sorted((r.seed, r.learning_rate) for r in sweep.tuning_runs(point)) == [
            (0, lr) for lr in sorted(grid)]
        assert len(runs) == len(grid) + 4
    # Ablations: 3 seeds, each at SiRA's chosen rate (SMoE-Dropout tuned, a method of its own).
    for claim in ('c4', 'c5', 'c6'):
      sweep = _sweep(claim, candidate)
      for point in sweep.points():
        if point == sweeps_lib.SIRA:
          continue
        runs = _runs(sweep, point)
        assert {r.seed for r in runs} == set(sweeps_lib.ABLATION_SEEDS) == {0, 1, 2}
        assert all(r.lr_from == (point if point.startswith('smoe') else sweeps_lib.SIRA)
                   for r in runs if r.learning_rate is None)


def test_sweep_sizes():
  # (runs, distinct points) per claim: c1 5 ranks x (4 rates + 5 seeds) + the floor; c2/c3 7
  # points x (grid + 4 seeds) (the ceiling's grid has 3 rates) + the floor; c4-c6 SiRA's 8 runs +
  # 3 seeds per ablation (SMoE-Dropout: 4 rates + 2 seeds), c5 and c6 without the points the
  # budget leaves out. The trimmed candidates: c1's r8, r16 and r64 at 3 seeds (4 rates + 2), and
  # c4's E4, c5's cf1, c6's dropout 0.2 and k4 left out too.
  full = {'c1': (46, 6), 'c2': (56, 8), 'c3': (56, 8), 'c4': (17, 4), 'c5': (17, 4),
          'c6': (32, 8), 'c7': (8, 1)}
  trimmed = dict(full, c1=(37, 6), c4=(14, 3), c5=(14, 3), c6=(26, 6))
  assert sweeps_lib.REGIME_BUDGET_TRIMMED == {'data_limited', 'converged'}
  for candidate in CANDIDATES:
    sizes = trimmed if candidate in sweeps_lib.REGIME_BUDGET_TRIMMED else full
    dropped = sweeps_lib.regime_dropped_points(candidate)
    for claim, (runs, points) in sizes.items():
      sweep = _sweep(claim, candidate)
      assert (len(sweep.runs), len(sweep.points())) == (runs, points), sweep.name
      assert len({r.key for r in sweep.runs}) == runs
      assert not set(sweep.points()) & dropped
    c1 = _sweep('c1', candidate)
    for rank in sweeps_lib.C1_RANKS:
      seeds = {r.seed for r in _runs(c1, f'lora r{rank}')}
      assert seeds == set(sweeps_lib.c1_regime_seeds(candidate, rank))
      assert (seeds == set(sweeps_lib.REGIME_SEEDS)) == (
          rank in sweeps_lib.REGIME_POWER_RANKS or candidate not in sweeps_lib.REGIME_BUDGET_TRIMMED)
  # Left out in a regime only, and every one a point of c4, c5 or c6 as first run.
  first = {p for c in ('c4', 'c5', 'c6') for p in sweeps_lib.get_sweep(c).points()}
  assert sweeps_lib.REGIME_DROPPED_POINTS < first
  assert sweeps_lib.REGIME_BUDGET_DROPPED_POINTS < first
  # What the report compares stays: c4's E16 and E2, c5's cf4 and cf0.5, c6's claim pairs, k = 1,
  # aux 0, the gate normalisation (in a regime the ablation is the unrenormalised gates: SiRA's
  # frozen default renormalises).
  for candidate in CANDIDATES:
    assert {'sira E2 k2', 'sira E16 k2'} <= set(_sweep('c4', candidate).points())
    assert {'sira cf4', 'sira cf0.5'} <= set(_sweep('c5', candidate).points())
    assert {'sira no expert dropout', 'smoe_dropout E8', 'sira E8 k1', 'sira aux 0',
            'sira gates not renormalised'} <= set(_sweep('c6', candidate).points())
  assert {'sira E8 k4', 'sira expert dropout 0.2'} <= set(_sweep('c6', 'near_base').points())


@pytest.mark.parametrize('candidate', CANDIDATES)
def test_sira_runs_in_a_regime_carry_the_frozen_defaults_and_the_first_regime_keeps_its_own(
    candidate):
  frozen = sweeps_lib.SIRA_FROZEN_BINDINGS
  assert frozen == ('adapter/AdapterConfig.renormalize_gates=True',)  # experiments/SIRA_DEFAULTS.md
  for claim in ('c2', 'c3', 'c4', 'c5', 'c6', 'c7'):
    for run in _sweep(claim, candidate).runs:
      method = run.axes.get('method')
      if method == 'sira' and run.point != 'sira gates not renormalised':
        assert set(frozen) <= set(run.bindings), (claim, run.name)
      elif method == 'sira':  # the ablation: the old convention, and only it
        assert 'adapter/AdapterConfig.renormalize_gates=False' in run.bindings
        assert not set(frozen) & set(run.bindings)
      else:  # the rivals and LoRA are untouched by SiRA's defaults
        assert not set(frozen) & set(run.bindings), (claim, run.name)
  for claim in ('c2', 'c3', 'c4', 'c5', 'c7'):  # as first run: the flaxformer convention
    assert not any(set(frozen) & set(r.bindings) for r in sweeps_lib.get_sweep(claim).runs)


# ------------------------------------------------------------------------------------------------
# The cost estimate (experiments/claims_cost.py)
# ------------------------------------------------------------------------------------------------
def _write_reference_results(results_dir, wall):
  """Result files of c3's reference runs (and its first AdaMix runs) with the wall times
  `wall` = {cost class: (train s, eval s)}; seed 0 at 1e-3 wins the tuning; one file records
  CPU time (twice its wall time)."""
  from experiments import claims_cost
  for sweep in (sweeps_lib.get_sweep('c3'), claims_cost.first_adamix_runs()):
    for run in sweep.runs:
      if run.lr_from is not None and run.learning_rate is None:
        run = run.with_learning_rate(1e-3)
      if run.point == 'adamix E8' and sweep.name == 'c3':
        continue   # the sweep's own AdaMix runs: another machine, never read
      train, ev = wall[claims_cost.cost_class(run)]
      res = dict(run=run.as_dict(), wall_time_s=dict(train=train, eval=ev, total=train + ev),
                 metrics={'validation': {'summary': {'sequence_accuracy': float(
                     run.learning_rate in (None, 1e-3))}}})
      if run.kind == 'floor':
        res['cpu_time_s'] = dict(total=2.0 * (train + ev))
      runner._write_json(runner.result_path(results_dir, run), res)


def test_the_rates_are_measured_from_c3s_result_files(tmp_path):
  from experiments import claims_cost
  wall = {'floor': (0.0, 90.0), 'lora r4': (60.0, 60.0), 'lora': (66.0, 60.0),
          'sira': (90.0, 90.0), 'molora': (120.0, 60.0), 'adamix': (100.0, 80.0),
          'full_ft': (60.0, 66.0)}
  _write_reference_results(str(tmp_path), wall)
  rates = claims_cost.measured_rates(str(tmp_path))
  total = {c: sum(v) for c, v in wall.items()}
  assert rates.factors == pytest.approx({c: t / 120.0 for c, t in total.items()})
  assert rates.train_s_per_step == pytest.approx(60.0 / 600)
  assert rates.eval_s_per_example == pytest.approx(60.0 / (30 * 2 * 50))
  assert rates.cpu_per_wall == pytest.approx(2.0)
  assert rates.measured_on == dict(floor=1, lora=6, sira=6, molora=6, adamix=6, full_ft=5,
                                   cpu_per_wall=1, **{'lora r4': 6})
  # The estimate, calibrated to a measured LoRA r4 cost: one selection r4 run costs exactly that,
  # and every run in proportion.
  cheap = claims_cost.estimate('near_base', rates, 500.0)
  dear = claims_cost.estimate('near_base', rates, 1000.0)
  assert cheap.lora_r4_cpu_s == pytest.approx(500.0)
  assert dear.cpu_s == pytest.approx(2 * cheap.cpu_s) and dear.wall_s == pytest.approx(
      dear.cpu_s / 2.0)
  # Without a measured cost: the model's own prediction of one r4 run (600 steps; 15 tasks x
  # (50 validation examples x 10 checkpoints + 200 test examples)), in CPU seconds.
  modelled = claims_cost.estimate('near_base', rates)
  assert modelled.lora_r4_cpu_s == pytest.approx(2.0 * (600 * 0.1 + 15 * 700 * 0.02))
  with pytest.raises(ValueError, match='no finished c3 runs'):
    claims_cost.measured_rates(str(tmp_path / 'empty'))


def test_the_estimate_counts_each_new_run_once_and_prices_what_it_scores():
  from experiments import claims_cost
  rates = claims_cost.Rates(factors={c: 1.0 for c in claims_cost.COST_CLASSES},
                            train_s_per_step=0.1, eval_s_per_example=0.01, cpu_per_wall=1.0,
                            measured_on={})
  for candidate in CANDIDATES:
    e = claims_cost.estimate(candidate, rates)
    new = {s.name.split('@')[0]: s.new_runs for s in e.sweeps}
    # c1: r16, r64 (4 rates + 5 seeds each) and r8's seeds 3-5; c3: SiRA, MoLoRA, AdaMix (8 each)
    # and the ceiling's seeds 3, 4 (LoRA r8's are c1's); c4-c6 the ablations; c7: c3's SiRA.
    # Trimmed: c1's r16, r64 (4 rates + 2 seeds), so c3 runs r8's seeds 3, 4; 2 ablation points
    # fewer in c4-c6 each.
    if candidate in sweeps_lib.REGIME_BUDGET_TRIMMED:
      assert new == {'c1': 12, 'c2': 56, 'c3': 28, 'c4': 6, 'c5': 6, 'c6': 18, 'c7': 0}
      assert e.distinct_new_runs == 126
    else:
      assert new == {'c1': 21, 'c2': 56, 'c3': 26, 'c4': 9, 'c5': 9, 'c6': 24, 'c7': 0}
      assert e.distinct_new_runs == 145
  data_limited = sweeps_lib.get_sweep('regime_data_limited')
  r4 = next(r for r in data_limited.runs if r.point == 'lora r4')
  assert claims_cost.examples_scored(r4, data_limited) == 30 * (50 * 10 + 200)
  assert claims_cost.examples_scored(data_limited.runs[0], data_limited) == 30 * (50 + 200)
  c2 = _sweep('c2', 'near_base')
  assert claims_cost.examples_scored(c2.runs[1], c2) == 50 * 10 + 500
  assert claims_cost.run_cpu_s(c2.runs[1], c2, rates) == pytest.approx(600 * 0.1 + 1000 * 0.01)
  # The macros a run does not bind are finetune.gin's.
  c3 = sweeps_lib.get_sweep('c3')
  run = c3.runs[1]
  assert _config(run, c3) == (int(claims_cost._macro(run.bindings, 'TRAIN_STEPS')), None,
                              claims_cost._macro(run.bindings, 'MIXTURE_OR_TASK_NAME').strip("'"))


def test_the_committed_results_give_every_factor():
  from experiments import claims_cost
  rates = claims_cost.measured_rates()
  assert rates.factors['lora r4'] == 1.0 and set(rates.factors) == set(claims_cost.COST_CLASSES)
  assert all(n >= 5 for c, n in rates.measured_on.items() if c != 'floor')
  assert rates.cpu_per_wall > 1.0   # a run keeps both cores of the machine busy
