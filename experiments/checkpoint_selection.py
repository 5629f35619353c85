"""Checkpoint choice on validation, one rule for every method (experiments/PREREGISTRATION.md).

Under a sweep's `select_checkpoint_every` the runner has a run keep its checkpoints at every
`interval` steps (`Sweep.checkpoint_interval`) and at its last step (`checkpoint_bindings`: orbax
keeps them all), scores each on the sweep's `select_split` (`select`), and scores the report split
on the step with the best `metric` there, ties going to the earlier step (`best_step`). The result
file records the curve (step -> metric) and the chosen step.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping


def scored_steps(train_steps: int, interval: int) -> list[int]:
  """The steps whose checkpoints are scored: every `interval` steps, and the last step."""
  if train_steps < 1 or interval < 1:
    raise ValueError(f'train_steps and interval must be >= 1, got {train_steps} and {interval}')
  steps = list(range(interval, train_steps + 1, interval))
  return steps if steps and steps[-1] == train_steps else [*steps, train_steps]


def checkpoint_bindings(train_steps: int, interval: int) -> list[str]:
  """The trainer's gin bindings that keep exactly the checkpoints `scored_steps` names (a save every
  `interval` steps, the forced save at the end, none deleted)."""
  return [f'train.checkpoint_every={interval}',
          f'train.keep_checkpoints={len(scored_steps(train_steps, interval))}']


def best_step(curve: Mapping[int, float]) -> int:
  """The step with the highest score; ties: the earliest of them."""
  if not curve:
    raise ValueError('no scored checkpoint to choose from')
  return max(sorted(curve), key=lambda step: curve[step])


@dataclasses.dataclass(frozen=True)
class Selection:
  """interval: steps between scored checkpoints; split / metric: what chose; curve: {step: metric};
  chosen_step: `best_step(curve)`; scores: {step: the split's full evaluation}."""
  interval: int
  split: str
  metric: str
  curve: Mapping[int, float]
  chosen_step: int
  scores: Mapping[int, Mapping[str, Any]]

  def as_dict(self) -> dict[str, Any]:
    """For the result file (JSON: steps as strings in `curve`, in step order)."""
    return dict(interval=self.interval, split=self.split, metric=self.metric,
                curve={str(s): self.curve[s] for s in sorted(self.curve)},
                chosen_step=self.chosen_step,
                summaries={str(s): dict(self.scores[s]['summary']) for s in sorted(self.scores)})


def select(model_dir: str, train_steps: int, interval: int,
           evaluate: Callable[[Any, Any, int], Mapping[str, Any]], *, split: str,
           metric: str) -> Selection:
  """Scores every checkpoint of `scored_steps` in the run `model_dir` and chooses one.

  evaluate(model, variables, step) -> {'summary': {metric: value}, ...} on `split` (e.g.
  `experiments.evaluation.evaluate_split`); each checkpoint is restored with
  `sira_jax.restore.load_trained`. A checkpoint missing from the run raises CheckpointError
  naming it (the run was trained keeping fewer: delete its directory and run it again).
  """
  from sira_jax import checkpoints as ckpt_lib
  from sira_jax import restore
  steps = scored_steps(train_steps, interval)
  mngr = ckpt_lib.CheckpointManager(os.path.join(model_dir, 'checkpoints'), create=False)
  try:
    kept = set(mngr.all_steps())
  finally:
    mngr.close()
  missing = [s for s in steps if s not in kept]
  if missing:
    raise ckpt_lib.CheckpointError(
        f'{model_dir} lacks the checkpoints of steps {missing} that checkpoint selection scores '
        f'(it holds {sorted(kept)}): delete that directory and run it again')
  scores = {}
  for step in steps:
    model, variables, _, _ = restore.load_trained(model_dir, step=step)
    scores[step] = evaluate(model, variables, step)
  curve = {s: float(scores[s]['summary'][metric]) for s in steps}
  return Selection(interval=interval, split=split, metric=metric, curve=curve,
                   chosen_step=best_step(curve), scores=scores)
