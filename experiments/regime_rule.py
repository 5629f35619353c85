"""The pre-registered rule that chooses the reproduction's regime (experiments/PREREGISTRATION.md).

The paper starts from the premise that more LoRA rank does not help (claim c1). A regime in which
that premise fails cannot test what the paper claims, so before any mixture method runs in a new
regime, the regime must pass this rule on runs of the floor (the frozen base), the ceiling (full
fine-tuning) and LoRA r4, r8 and r32 alone. The constants below were committed before any selection
run; changing one after a selection run has been seen voids the selection.

`decide(candidates)` applies the rule to candidate regimes given in the order of their cost and
returns the cheapest that passes, or none (then the closest is named as failing).

Scores are test sequence accuracy in percent points, one value per seed.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

# c1 holds: mean(r32) - mean(r4) is equivalent to 0 within +-EQUIVALENCE_MARGIN points.
EQUIVALENCE_MARGIN = 2.0
# The equivalence test: two one-sided Welch t-tests (TOST), each at ALPHA. Equivalence at 95%
# confidence, i.e. the 90% Welch interval of the difference lies inside the margin.
ALPHA = 0.05
# Room above LoRA r4: the ceiling's mean is at least this many points above r4's.
MIN_HEADROOM = 5.0
# The frozen base alone must score below this (the task is not solved without tuning).
MAX_FLOOR = 5.0
# Seeds for r4 and r32 in the selection (power: with a seed sd of s points, the 90% interval's
# half width is about 1.05 s at 6 seeds, so equal means pass while s < 1.9).
MIN_SEEDS = 6


@dataclasses.dataclass(frozen=True)
class Equivalence:
  """TOST result for mean(a) - mean(b) against +-margin."""
  diff: float
  p_value: float        # max of the two one-sided p-values
  interval: tuple[float, float]  # the (1 - 2 alpha) Welch interval of the difference
  equivalent: bool


def equivalence_test(a: Sequence[float], b: Sequence[float], margin: float = EQUIVALENCE_MARGIN,
                     alpha: float = ALPHA) -> Equivalence:
  """Two one-sided Welch t-tests that mean(a) - mean(b) lies in (-margin, +margin)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f'equivalence needs at least 2 values per side, got {len(a)} and {len(b)}')
  lower = stats.ttest_ind(a + margin, b, equal_var=False, alternative='greater')
  upper = stats.ttest_ind(a - margin, b, equal_var=False, alternative='less')
  ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(1 - 2 * alpha)
  p = float(max(lower.pvalue, upper.pvalue))
  return Equivalence(diff=float(a.mean() - b.mean()), p_value=p,
                     interval=(float(ci.low), float(ci.high)), equivalent=p < alpha)


@dataclasses.dataclass(frozen=True)
class RegimeScores:
  """Test sequence accuracy (%) per seed of the selection runs of one candidate regime.

  cost: what one LoRA r4 run of the regime costs (CPU seconds, measured), to order candidates.
  """
  name: str
  floor: Sequence[float]
  ceiling: Sequence[float]
  lora_r4: Sequence[float]
  lora_r8: Sequence[float]
  lora_r32: Sequence[float]
  cost: float


@dataclasses.dataclass(frozen=True)
class Verdict:
  name: str
  passes: bool
  checks: Mapping[str, bool]
  equivalence: Equivalence | None
  headroom: float
  floor: float
  reasons: tuple[str, ...]


def judge(r: RegimeScores) -> Verdict:
  """Applies the rule's four checks to one candidate."""
  reasons = []
  seeds_ok = min(len(r.lora_r4), len(r.lora_r32)) >= MIN_SEEDS
  if not seeds_ok:
    reasons.append(f'r4/r32 have {len(r.lora_r4)}/{len(r.lora_r32)} seeds, the rule needs '
                   f'{MIN_SEEDS}')
  eq = equivalence_test(r.lora_r32, r.lora_r4) if min(len(r.lora_r4), len(r.lora_r32)) >= 2 else None
  if eq is not None and not eq.equivalent:
    reasons.append(f'c1 fails: r32 - r4 = {eq.diff:+.2f}, 90% interval '
                   f'[{eq.interval[0]:+.2f}, {eq.interval[1]:+.2f}] not inside '
                   f'+-{EQUIVALENCE_MARGIN:g}')
  headroom = float(np.mean(r.ceiling) - np.mean(r.lora_r4))
  if headroom < MIN_HEADROOM:
    reasons.append(f'ceiling - r4 = {headroom:.2f} < {MIN_HEADROOM:g} points')
  floor = float(np.mean(r.floor))
  if floor >= MAX_FLOOR:
    reasons.append(f'floor {floor:.2f} >= {MAX_FLOOR:g}%')
  checks = {'seeds': seeds_ok, 'c1_equivalence': bool(eq and eq.equivalent),
            'headroom': headroom >= MIN_HEADROOM, 'floor': floor < MAX_FLOOR}
  return Verdict(r.name, all(checks.values()), checks, eq, headroom, floor, tuple(reasons))


def decide(candidates: Sequence[RegimeScores]) -> tuple[Verdict | None, list[Verdict]]:
  """(the cheapest passing regime's verdict or None, every candidate's verdict by cost)."""
  verdicts = [judge(r) for r in sorted(candidates, key=lambda r: r.cost)]
  return next((v for v in verdicts if v.passes), None), verdicts


def closest(verdicts: Sequence[Verdict]) -> Verdict | None:
  """The failing candidate that fails the fewest checks (ties: the cheaper), to label as failing."""
  failing = [v for v in verdicts if not v.passes]
  return min(failing, key=lambda v: sum(not ok for ok in v.checks.values()), default=None)
