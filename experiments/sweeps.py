"""The paper's experiments as data: each sweep is a list of named runs (gin files, overrides, seed).

A `Run` is one fine-tuning (or one evaluation of the frozen base: the floor) on the bundled
benchmark; a `Sweep` groups runs that answer one of the paper's claims (c1-c7, see README), plus the
base they all start from and how they are evaluated. `experiments/runner.py` executes a sweep,
`experiments/report.py` turns its result files into a markdown report with plots.

Runs are identified by their content (`Run.key`: gin files, bindings, seed, learning rate), so the
same run in two sweeps is trained once and its result file is shared.

Tuning budget, the same for every method (`tuned`): the learning-rate grid `LR_GRID` is run with the
tuning seeds `TUNE_SEEDS`; the rate with the best mean validation sequence accuracy over them is
chosen (`choose_learning_rate`; ties: the better validation token accuracy, then the lower rate),
and the remaining seeds run at that rate only. Test numbers are
reported at the chosen rate over all seeds. An ablation of one knob of a tuned method (c4-c6: SiRA's
experts, capacity, dropout, k, aux factor) inherits that method's chosen rate (`inheriting`,
`Run.lr_from`) instead of being tuned again. Full fine-tuning (the ceiling) gets its own grid
`FULL_FT_LR_GRID` (it trains 30x more parameters; adapter rates make it diverge).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

# The benchmark (gin/benchmark/*.gin): frozen base pretrained by `BASE`, fine-tuned on
# `offline_bench` (tasks/offline_suite.py), evaluated on the first EVAL_EXAMPLES validation and test
# examples of each task.
BASE_GIN = ('benchmark/pretrain.gin',)
FINETUNE_GIN = ('benchmark/finetune.gin',)
FULL_FINETUNE_GIN = ('benchmark/full_finetune.gin',)
SEEDS = (0, 1, 2)
TUNE_SEEDS = (0,)
LR_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
# Examples per task decoded and scored in each of validation and test (30 tasks: 1,500 per split and
# run; the standard error of one run's sequence accuracy near 10% is about 0.8 points).
EVAL_EXAMPLES = 50
FULL_FT_LR_GRID = (3e-4, 1e-3, 3e-3)

ADAPTER_GIN = {
    'lora': 'adapters/lora.gin',
    'sira': 'adapters/sira.gin',
    'molora': 'adapters/molora.gin',
    'adamix': 'adapters/adamix.gin',
    'smoe_dropout': 'adapters/smoe_dropout.gin',
}


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run (kind 'finetune') or one evaluation of the frozen base (kind 'floor').

  point: the configuration this run measures (seeds and learning rates of a point are aggregated);
  gin_files / bindings: what `sira_jax.train` parses (the runner adds MODEL_DIR, SEED,
  LEARNING_RATE and INITIAL_CHECKPOINT_PATH); axes: plot coordinates, e.g. {'method': 'lora',
  'rank': 8}. lr_from: a point of the same sweep whose tuning runs choose this run's learning
  rate (`learning_rate` stays None until the runner resolves it, `with_learning_rate`).
  evaluation: how the run is scored where its sweep departs from the default (the sweep sets it:
  `Sweep.evaluation_protocol`); part of the key, so a run scored another way has its own result.
  """
  point: str
  gin_files: tuple[str, ...]
  bindings: tuple[str, ...] = ()
  seed: int = 0
  learning_rate: float | None = None
  axes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  kind: str = 'finetune'
  lr_from: str | None = None
  evaluation: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.kind not in ('finetune', 'floor'):
      raise ValueError(f'Run.kind must be "finetune" or "floor", got {self.kind!r}')
    if self.lr_from is not None and self.kind != 'finetune':
      raise ValueError(f'Run {self.point!r}: only a finetune run can take its rate from a point')
    object.__setattr__(self, 'gin_files', tuple(self.gin_files))
    object.__setattr__(self, 'bindings', tuple(self.bindings))
    object.__setattr__(self, 'axes', dict(self.axes))
    object.__setattr__(self, 'evaluation', dict(self.evaluation))

  @property
  def key(self) -> str:
    """Content hash: the same run in two sweeps has the same key (and one result file)."""
    lr = self.learning_rate if self.resolved else f'tuned by {self.lr_from}'
    content = [self.kind, self.gin_files, self.bindings, self.seed, lr]
    if self.evaluation:  # (absent by default: the keys of runs scored as before stay)
      content.append(self.evaluation)
    blob = json.dumps(content, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]

  @property
  def resolved(self) -> bool:
    """False while the learning rate still waits for the tuning runs of `lr_from`."""
    return self.lr_from is None or self.learning_rate is not None

  def with_learning_rate(self, learning_rate: float) -> 'Run':
    """This run at the rate its `lr_from` point's tuning chose (the same key as any run with
    that rate, so a grid run already trained at it is reused)."""
    return dataclasses.replace(self, learning_rate=float(learning_rate))

  @property
  def name(self) -> str:
    lr = ('-lrtuned' if not self.resolved else
          '' if self.learning_rate is None else f'-lr{self.learning_rate:g}')
    return f'{self.point}{lr}-s{self.seed}'

  def as_dict(self) -> dict:
    out = dict(point=self.point, name=self.name, key=self.key, kind=self.kind,
               gin_files=list(self.gin_files), bindings=list(self.bindings), seed=self.seed,
               learning_rate=self.learning_rate, lr_from=self.lr_from, axes=dict(self.axes))
    if self.evaluation:
      out['evaluation'] = dict(self.evaluation)
    return out


