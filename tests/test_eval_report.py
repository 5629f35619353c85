"""What eval and infer tell the user: a progress bar, a summary (mean over tasks and per family),
a warning on empty predictions and on truncated examples (a fixed `predict`, no model)."""
import json
import logging

import numpy as np
import pytest
import seqio

from sira_jax import eval as eval_lib
from sira_jax import infer as infer_lib
from tasks import registry
from tasks import truncation
from tests import trainer_fixtures as fx

LENGTHS = {'inputs': 16, 'targets': 4}  # targets of up to 5 chars + EOS: some are cut


TASK = 'fixture_reverse_trimmed'


def _register():
  vocab = seqio.ByteVocabulary()
  registry.add_task(
      TASK, source=seqio.FunctionDataSource(fx._source, splits=['train', 'validation', 'test']),
      preprocessors=[seqio.preprocessors.tokenize, truncation.append_eos_after_trim],
      output_features={'inputs': seqio.Feature(vocab), 'targets': seqio.Feature(vocab)},
      metric_fns=[fx.exact_match])


@pytest.fixture(scope='module', autouse=True)
def _task():
  """The fixture task, trimmed to the lengths as the project's tasks are (counting the cuts)."""
  _register()
  yield
  registry.remove([TASK])


def _predict_right_unless_a(batch):
  """The reversed input (cut to fit), or an empty prediction (EOS first) when it starts with 'a'."""
  vocab = seqio.ByteVocabulary()
  out = np.zeros((len(batch['encoder_input_tokens']), LENGTHS['targets']), np.int32)
  for i, row in enumerate(batch['encoder_input_tokens']):
    word = vocab.decode([int(t) for t in row if t > 1])
    toks = [1] if word.startswith('a') or not word else (
        vocab.encode(word[::-1])[:LENGTHS['targets'] - 1] + [1])
    out[i, :len(toks)] = toks
  return out


def test_eval_summary_progress_and_warnings(tmp_path, caplog, capsys):
  caplog.set_level(logging.WARNING)
  examples = fx.fixture_examples('validation')
  res = eval_lib.evaluate(model_dir=str(tmp_path), mixture_or_task_name=TASK,
                          split='validation', task_feature_lengths=LENGTHS, batch_size=5,
                          predict=_predict_right_unless_a, tensorboard=False)
  n_empty = sum(a.startswith('a') for a, _ in examples)
  n_cut = sum(len(b) + 1 > LENGTHS['targets'] for _, b in examples)
  assert 0 < n_empty < len(examples) and 0 < n_cut
  logs = ' '.join(r.getMessage() for r in caplog.records)
  assert f'{n_empty} of {len(examples)} predictions are empty' in logs
  assert f'{n_cut} of {len(examples)} targets' in logs and 'truncated' in logs
  assert 'eval validation' in capsys.readouterr().err  # the progress bar
  saved = json.load(open(tmp_path / 'eval' / f'metrics_{TASK}_0_validation.json'))
  assert saved['summary']['mean'] == res[TASK]
  assert eval_lib.summary_line(saved['summary']).startswith('mean over 1 tasks: exact_match=')


def test_infer_summary_and_empty_warning(tmp_path, caplog, capsys):
  caplog.set_level(logging.WARNING)
  [path] = infer_lib.infer(model_dir=str(tmp_path), mixture_or_task_name=TASK,
                           split='validation', task_feature_lengths=LENGTHS, batch_size=5,
                           predict=_predict_right_unless_a)
  rows = [json.loads(line) for line in open(path)]
  n_empty = sum(r['prediction'] == '' for r in rows)
  assert n_empty == sum(r['inputs'].startswith('a') for r in rows) > 0
  assert f'{n_empty} of {len(rows)} predictions are empty' in ' '.join(
      r.getMessage() for r in caplog.records)
  err = capsys.readouterr().err
  assert f'infer: {len(rows)} predictions of 1 tasks' in err and f'{n_empty} empty' in err
  assert f'{len(rows)}/{len(rows)}' in err  # the progress bar over examples


def test_summary_means_over_tasks_and_families():
  results = {'offline_num2words_en': {'chrf': 10.0}, 'offline_num2words_de': {'chrf': 20.0},
             'offline_date_en': {'chrf': 60.0, 'sequence_accuracy': 5.0}}
  s = eval_lib.summarize(results)
  assert s['mean'] == {'chrf': 30.0, 'sequence_accuracy': 5.0}
  assert s['families'] == {'offline_date': {'chrf': 60.0, 'sequence_accuracy': 5.0},
                           'offline_num2words': {'chrf': 15.0}}
  assert eval_lib.summary_line(s) == (
      'mean over 3 tasks: chrf=30.00 sequence_accuracy=5.00 | offline_date: chrf=60.00 '
      'sequence_accuracy=5.00; offline_num2words: chrf=15.00')


def test_eval_reuses_one_evaluator_per_examples_until_the_task_is_registered_again(tmp_path):
  kw = dict(mixture_or_task_name=TASK, split='test', task_feature_lengths=LENGTHS, batch_size=5,
            predict=_predict_right_unless_a, tensorboard=False)
  first = eval_lib.evaluate(model_dir=str(tmp_path / 'a'), **kw)
  evaluator = eval_lib.cached_evaluator(TASK, 'test', LENGTHS, None)
  assert eval_lib.evaluate(model_dir=str(tmp_path / 'b'), **kw) == first
  assert eval_lib.cached_evaluator(TASK, 'test', LENGTHS, None) is evaluator
  assert eval_lib.cached_evaluator(TASK, 'test', LENGTHS, 3) is not evaluator
  registry.remove([TASK])
  _register()
  assert eval_lib.cached_evaluator(TASK, 'test', LENGTHS, None) is not evaluator
  assert eval_lib.evaluate(model_dir=str(tmp_path / 'c'), **kw) == first


def test_eval_batches_fit_the_examples_and_are_built_once():
  from experiments import evaluation
  assert evaluation.fitted_batch_size(128, 50) == 56
  assert evaluation.fitted_batch_size(128, 1) == 8
  assert evaluation.fitted_batch_size(16, 50) == 16
  assert evaluation.fitted_batch_size(128, None) == 128
  task = seqio.get_mixture_or_task(TASK)
  batches = evaluation._model_batches(task, LENGTHS, 'test', 7, 4)
  assert [n for _, n in batches] == [4, 3]
  assert all(b['encoder_input_tokens'].shape == (4, LENGTHS['inputs']) for b, _ in batches)
  again = evaluation._model_batches(task, LENGTHS, 'test', 7, 4)
  assert all(a[0] is b[0] for a, b in zip(batches, again))  # cached, not rebuilt
  capped = evaluation._model_batches(task, LENGTHS, 'test', None, 2, max_batches=1)
  assert len(capped) == 1
