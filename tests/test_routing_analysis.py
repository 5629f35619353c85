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


def test_training_stream_is_the_trainers():
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