@dataclasses.dataclass(frozen=True)
class Sweep:
  """Runs answering one claim, the base they share and how they are evaluated.

  base_gin / base_bindings: the pretraining run of the frozen base (cached by content).
  eval_splits: decoded and scored splits; `select_split` picks the learning rate, `report_split`
  is reported. eval_num_examples: per task (None: all; default EVAL_EXAMPLES). plots: (x axis,
  series axis) pairs over `Run.axes`. routing_point: the point whose checkpoint gets the routing
  analysis. training_evidence: the evidence per point a diagnostic sweep reports (and decides on)
  besides `report_split`'s metrics, e.g. TRAIN_CE_LAST_100 (`experiments.report`). extra_bindings:
  the bindings `with_overrides` appended to every run and the base (a command line's `--binding`s;
  each must be used by the base's or some run's gin config).
  split_num_examples: ((split, examples per task or None for all), ...) where a split departs
  from `eval_num_examples` (`num_examples`). select_checkpoint_every: None (score the run's last
  checkpoint), or the fraction of a run's steps between the checkpoints the runner keeps and
  scores on `select_split` (0.1: every tenth of the run); `report_split` is then scored on the
  checkpoint with the best `metric` there (ties: the earlier step; `checkpoint_interval`,
  `experiments.checkpoint_selection`). Either setting is stamped into every run
  (`Run.evaluation`), so their keys differ from runs scored the default way.
  claim_id: which claim's comparisons and verdict the sweep's results answer (`experiments.report`
  reads it): 'c1' .. 'c7' for the claim sweeps, also in a regime ('c3' for 'c3@data_limited');
  default: the sweep's name up to '@'.
  """
  name: str
  claim: str
  runs: tuple[Run, ...]
  base_gin: tuple[str, ...] = BASE_GIN
  base_bindings: tuple[str, ...] = ()
  eval_splits: tuple[str, ...] = ('validation', 'test')
  select_split: str = 'validation'
  report_split: str = 'test'
  eval_num_examples: int | None = EVAL_EXAMPLES
  eval_batch_size: int = 128
  metric: str = 'sequence_accuracy'
  plots: tuple[tuple[str, str], ...] = ()
  routing_points: tuple[str, ...] = ()
  training_evidence: tuple[str, ...] = ()
  extra_bindings: tuple[str, ...] = ()
  split_num_examples: tuple[tuple[str, int | None], ...] = ()
  select_checkpoint_every: float | None = None
  claim_id: str = ''

  def __post_init__(self):
    if not self.claim_id:
      object.__setattr__(self, 'claim_id', self.name.split('@')[0])
    object.__setattr__(self, 'split_num_examples', tuple(map(tuple, self.split_num_examples)))
    unknown = [s for s, _ in self.split_num_examples if s not in self.eval_splits]
    if unknown:
      raise ValueError(f'sweep {self.name!r}: split_num_examples names {unknown}, which are not '
                       f'among eval_splits {self.eval_splits}')
    every = self.select_checkpoint_every
    if every is not None and not 0 < every <= 1:
      raise ValueError(f'sweep {self.name!r}: select_checkpoint_every must be a fraction of the '
                       f'run in (0, 1], e.g. 0.1 for every tenth; got {every!r}')
    protocol = self.evaluation_protocol()
    object.__setattr__(self, 'runs', tuple(dataclasses.replace(r, evaluation=protocol)
                                           for r in self.runs))
    names = [r.name for r in self.runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
      raise ValueError(f'sweep {self.name!r}: run names must be unique, repeated: {dup}')
    if self.select_split not in self.eval_splits or self.report_split not in self.eval_splits:
      raise ValueError(f'sweep {self.name!r}: select/report splits must be among '
                       f'{self.eval_splits}')
    for r in self.runs:
      if r.lr_from is not None and not self.tuning_runs(r.lr_from):
        raise ValueError(f'sweep {self.name!r}: run {r.name!r} takes its learning rate from '
                         f'{r.lr_from!r}, which has no tuning runs (seeds {TUNE_SEEDS} over a '
                         'learning-rate grid) in this sweep')

  def points(self) -> list[str]:
    return list(dict.fromkeys(r.point for r in self.runs))

  def num_examples(self, split: str) -> int | None:
    """Examples per task scored on `split` (None: all)."""
    return dict(self.split_num_examples).get(split, self.eval_num_examples)

  def evaluation_protocol(self) -> dict[str, Any]:
    """What `Run.evaluation` holds for this sweep's runs: {} when it scores the default way
    (`eval_num_examples` on every split, the last checkpoint), else the examples per task of each
    split and the checkpoint selection."""
    if not self.split_num_examples and self.select_checkpoint_every is None:
      return {}
    return dict(num_examples={s: self.num_examples(s) for s in self.eval_splits},
                select_checkpoint_every=self.select_checkpoint_every,
                select_on=[self.select_split, self.metric])

  def checkpoint_interval(self, train_steps: int) -> int | None:
    """Steps between the checkpoints scored on validation for a run of `train_steps` (None: no
    selection): round(select_checkpoint_every * train_steps), at least 1."""
    if self.select_checkpoint_every is None:
      return None
    return max(1, round(self.select_checkpoint_every * train_steps))

  def tuning_runs(self, point: str) -> list[Run]:
    """The runs of `point` that choose its learning rate: tuning seeds, explicit rates."""
    return [r for r in self.runs if r.point == point and r.lr_from is None
            and r.learning_rate is not None and r.seed in TUNE_SEEDS]


# Breaks a tie of the validation metric between rates (e.g. every rate at 0 sequence accuracy):
# the same split's teacher-forced token accuracy, then the smaller rate.
TIE_BREAK_METRIC = 'token_accuracy'


def choose_learning_rate(scores: Mapping[float, Sequence[float]],
                         tie_break: Mapping[float, Sequence[float]] | None = None) -> float:
  """The rate with the best mean score (validation metric of the tuning seeds); a tie goes to the
  best mean `tie_break` score (validation token accuracy), then to the smaller rate."""
  if not scores:
    raise ValueError('no tuning results to choose a learning rate from')
  tie_break = tie_break or {}

  def rank(lr):
    tb = tie_break.get(lr)
    return float(np.mean(scores[lr])), float(np.mean(tb)) if tb else -math.inf

  return max(sorted(scores), key=rank)


def chosen_learning_rate(sweep: 'Sweep', point: str,
                         results: Mapping[float, Sequence[tuple[Run, Mapping[str, Any]]]]
                         ) -> tuple[float, dict[float, list[float]]]:
  """(rate, {rate: scores}) of `point`, the one choice the runner and the report make:
  `choose_learning_rate` over the validation metric (`sweep.select_split` summary's
  `sweep.metric`, ties broken by its TIE_BREAK_METRIC) of the point's tuning runs among `results`
  ({rate: [(run, result dict)]}), or of every given run where none is a tuning run (e.g. one
  fixed rate)."""
  tuning = {r.key for r in sweep.tuning_runs(point)}
  summary = lambda res: res['metrics'][sweep.select_split]['summary']  # noqa: E731

  def per_rate(metric, only_tuning):
    out = {lr: [summary(res)[metric] for r, res in v
                if (r.key in tuning or not only_tuning) and metric in summary(res)]
           for lr, v in results.items()}
    return {lr: v for lr, v in out.items() if v}

  only_tuning = bool(per_rate(sweep.metric, True))
  scores = per_rate(sweep.metric, only_tuning)
  return choose_learning_rate(scores, per_rate(TIE_BREAK_METRIC, only_tuning)), scores


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
def grid(point: str, gin_files: Sequence[str], bindings: Sequence[str] = (), *,
         axes: Mapping[str, Any] | None = None, seeds: Sequence[int] = SEEDS,
         learning_rates: Sequence[float | None] = LR_GRID, kind: str = 'finetune') -> list[Run]:
  """Every (learning rate, seed) of one point."""
  return [Run(point=point, gin_files=tuple(gin_files), bindings=tuple(bindings), seed=s,
              learning_rate=lr, axes=dict(axes or {}), kind=kind)
          for lr in learning_rates for s in seeds]


def tuned(point: str, gin_files: Sequence[str], bindings: Sequence[str] = (), *,
          axes: Mapping[str, Any] | None = None, seeds: Sequence[int] = SEEDS,
          learning_rates: Sequence[float] = LR_GRID) -> list[Run]:
  """One point under the tuning protocol: `learning_rates` x `TUNE_SEEDS`, then the other seeds
  at the chosen rate (`lr_from` = this point)."""
  runs = grid(point, gin_files, bindings, axes=axes, seeds=TUNE_SEEDS,
              learning_rates=learning_rates)
  return runs + inheriting(point, gin_files, bindings, lr_from=point, axes=axes,
                           seeds=[s for s in seeds if s not in TUNE_SEEDS])


def inheriting(point: str, gin_files: Sequence[str], bindings: Sequence[str] = (), *,
               lr_from: str, axes: Mapping[str, Any] | None = None,
               seeds: Sequence[int] = SEEDS) -> list[Run]:
  """Every seed of one point at the learning rate chosen by the tuning runs of point `lr_from`."""
  return [Run(point=point, gin_files=tuple(gin_files), bindings=tuple(bindings), seed=s,
              axes=dict(axes or {}), lr_from=lr_from) for s in seeds]


def method_runs(method: str, point: str | None = None, bindings: Sequence[str] = (), *,
                axes: Mapping[str, Any] | None = None, seeds: Sequence[int] = SEEDS,
                lr_from: str | None = None,
                finetune_gin: Sequence[str] = FINETUNE_GIN) -> list[Run]:
  """Runs of one adapter method (`ADAPTER_GIN` key) with extra gin bindings: tuned, or at the
  rate chosen for point `lr_from`."""
  gin_files = (ADAPTER_GIN[method], *finetune_gin)
  axes = dict({'method': method}, **(axes or {}))
  if lr_from is not None:
    return inheriting(point or method, gin_files, bindings, lr_from=lr_from, axes=axes,
                      seeds=seeds)
  return tuned(point or method, gin_files, bindings, axes=axes, seeds=seeds)


def floor_run(bindings: Sequence[str] = ()) -> list[Run]:
  """The frozen base evaluated as is (no adapter, no training): one run, seedless; bindings
  choose the evaluated data (e.g. `single_task()`)."""
  return [Run(point='floor (frozen base)', gin_files=FINETUNE_GIN, bindings=tuple(bindings),
              seed=0, kind='floor', axes={'method': 'floor'})]


def ceiling_runs(seeds: Sequence[int] = SEEDS, bindings: Sequence[str] = ()) -> list[Run]:
  """Full fine-tuning of every parameter from the same base (the ceiling)."""
  return tuned('ceiling (full fine-tuning)', FULL_FINETUNE_GIN, bindings, seeds=seeds,
               learning_rates=FULL_FT_LR_GRID, axes={'method': 'full_ft'})


# SiRA's defaults in the benchmark (gin/adapters/sira.gin: k=2, cf=1.25, expert dropout 0.1),
# with E=8 experts of rank 4 on every adapted projection.
SIRA_E = 8
RANK = 4
SIRA = f'sira E{SIRA_E} k2'
# SiRA's active rank: the k=2 experts of rank RANK a token goes through (k·r); LoRA at this rank is
# the matched-rank comparison of the claims in a regime (`claim_sweeps`).
SIRA_TOP_K = 2
ACTIVE_RANK = SIRA_TOP_K * RANK
ACTIVE_RANK_POINT = f'lora r{ACTIVE_RANK} (SiRA active rank k·r)'
C1_RANKS = (4, 8, 16, 32, 64)
# SiRA's defaults for the claims in a regime, frozen from the training-evidence study
# (experiments/SIRA_DEFAULTS.md, the `sira_defaults` sweep): each token's kept top-k gates
# renormalised to sum to 1, as MoLoRA's and SMoE-Dropout's gates already do. gin/adapters/sira.gin
# keeps the flaxformer convention (not renormalised), and so do the first regime's runs (c1-c7):
# a run's key names its bindings, not the gin files' contents.
SIRA_FROZEN_BINDINGS = ('adapter/AdapterConfig.renormalize_gates=True',)


def _sira(point: str, extra: Sequence[str] = (), axes=None, **kw) -> list[Run]:
  """SiRA (E=SIRA_E) with `extra` bindings; an ablation point (point != SIRA) inherits SIRA's
  learning rate."""
  if point != SIRA:
    kw.setdefault('lr_from', SIRA)
  return method_runs('sira', point, (f'NUM_EXPERTS={SIRA_E}', *extra), axes=axes, **kw)


def single_task(mixture: str = 'offline_unit_ru') -> tuple[str, ...]:
  return (f"MIXTURE_OR_TASK_NAME='{mixture}'",)


def _comparison(extra: Sequence[str] = (), seeds: Sequence[int] = SEEDS,
                in_regime: bool = False, sira_bindings: Sequence[str] = ()) -> list[Run]:
  """c2/c3: LoRA vs AdaMix vs MoLoRA vs SiRA at matched rank and at matched trainable params.

  in_regime (the claims in a regime candidate, `claim_sweeps`): every LoRA binds its rank
  explicitly, after `extra`, as the candidate's selection sweep does (`regime_sweep`), so the
  LoRA r4, r8 and r32 runs the selection trained are the same runs (same keys, reused); and LoRA
  at SiRA's active rank (`ACTIVE_RANK` = k·r) joins the matched-rank comparison. sira_bindings:
  SiRA's own, after `extra` (SIRA_FROZEN_BINDINGS in a regime)."""
  e = f'NUM_EXPERTS={SIRA_E}'

  def lora(rank):
    return (*extra, f'ADAPTER_RANK={rank}') if in_regime or rank != RANK else tuple(extra)

  # In the order a partial sweep is most useful in: the floor, LoRA and SiRA first.
  runs = floor_run(extra)
  runs += method_runs('lora', f'lora r{RANK}', lora(RANK), axes={'rank': RANK}, seeds=seeds)
  runs += method_runs('sira', SIRA, (e, *extra, *sira_bindings), seeds=seeds)
  if in_regime:
    runs += method_runs('lora', ACTIVE_RANK_POINT, lora(ACTIVE_RANK), axes={'rank': ACTIVE_RANK},
                        seeds=seeds)
  runs += method_runs('lora', f'lora r{RANK * SIRA_E} (params of E={SIRA_E})', lora(RANK * SIRA_E),
                      axes={'rank': RANK * SIRA_E}, seeds=seeds)
  runs += method_runs('molora', f'molora E{SIRA_E}', (*extra, e), seeds=seeds)
  # IDENTICAL_EXPERT_INIT is adamix.gin's default; binding it here keys these runs apart from the
  # first AdaMix runs (independent draws per expert; their result files stay in results/runs/,
  # outside the sweep, and the README compares the two).
  runs += method_runs('adamix', f'adamix E{SIRA_E}', (*extra, e, 'IDENTICAL_EXPERT_INIT=True'),
                      seeds=seeds)
  runs += ceiling_runs(seeds, extra)
  return runs


# The paper's claims, c1-c7 (README): what each claim sweep tests.
CLAIMS = {
    'c1': 'Raising LoRA\'s rank does not help (rank 4 to 64).',
    'c2': 'Single task: SiRA beats LoRA, AdaMix and MoLoRA at matched rank and at matched '
          'trainable parameters.',
    'c3': 'Multitask (30 tasks, 10 languages, no task ids): SiRA beats LoRA, AdaMix and MoLoRA '
          'at matched rank and at matched trainable parameters.',
    'c4': 'More experts help SiRA (E = 2 to 16, k=2).',
    'c5': 'Capacity matters: a capacity limit (cf) trades dropped tokens against accuracy.',
    'c6': 'SiRA\'s expert dropout beats no dropout and SMoE-Dropout; its rate and placement, k, '
          'the aux-loss factor and gate renormalisation.',
    'c7': 'Experts specialise by task and language without task ids.',
}


def claim_sweeps(candidate: str | None = None) -> list[Sweep]:
  """Sweeps c1-c7: as first run (candidate None: 600 steps on the whole benchmark, 50 examples per
  task on validation and test, the last checkpoint; names 'c1' .. 'c7'), or in the regime
  candidate `candidate` of `REGIME_CANDIDATES` (names 'c1@<candidate>' ..).

  In a candidate every run (floor included) binds the candidate's bindings, starts from its base
  (base gin) and is scored as its selection runs are (`regime_sweep`: REGIME_SPLIT_EXAMPLES,
  checkpoint choice on validation every REGIME_CHECKPOINT_EVERY of the run; one rule for every
  method), so a run equal to a selection run (point bindings, seed, rate) has its key and its
  result. There:
    - c1: LoRA r4, r8, r16, r32, r64, each at REGIME_SEEDS (the selection's power for r4 and r32,
      extended to every rank; r4 and r32 are the selection's runs, r8's first SEEDS too), or at
      SEEDS for all but r4 and r32 in the candidates of REGIME_BUDGET_TRIMMED;
    - c2 and c3, the headline comparisons: every point at HEADLINE_SEEDS, LoRA at SiRA's active
      rank k·r added (`_comparison`); c2 on `C2_TASK` (its test split: every example of it);
    - c4-c6, ablations: ABLATION_SEEDS, each inheriting SiRA's rate (`_sira`; SMoE-Dropout, a
      method of its own, is tuned); SiRA's default point at HEADLINE_SEEDS (c3's runs); the
      points of `regime_dropped_points(candidate)` left out (the CPU budget);
    - c7: c3's SiRA runs.
  """
  if candidate is None:
    extra, single, suffix, scoring = (), single_task(), '', {}
    headline = ablation = SEEDS
  else:
    _, extra, base_gin = REGIME_CANDIDATES[candidate]
    # c2's task replaces the candidate's mixture (near_base's held-out 15 include ru).
    single = (*(b for b in extra if not b.startswith('MIXTURE_OR_TASK_NAME')),
              *single_task(C2_TASK))
    suffix = f'@{candidate}'
    scoring = dict(base_gin=base_gin, split_num_examples=REGIME_SPLIT_EXAMPLES,
                   select_checkpoint_every=REGIME_CHECKPOINT_EVERY)
    headline, ablation = HEADLINE_SEEDS, ABLATION_SEEDS
  in_regime = candidate is not None
  # SiRA's runs: the candidate's bindings, then SiRA's frozen defaults (in a regime).
  sira_frozen = SIRA_FROZEN_BINDINGS if in_regime else ()
  sira_extra = (*extra, *sira_frozen)

  def sweep(claim, runs, **kw):
    if in_regime:
      dropped = regime_dropped_points(candidate)
      runs = [r for r in runs if r.point not in dropped]
    text = CLAIMS[claim] + (f' [regime {candidate!r}: the data, steps, base and scoring of '
                            f'regime_{candidate}]' if in_regime else '')
    return Sweep(claim + suffix, text, tuple(runs), claim_id=claim, **scoring, **kw)

  base = _sira(SIRA, sira_extra, axes={'experts': SIRA_E, 'capacity_factor': 1.25,
                                       'dropout': 'sira', 'expert_dropout_rate': 0.1, 'top_k': 2,
                                       'aux_factor': 0.01},
               seeds=headline)
  c1 = floor_run(extra)
  for rank in C1_RANKS:
    if in_regime:  # the selection's point names and bindings
      c1 += method_runs('lora', f'lora r{rank}', (*extra, f'ADAPTER_RANK={rank}'),
                        axes={'rank': rank}, seeds=c1_regime_seeds(candidate, rank))
    else:
      params = f' (params of E={SIRA_E})' if rank == RANK * SIRA_E else ''
      c1 += method_runs('lora', f'lora r{rank}{params}',
                        () if rank == RANK else (f'ADAPTER_RANK={rank}',), axes={'rank': rank})
  c4 = list(base)
  for e in (2, 4, 16):
    c4 += method_runs('sira', f'sira E{e} k2', (f'NUM_EXPERTS={e}', *sira_extra),
                      axes={'experts': e}, lr_from=SIRA, seeds=ablation)
  c5 = list(base)
  for cf in (0.5, 1.0, 2.0, 4.0):
    c5 += _sira(f'sira cf{cf:g}', (*sira_extra, f'CAPACITY_FACTOR={cf}'),
                axes={'capacity_factor': cf}, seeds=ablation)
  c6 = list(base)
  c6 += _sira('sira no expert dropout', (*sira_extra, 'EXPERT_DROPOUT_RATE=0.0'),
              axes={'dropout': 'none', 'expert_dropout_rate': 0.0}, seeds=ablation)
  c6 += method_runs('smoe_dropout', f'smoe_dropout E{SIRA_E}', (f'NUM_EXPERTS={SIRA_E}', *extra),
                    axes={'dropout': 'smoe_dropout'}, seeds=ablation)
  for rate in (0.05, 0.2, 0.3):
    c6 += _sira(f'sira expert dropout {rate:g}', (*sira_extra, f'EXPERT_DROPOUT_RATE={rate}'),
                axes={'dropout': 'sira', 'expert_dropout_rate': rate}, seeds=ablation)
  c6 += _sira('sira expert dropout 0.1 on logits',
              (*sira_extra, "adapter/AdapterConfig.expert_dropout_placement='logits'"),
              axes={'dropout': 'sira_logits'}, seeds=ablation)
  for k in (1, 4):
    c6 += _sira(f'sira E{SIRA_E} k{k}', (*sira_extra, f'TOP_K={k}'), axes={'top_k': k},
                seeds=ablation)
  for aux in (0.0, 0.1):
    c6 += _sira(f'sira aux {aux:g}', (*sira_extra, f'LossConfig.aux_factor={aux}'),
                axes={'aux_factor': aux}, seeds=ablation)
  # The paper does not state its gate normalisation (docs/design.md). The first regime's SiRA
  # keeps the flaxformer convention (top-k softmax probabilities as they are) and this point
  # rescales them to 1; in a regime SiRA's frozen default renormalises and this point does not.
  if in_regime:
    c6 += _sira('sira gates not renormalised',
                (*extra, 'adapter/AdapterConfig.renormalize_gates=False'),
                axes={'gates': 'not renormalised'}, seeds=ablation)
  else:
    c6 += _sira('sira renormalised gates', (*extra, 'adapter/AdapterConfig.renormalize_gates=True'),
                axes={'gates': 'renormalised'}, seeds=ablation)
  return [
      sweep('c1', c1, plots=(('rank', 'method'),)),
      sweep('c2', _comparison(single, headline, in_regime, sira_frozen), routing_points=(SIRA,)),
      sweep('c3', _comparison(extra, headline, in_regime, sira_frozen), routing_points=(SIRA,)),
      sweep('c4', c4, plots=(('experts', 'method'),), routing_points=('sira E16 k2',)),
      sweep('c5', c5, plots=(('capacity_factor', 'method'),), routing_points=('sira cf0.5', SIRA)),
      sweep('c6', c6, plots=(('expert_dropout_rate', 'method'), ('top_k', 'method'),
                             ('aux_factor', 'method'))),
      sweep('c7', base, routing_points=(SIRA,)),
  ]


def _sweeps() -> dict[str, Sweep]:
  s = {sw.name: sw for sw in claim_sweeps()}
  s['sira_defaults'] = sira_defaults_sweep()
  s.update((sw.name, sw) for sw in regime_sweeps())
  for candidate in REGIME_CANDIDATES:
    s.update((sw.name, sw) for sw in claim_sweeps(candidate))
  return s


# The training cross-entropy over a run's last 100 steps (mean of its logged steps among them):
# what a diagnostic sweep reads from the run's train summary (`experiments.report`).
TRAIN_CE_LAST_100 = 'train_cross_entropy_last_100_steps'
# One SiRA knob changed at a time (point name, bindings, axes).
SIRA_DEFAULTS_VARIANTS = (
    ('sira renormalised gates', ('adapter/AdapterConfig.renormalize_gates=True',),
     {'gates': 'renormalised'}),
    ('sira router lr x0.1', ('train.router_lr_multiplier=0.1',), {'router_lr_multiplier': 0.1}),
    ('sira router lr x10', ('train.router_lr_multiplier=10.0',), {'router_lr_multiplier': 10.0}),
    ('sira router init 0.2', ('adapter/AdapterConfig.router_init_stddev=0.2',),
     {'router_init_stddev': 0.2}),
    ('sira no expert dropout', ('EXPERT_DROPOUT_RATE=0.0',), {'expert_dropout_rate': 0.0}),
    # cf = E / k: c_g = n_g, every expert can take every token of its group: no choice dropped.
    ('sira no capacity drops', (f'CAPACITY_FACTOR={SIRA_E / 2:g}',),
     {'capacity_factor': SIRA_E / 2}),
)


def sira_defaults_sweep() -> Sweep:
  """The candidate causes of SiRA's optimisation gap (c2: SiRA trains to a higher loss than LoRA
  on one task), each tested alone against SiRA as it is, on c2's single task.

  SiRA as it is: c2's `sira E8 k2` (k=2, cf 1.25, expert dropout 0.1 on the gates, top-k gates not
  renormalised, router at the adapter learning rate, normal(0.02) router init). One knob each:
    - gate mass: top-2 gates renormalised to sum 1 (not renormalised, a token gets about 0.31 of
      its expert pair's update at step 1);
    - router learning rate: x0.1 (the router collapses at 3e-2, router z-loss ~1e4: too fast?)
      and x10 (too slow at the small rates the grid chooses?), `train.router_lr_multiplier`;
    - router init: normal(0.2), 10x today's (a flat router at the start gives every expert about
      1/E of the gate mass); 0 is no option, top-k ties would route every token to experts 0, 1;
    - expert dropout off;
    - capacity drops off: cf = E/k = 4 (c_g = n_g).
  Every point runs the tuning protocol of c2's SiRA (`tuned`: `LR_GRID` on `TUNE_SEEDS`, the
  other seeds at the chosen rate). Every run logs every 10 steps (`train.log_every=10`), so the
  baseline is trained here again (another run key than c2's, the same training).

  Decided on training evidence only: per point, the training cross-entropy over the last 100
  steps (`TRAIN_CE_LAST_100`, from the run's train summary: the mean of its 10 logged steps there)
  and the validation sequence and token accuracy; the report split is validation, and no test
  number is read (the runner still scores test, so result files stay interchangeable). Every
  point gets the routing analysis (its training-batch drops and gate mass show what each knob
  changed in training).

  Fairness rule: every method gets the same number of tuned configurations. A knob this study
  finds for SiRA becomes SiRA's default only if it is tuned for the baselines too (the router
  knobs for MoLoRA, the other router-trained method; gate renormalisation for every mixture), or
  it is fixed, as here, from training evidence without tuning it for any method; never tuned for
  SiRA alone.
  """
  extra = (*single_task(), f'NUM_EXPERTS={SIRA_E}', 'train.log_every=10')
  runs = method_runs('sira', SIRA, extra, axes={'knob': 'none (SiRA as it is)'})
  for point, bindings, axes in SIRA_DEFAULTS_VARIANTS:
    runs += method_runs('sira', point, (*extra, *bindings), axes=dict(axes, knob=point))
  return Sweep(
      'sira_defaults', 'Which of SiRA\'s defaults causes its optimisation gap on one task (a '
      'diagnostic study decided on training loss and validation metrics, never test).',
      tuple(runs), report_split='validation', training_evidence=(TRAIN_CE_LAST_100,),
      routing_points=tuple(dict.fromkeys(r.point for r in runs)))


# ------------------------------------------------------------------------------------------------
# The regime selection (experiments/PREREGISTRATION.md; the rule: experiments/regime_rule.py)
# ------------------------------------------------------------------------------------------------
# Seeds of LoRA r4 and r32 (the rule's MIN_SEEDS); r8 and the ceiling run SEEDS.
REGIME_SEEDS = (0, 1, 2, 3, 4, 5)
# Validation: the first 50 examples of each task (learning rate and checkpoint choice); test: all.
REGIME_SPLIT_EXAMPLES = (('validation', 50), ('test', None))
# The checkpoint scored on test: the best on validation among those at every tenth of the run.
REGIME_CHECKPOINT_EVERY = 0.1
# The claims in a regime (`claim_sweeps`): seeds of every point of the headline comparisons (c2,
# c3), and of the ablations (c4-c6); each point's learning-rate grid runs on TUNE_SEEDS as ever.
HEADLINE_SEEDS = (0, 1, 2, 3, 4)
ABLATION_SEEDS = SEEDS
# Ablation points the claims in a regime leave out, to fit the CPU budget (experiments/REGIME.md,
# "The claims in the chosen regime"; `experiments.claims_cost`): in c5 cf 2 (0.5, 1, the default
# 1.25 and 4 stay); in c6 the expert-dropout rates 0.05 and 0.3 (0.2 and none stay, beside the
# default 0.1), the placement on the router logits and aux factor 0.1 (0 stays). c6's claim
# (no expert dropout, SMoE-Dropout), k and gate renormalisation stay.
REGIME_DROPPED_POINTS = frozenset({
    'sira cf2', 'sira expert dropout 0.05', 'sira expert dropout 0.3',
    'sira expert dropout 0.1 on logits', 'sira aux 0.1'})
# The costlier candidates' further trim (experiments/REGIME.md, "The budget trim"): fixed on
# 2026-12-08 from the selection's measured LoRA r4 costs, before either candidate's selection sweep
# and before any mixture run in a regime. There c1's ranks other than REGIME_POWER_RANKS run SEEDS,
# and these ablation points are left out: c4's E4 (E2, the default E8 and E16 stay), c5's cf 1
# (0.5, the default 1.25 and 4 stay), c6's expert-dropout rate 0.2 and k = 4 (none, SMoE-Dropout,
# k = 1, aux factor 0 and the unrenormalised gates stay).
REGIME_BUDGET_TRIMMED = frozenset({'data_limited', 'converged'})
REGIME_BUDGET_DROPPED_POINTS = frozenset({
    'sira E4 k2', 'sira cf1', 'sira expert dropout 0.2', 'sira E8 k4'})
# c1's ranks with the rule's REGIME_SEEDS in every candidate (the selection's r4 and r32).
REGIME_POWER_RANKS = (4, 32)


def regime_dropped_points(candidate: str) -> frozenset[str]:
  """The ablation points the claims in `candidate` leave out (the CPU budget)."""
  trimmed = REGIME_BUDGET_DROPPED_POINTS if candidate in REGIME_BUDGET_TRIMMED else frozenset()
  return REGIME_DROPPED_POINTS | trimmed


def c1_regime_seeds(candidate: str, rank: int) -> tuple[int, ...]:
  """Seeds of LoRA at `rank` in c1@candidate: REGIME_SEEDS, or SEEDS for the ranks other than
  REGIME_POWER_RANKS in a candidate of REGIME_BUDGET_TRIMMED."""
  if candidate in REGIME_BUDGET_TRIMMED and rank not in REGIME_POWER_RANKS:
    return SEEDS
  return REGIME_SEEDS


# c2's single task in a regime: c2's task as first run ('offline_unit_ru') with 500 test examples
# (its 200 and 300 more; train and validation its own; tasks/offline_suite.py).
C2_TASK = 'offline_unit_ru_test500'
# The runs the rule reads: RegimeScores field -> the point of a regime sweep.
REGIME_POINTS = {'floor': 'floor (frozen base)', 'ceiling': 'ceiling (full fine-tuning)',
                 'lora_r4': 'lora r4', 'lora_r8': 'lora r8', 'lora_r32': 'lora r32'}
# candidate -> (what it changes, its bindings (fine-tuning and floor), its base's gin files).
REGIME_CANDIDATES = {
    'data_limited': ('the first 64 training examples of each of the 30 tasks, 1,200 steps',
                     ('TRAIN_EXAMPLES_PER_TASK=64', 'TRAIN_STEPS=1200'), BASE_GIN),
    'converged': ('all 2,000 training examples of each task, 4,800 steps',
                  ('TRAIN_STEPS=4800',), BASE_GIN),
    'near_base': ('a base also pretrained on the 15 tasks of en, de, fr, es, it; fine-tuned on '
                  'the 15 of pt, ru, pl, tr, fi, 600 steps',
                  ("MIXTURE_OR_TASK_NAME='offline_bench_held_out'", 'TRAIN_STEPS=600'),
                  ('benchmark/pretrain_near.gin',)),
}


def regime_sweep(candidate: str) -> Sweep:
  """The selection runs of one candidate regime (`regime_<candidate>`), as registered: the floor;
  LoRA r4 and r32 (LR_GRID on TUNE_SEEDS, the other REGIME_SEEDS at the chosen rate) and r8 (SEEDS,
  the same protocol); the ceiling (FULL_FT_LR_GRID, SEEDS). Every run is scored with the
  registered protocol: validation on REGIME_SPLIT_EXAMPLES' 50 examples per task at every tenth
  of the run, test on all examples at the best validation checkpoint."""
  what, bindings, base_gin = REGIME_CANDIDATES[candidate]
  runs = floor_run(bindings)
  for rank, seeds in ((4, REGIME_SEEDS), (32, REGIME_SEEDS), (8, SEEDS)):
    runs += method_runs('lora', REGIME_POINTS[f'lora_r{rank}'], (*bindings, f'ADAPTER_RANK={rank}'),
                        axes={'rank': rank}, seeds=seeds)
  runs += ceiling_runs(SEEDS, bindings)
  return Sweep(
      f'regime_{candidate}', f'Regime candidate {candidate!r} ({what}): does LoRA\'s rank '
      'saturate there (experiments/PREREGISTRATION.md)?', tuple(runs), base_gin=base_gin,
      split_num_examples=REGIME_SPLIT_EXAMPLES, select_checkpoint_every=REGIME_CHECKPOINT_EVERY,
      plots=(('rank', 'method'),))


def regime_sweeps() -> list[Sweep]:
  return [regime_sweep(c) for c in REGIME_CANDIDATES]


SWEEPS: dict[str, Sweep] = _sweeps()


def with_overrides(sweep: Sweep, bindings: Sequence[str] = (),
                   eval_num_examples: int | None = None) -> Sweep:
  """`sweep` with extra gin bindings appended to every run and to its base (e.g. tiny sizes for a
  smoke run), and optionally fewer evaluation examples per task (on every split). The runs get
  other keys, so their results never mix with the unmodified sweep's."""
  if not bindings and eval_num_examples is None:
    return sweep
  runs = tuple(dataclasses.replace(r, bindings=(*r.bindings, *bindings)) for r in sweep.runs)
  sizes = {} if eval_num_examples is None else dict(eval_num_examples=eval_num_examples,
                                                    split_num_examples=())
  return dataclasses.replace(
      sweep, runs=runs, base_bindings=(*sweep.base_bindings, *bindings),
      extra_bindings=(*sweep.extra_bindings, *bindings), **sizes)


def get_sweep(name: str) -> Sweep:
  if name not in SWEEPS:
    raise ValueError(f'unknown sweep {name!r}; known: {sorted(SWEEPS)}')
  return SWEEPS[name]
