"""The pre-registered regime rule (experiments/regime_rule.py): the test, each check, the choice."""
import zlib

import numpy as np
import pytest
from scipy import stats

from experiments import regime_rule as rule


def _scores(name, *, floor=1.0, ceiling=40.0, r4=20.0, r32=20.5, sd=0.8, seeds=6, cost=1.0):
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  def noise():  # exactly mean 0, so each case's means are the ones given
    x = rng.normal(0, sd, seeds)
    return x - x.mean()
  return rule.RegimeScores(
      name=name, floor=[floor], ceiling=[ceiling] * 3, lora_r4=r4 + noise(),
      lora_r8=[r4] * 3, lora_r32=r32 + noise(), cost=cost)


def test_equivalence_is_the_90_percent_welch_interval_inside_the_margin():
  rng = np.random.default_rng(0)
  for _ in range(50):
    a, b = rng.normal(rng.uniform(-3, 3), rng.uniform(0.3, 3), 6), rng.normal(0, 1.5, 7)
    eq = rule.equivalence_test(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.90)
    assert eq.interval == pytest.approx((ci.low, ci.high))
    assert eq.equivalent == (-2 < ci.low and ci.high < 2)
    assert eq.diff == pytest.approx(a.mean() - b.mean())


def test_equivalence_hand_case():
  # a - b = 0.5; both samples have variance 5/3 (n = 4): se = sqrt(2 * 5/3 / 4), Welch df = 6.
  a = np.array([0.0, 1.0, 2.0, 3.0]) - 1.0
  b = np.array([0.0, 1.0, 2.0, 3.0]) - 1.5
  se = np.sqrt(2 * (5 / 3) / 4)
  p_upper = stats.t.cdf((0.5 - 2) / se, df=6)
  p_lower = stats.t.sf((0.5 + 2) / se, df=6)
  eq = rule.equivalence_test(a, b)
  assert eq.p_value == pytest.approx(max(p_upper, p_lower))
  assert eq.equivalent == (max(p_upper, p_lower) < 0.05)


def test_every_check_can_fail_alone_and_all_pass_together():
  assert rule.judge(_scores('ok')).passes
  cases = {
      'c1_equivalence': _scores('rank helps', r32=28.0),
      'headroom': _scores('no room', ceiling=22.0),
      'floor': _scores('solved', floor=7.0),
      'seeds': _scores('few seeds', seeds=4),
  }
  for check, scores in cases.items():
    v = rule.judge(scores)
    assert not v.passes
    assert [k for k, ok in v.checks.items() if not ok] == [check], (check, v.checks, v.reasons)
    assert v.reasons


def test_noisy_seeds_fail_equivalence_even_with_equal_means():
  v = rule.judge(_scores('noisy', r32=20.0, sd=6.0))
  assert not v.checks['c1_equivalence']


def test_the_cheapest_passing_regime_wins():
  chosen, verdicts = rule.decide([
      _scores('expensive ok', cost=30.0), _scores('cheap fails', r32=30.0, cost=1.0),
      _scores('middle ok', cost=5.0)])
  assert [v.name for v in verdicts] == ['cheap fails', 'middle ok', 'expensive ok']
  assert chosen.name == 'middle ok'


def test_none_passes_names_the_closest_failing():
  chosen, verdicts = rule.decide([
      _scores('two fail', r32=30.0, floor=9.0, cost=1.0),
      _scores('one fails', ceiling=21.0, cost=2.0)])
  assert chosen is None
  assert rule.closest(verdicts).name == 'one fails'
