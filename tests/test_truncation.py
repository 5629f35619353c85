"""Default lengths fit the bundled tasks, and truncation is counted and warned where it happens."""
import logging

import gin
import numpy as np
import pytest
import seqio

import tasks
from sira_jax import data as data_lib
from sira_jax import gin_utils
from sira_jax import train as train_lib  # noqa: F401  registers `train` for the run files
from tasks import offline_suite
from tasks import truncation

def _default_lengths(run_file):
  gin.clear_config()
  try:
    gin_utils.parse_gin([run_file], [], ['.', gin_utils.PROJECT_GIN_DIR], finalize=False)
    return gin.query_parameter('%TASK_FEATURE_LENGTHS')
  finally:
    gin.clear_config()


def _longest_bundled():
  """Longest tokenized inputs/targets (with EOS) of every bundled generation task, every split."""
  longest = {'inputs': (0, ''), 'targets': (0, '')}
  for task, (generator, langs, _) in offline_suite.GENERATION_TASKS.items():
    for lang in langs:
      name = offline_suite.task_name(task, lang)
      vocab = seqio.get_mixture_or_task(name).output_features['targets'].vocabulary
      for pairs in generator(lang).values():
        for pair in pairs:
          for key, text in zip(('inputs', 'targets'), pair):
            n = len(vocab.encode(text)) + 1
            if n > longest[key][0]:
              longest[key] = (n, f'{name}: {text!r}')
  return longest


@pytest.fixture(scope='module')
def longest():
  return _longest_bundled()


@pytest.mark.parametrize('run_file', ['runs/common_train.gin', 'runs/finetune.gin',
                                      'runs/eval.gin', 'runs/infer.gin'])
def test_default_lengths_fit_every_bundled_task(run_file, longest):
  """A bundled task's example that the default lengths would truncate fails this test."""
  lengths = _default_lengths(run_file)
  for key, (n, where) in longest.items():
    assert n <= lengths[key], (
        f'{run_file}: TASK_FEATURE_LENGTHS[{key!r}] = {lengths[key]} truncates {where} '
        f'({n} tokens with EOS)')


def test_benchmark_lengths_fit_every_benchmark_example():
  """gin/benchmark/finetune.gin's lengths (also used to evaluate) truncate no offline_bench
  example of any split; and they are tight, so packing wastes little."""
  lengths = _default_lengths('benchmark/finetune.gin')
  longest = {'inputs': 0, 'targets': 0}
  for name in offline_suite.bench_task_names():
    task = seqio.get_mixture_or_task(name)
    vocab = task.output_features['targets'].vocabulary
    family, lang = name.split('_')[1:]
    for pairs in offline_suite.GENERATION_TASKS[family][0](lang).values():
      for pair in pairs:
        for key, text in zip(('inputs', 'targets'), pair):
          longest[key] = max(longest[key], len(vocab.encode(text)) + 1)
  assert all(longest[k] <= lengths[k] for k in longest), (longest, lengths)
  assert longest['targets'] > lengths['targets'] // 2, (longest, lengths)


def test_pretrain_lengths_fit_span_corruption():
  lengths = _default_lengths('runs/pretrain.gin')
  task = tasks.get_task_or_mixture('offline_span_corruption_en')
  before = truncation.snapshot()
  n = sum(1 for _ in task.get_dataset(lengths, split='validation', shuffle=False))
  counts = truncation.since(before)
  assert n and counts['inputs'].seen == n and counts['targets'].seen == n
  assert counts['inputs'].cut == 0 and counts['targets'].cut == 0, counts


def test_counts_exactly_the_examples_that_lose_tokens():
  task = tasks.get_task_or_mixture('offline_num2words_en')
  lengths = {'inputs': 64, 'targets': 20}
  before = truncation.snapshot()
  got = list(task.get_dataset(lengths, split='validation', shuffle=False).as_numpy_iterator())
  counts = truncation.since(before)
  texts = [t for _, t in offline_suite.GENERATION_TASKS['num2words'][0]('en')['validation']]
  expected_cut = sum(len(t.encode()) + 1 > 20 for t in texts)
  assert 0 < expected_cut < len(texts)
  assert counts['targets'].seen == len(texts) and counts['targets'].cut == expected_cut
  # `longest` is the longest seen by this process so far (earlier tests may have seen longer).
  assert counts['targets'].longest >= max(len(t.encode()) + 1 for t in texts)
  assert all(len(ex['targets']) <= 20 and ex['targets'][-1] == 1 for ex in got)  # EOS kept
  msg = truncation.message(counts, lengths, 'eval')
  assert f'{expected_cut} of {len(texts)} targets' in msg and 'longer than 20' in msg
  assert 'inputs' not in msg.split('.')[0]


def test_training_batches_warn_with_counts(caplog):
  caplog.set_level(logging.WARNING)
  batches = data_lib.train_batches('offline_num2words_ru', {'inputs': 32, 'targets': 24}, 8)
  next(batches)
  warnings = [r.getMessage() for r in caplog.records if 'truncated' in r.getMessage()]
  assert len(warnings) == 1
  assert 'training data' in warnings[0] and 'targets' in warnings[0]
  assert 'longer than 24 tokens' in warnings[0] and 'TASK_FEATURE_LENGTHS' in warnings[0]


def test_no_warning_when_everything_fits(caplog):
  caplog.set_level(logging.WARNING)
  batches = data_lib.train_batches('offline_num2words_en', {'inputs': 32, 'targets': 160}, 8)
  next(batches)
  assert not [r for r in caplog.records if 'truncated' in r.getMessage()]
  assert truncation.message({'targets': truncation.Counts(10, 0, 5)}, {}, 'x') is None


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return len(a) == len(b) and all(
      x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_shared_training_streams_replay_what_a_fresh_pipeline_gives(caplog):
  caplog.set_level(logging.WARNING)
  name, lengths = 'offline_num2words_ru', {'inputs': 32, 'targets': 24}  # cuts targets: warns
  fresh = _take(data_lib.train_batches(name, lengths, 4, seed=5, pack=True), 12)
  resumed = _take(data_lib.train_batches(name, lengths, 4, seed=5, pack=True, start_step=7), 5)
  assert _same(fresh[7:], resumed)
  caplog.clear()
  with data_lib.shared_training_streams(max_bytes_per_stream=1):  # records one batch
    first = _take(data_lib.train_batches(name, lengths, 4, seed=5, pack=True), 3)
    again = _take(data_lib.train_batches(name, lengths, 4, seed=5, pack=True), 12)
  assert _same(first, fresh[:3]) and _same(again, fresh)
  def warnings():
    return len([r for r in caplog.records if 'truncated' in r.getMessage()])

  with data_lib.shared_training_streams():
    n0 = warnings()
    first = _take(data_lib.train_batches(name, lengths, 4, seed=5, pack=True), 6)
    n1 = warnings()
    replay = _take(data_lib.train_batches(name, lengths, 4, seed=5, pack=True), 12)
    n2 = warnings()
    resumed = _take(data_lib.train_batches(name, lengths, 4, seed=5, pack=True, start_step=7), 5)
    other_seed = _take(data_lib.train_batches(name, lengths, 4, seed=6, pack=True), 1)
    with pytest.raises(ValueError, match='read-only'):
      replay[0]['decoder_target_tokens'][0, 0] = 7  # no reader changes what the next one sees
  assert _same(first, fresh[:6]) and _same(replay, fresh) and _same(resumed, fresh[7:])
  assert not _same(other_seed, fresh[:1])
  # The replay logs the first reader's truncation warning again.
  assert n1 - n0 >= 1 and n2 - n1 >= n1 - n0
