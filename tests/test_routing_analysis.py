"""experiments.evaluation's routing analysis: training-mode statistics on the run's own training
batches equal what the training step sows; evaluation mode at eval capacity None drops nothing."""
import jax
import numpy as np
import pytest

from experiments import evaluation
from sira_jax import data as data_lib
from sira_jax import model_init
from sira_jax import optim
from sira_jax import trainer as trainer_lib
from sira_jax.adapters import trainable_mask
from tests import trainer_fixtures

SEED, BATCH = 3, 8


@pytest.fixture(scope='module')
def setup():
  task = trainer_fixtures.register_fixture_task()
  # A low capacity factor: most choices are dropped in training, none at evaluation (None).
  cfg = trainer_fixtures.tiny_config('sira', capacity_factor=0.25, min_expert_capacity=1,
                                     expert_dropout_rate=0.1, eval_capacity_factor=None)
  model = model_init.build_model(cfg)
  variables = model_init.init_variables(model, cfg, SEED)
  stream = evaluation.TrainingStream.of_run(dict(
      mixture_or_task_name=task, task_feature_lengths=trainer_fixtures.LENGTHS, batch_size=BATCH,
      seed=SEED, data_seed=None, pack=True))
  return task, model, variables, stream


def test_training_stream_of_a_runs_fingerprint():
  stream = evaluation.TrainingStream.of_run(dict(
      mixture_or_task_name='t', task_feature_lengths={'inputs': 4}, batch_size=8, seed=2,
      data_seed=5, pack=True))
  assert (stream.seed, stream.data_seed, stream.pack) == (2, 5, True)
  assert evaluation.TrainingStream.of_run(dict(
      mixture_or_task_name='t', task_feature_lengths={}, batch_size=8, seed=2)).data_seed == 2


def test_train_batch_drops_equal_the_training_steps(setup):
  task, model, variables, stream = setup
  tx = optim.make_optimizer('adamw', 1e-2)
  state = trainer_lib.create_state(variables, tx, trainable_mask=trainable_mask(
      variables['params']), rng=model_init.run_keys(SEED)[1])
  step = jax.jit(trainer_lib.make_train_step(model, tx, trainer_lib.LossConfig()))
  batches = data_lib.train_batches(task, trainer_fixtures.LENGTHS, BATCH, seed=SEED, pack=True)
  sown = []
  for _ in range(2):  # step i on batch i, each measured on the params it ran with
    before = state.variables()
    state, metrics = step(state, next(batches), 10)
    sown.append((before, float(metrics['dropped_fraction'])))
  for i, (params, dropped) in enumerate(sown):
    r = evaluation.training_routing(model, params, stream, num_batches=i + 1)
    # The same routing decisions: the same counts of dropped and active choices per site (the
    # layer mean differs from the step's float32 mean in rounding only).
    assert r['per_batch_dropped_fraction'][i] == pytest.approx(dropped, rel=1e-6, abs=0)
    assert dropped > 0.3
  assert r['mode'] == 'train' and r['capacity_factor'] == 0.25 and r['num_batches'] == 2
  assert r['summary']['dropped_fraction'] == pytest.approx(
      np.mean(r['per_batch_dropped_fraction']), rel=1e-9)


def test_analysis_labels_train_and_eval_statistics(setup):
  task, model, variables, stream = setup
  # lora_b starts at zero, so the params do not move routing between the modes: only the mode
  # (capacity, expert dropout) and the batches differ.
  r = evaluation.routing_analysis(model, variables, task, trainer_fixtures.LENGTHS,
                                  split='validation', num_examples=12, batch_size=8,
                                  training=stream, train_batches=2)
  sites = r['sites']
  assert sites and r['num_experts'] == 4 and r['tasks'] == [task]
  ev, tr = r['eval'], r['train_batches']
  assert ev['mode'] == 'eval' and ev['capacity_factor'] is None and ev['split'] == 'validation'
  assert set(ev['dropped_fraction']) == set(sites) == set(tr['dropped_fraction'])
  assert all(v == 0.0 for v in ev['dropped_fraction'].values())      # no-drop evaluation
  assert all(v > 0.3 for v in tr['dropped_fraction'].values())       # cf 0.25 in training
  for part in (ev, tr):
    for s in sites:
      assert sum(part['load'][s]) == pytest.approx(1.0)
      assert 0.0 < part['gate_mass'][s] <= 1.0 / (1 - 0.1) + 1e-6
  # Top-2 of 4 nearly uniform experts, not renormalised: about half the mass per kept pair.
  assert all(0.4 < v < 0.6 for v in ev['gate_mass'].values())
  # Dropped choices carry no gate: less mass in training than at evaluation.
  assert tr['summary']['gate_mass'] < ev['summary']['gate_mass']
  assert all(sum(u) == pytest.approx(1.0) for u in ev['usage'][task].values())


# ------------------------------------------------------------------------------------------------
# The report's routing section: new and old result files
# ------------------------------------------------------------------------------------------------
TASKS = ['offline_date_en', 'offline_date_de', 'offline_unit_en', 'offline_unit_de']
UNIFORM_SITE, DATE_SITE = 'encoder/layers_0/attention/query', 'decoder/layers_1/mlp/wo'


def _usage():
  """DATE_SITE sends date tasks to expert 0 and unit tasks to expert 1; UNIFORM_SITE routes every
  task alike."""
  return {t: {UNIFORM_SITE: [0.5, 0.5], DATE_SITE: [1.0, 0.0] if 'date' in t else [0.0, 1.0]}
          for t in TASKS}


def _site_values(v):
  return {UNIFORM_SITE: v, DATE_SITE: v}


NEW = dict(sites=[DATE_SITE, UNIFORM_SITE], tasks=TASKS, num_experts=2,
           eval=dict(mode='eval', split='validation', capacity_factor=None, usage=_usage(),
                     dropped_fraction=_site_values(0.0), gate_mass=_site_values(0.6),
                     gate_entropy=_site_values(0.5), summary=dict(dropped_fraction=0.0,
                                                                  gate_mass=0.6)),
           train_batches=dict(mode='train', num_batches=8, batch_size=16, pack=True,
                              capacity_factor=0.5, dropped_fraction=_site_values(0.26),
                              gate_mass=_site_values(0.4), summary=dict(dropped_fraction=0.26,
                                                                        gate_mass=0.4)))
OLD = dict(sites=[DATE_SITE, UNIFORM_SITE], tasks=TASKS, num_experts=2, usage=_usage(),
           gate_entropy=_site_values(0.5), router_confidence=_site_values(0.6),
           dropped_fraction_train=_site_values(0.012))


def test_old_result_files_keep_their_drops_apart_from_the_training_batch_ones():
  from experiments import routing_stats
  view = routing_stats.routing_view(OLD)
  assert 'train_batches' not in view
  assert view['old_train_mode_on_eval_batches']['dropped_fraction'] == OLD['dropped_fraction_train']
  assert view['eval']['usage'] == OLD['usage'] and view['eval']['gate_mass'] == _site_values(0.6)
  assert routing_stats.routing_view(NEW) == NEW
  assert routing_stats.specialisation(OLD) == routing_stats.specialisation(NEW)


@pytest.mark.parametrize('routing', ['new', 'old'])
def test_routing_section_figure_and_table(tmp_path, routing):
  from experiments import report as report_lib
  from experiments import routing_stats
  from experiments import sweeps as sweeps_lib
  r = NEW if routing == 'new' else OLD
  plots = {}
  entry = {'routing': r, 'routing_seed': 0}
  md = '\n'.join(report_lib.routing_section(sweeps_lib.get_sweep('c3'), 'sira E8 k2', entry,
                                            str(tmp_path), str(tmp_path), plots))
  (fig, data), = plots.items()
  assert open(tmp_path / fig, 'rb').read(8) == b'\x89PNG\r\n\x1a\n'
  # The most specialised site first: date vs unit is the family.
  assert data['heatmap_sites'] == [DATE_SITE, UNIFORM_SITE]
  assert entry['specialisation']['family'][DATE_SITE] == pytest.approx(1.0)
  assert routing_stats.most_specialised_sites(r, entry['specialisation'], 1) == [DATE_SITE]
  row = [line for line in md.splitlines() if line.startswith(f'| {DATE_SITE} |')][0]
  if routing == 'new':
    assert 'train-batch dropped' in md and routing_stats.OLD_DROP_LABEL not in md
    assert row.endswith('| 0.260 | 0.400 |') and 'dropped fraction 0.260' in md
  else:
    assert 'train-batch dropped' not in md and routing_stats.OLD_DROP_LABEL in md
    assert row.endswith('| 0.012 |')


def test_training_cross_entropy_over_the_last_100_steps():
  from experiments import report as report_lib
  history = [dict(step=s, cross_entropy=float(s)) for s in (1, 450, 500, 510, 550, 600)]
  res = {'train': {'steps': 600, 'history': history}}
  assert report_lib.train_cross_entropy_tail(res) == pytest.approx(np.mean([510, 550, 600]))
  assert report_lib.train_cross_entropy_tail({'train': {}}) is None
