"""The bundled offline suite: registration, determinism, datasets, metrics, SPM."""
import hashlib
import importlib
import json
import os

import numpy as np
import pytest
import seqio
import tensorflow as tf

import tasks
from tasks import offline_data as data
from tasks import offline_suite
from tasks import span_corruption as sc
from tasks import vocab

L = {'inputs': 48, 'targets': 48}


def _generation_tasks():
  return [offline_suite.task_name(t, l)
          for t, (_, langs, _) in offline_suite.GENERATION_TASKS.items()
          for l in langs]


def test_registered_names():
  names = set(tasks.registered_names())
  gen = _generation_tasks()
  assert len(gen) == 4 * 10 + 5
  assert set(gen) <= names
  for lang in data.PRETRAIN_LANGUAGES:
    assert f'offline_span_corruption_{lang}' in names
  mix = seqio.get_mixture_or_task('offline_suite_mix')
  assert sorted(t.name for t in mix.tasks) == sorted(gen)
  xl_train = {t.name for t in seqio.get_mixture_or_task(
      'offline_suite_xl_train').tasks}
  xl_heldout = {t.name for t in seqio.get_mixture_or_task(
      'offline_suite_xl_heldout').tasks}
  assert not xl_train & xl_heldout and len(xl_heldout) == 8
  assert all(n.endswith(('_fi', '_tr')) for n in xl_heldout)
  assert len(seqio.get_mixture_or_task('offline_lang_ru').tasks) == 4
  assert len(seqio.get_mixture_or_task('offline_translit').tasks) == 5


def test_sizes_splits_disjoint_and_parallel():
  for task, (gen, langs, _) in offline_suite.GENERATION_TASKS.items():
    for lang in langs:
      ex = gen(lang)
      sizes = offline_suite.split_sizes(task, lang)
      assert {s: len(v) for s, v in ex.items()} == sizes
      assert seqio.get_mixture_or_task(offline_suite.task_name(
          task, lang)).num_input_examples('train') == sizes['train']
      inputs = {s: {p[0] for p in v} for s, v in ex.items()}
      assert all(len(inputs[s]) == sizes[s] for s in inputs)  # no duplicates
      assert not inputs['train'] & inputs['test']
      assert not inputs['train'] & inputs['validation']
      assert not inputs['validation'] & inputs['test']
  assert sizes['test'] >= 30
  # Parallel inputs: the same numbers are test numbers in every language.
  payload = lambda lang: [i.split(': ', 1)[1]
                          for i, _ in data.num2words_examples(lang)['test']]
  assert payload('de') == payload('tr')


def test_known_examples_and_determinism():
  de = dict(p for s in data.SPLITS for p in data.num2words_examples('de')[s])
  some_input = sorted(de)[0]
  n = int(some_input.split(': ')[1])
  import num2words
  assert de[some_input] == num2words.num2words(n, lang='de')
  # Regenerating from scratch gives identical splits (fixed seeds).
  before = data.unit_examples('ru')
  data.unit_examples.cache_clear()
  data.unit_inputs.cache_clear()
  assert data.unit_examples('ru') == before
  # Unit targets are CLDR-formatted with locale decimals and plural forms.
  assert all(',' in t for i, t in before['train'] if '.' in i.split()[2])
  sr = dict(data.translit_pairs('sr'))
  assert sr['Немачка'] == 'Nemačka'
  assert all(not any(c.isdigit() for c in t) for _, t in data.translit_pairs(
      'vai'))


@pytest.mark.slow
def test_every_offline_task_gives_datasets():
  names = [n for n in offline_suite.OFFLINE_NAMES
           if n in seqio.TaskRegistry.names()]
  # + offline_span_corruption, offline_denoise; + offline_unit_<L>_test500
  assert len(names) == 45 + 15 + 2 + 10
  assert seqio.get_mixture_or_task('offline_span_corruption').num_input_examples(
      'train') == 15 * data.PRETRAIN_SIZES.train
  for name in names:
    task = seqio.get_mixture_or_task(name)
    ds = task.get_dataset(sequence_length=L, split='train', shuffle=True,
                          seed=7)
    ex = next(ds.as_numpy_iterator())
    for key in ('inputs', 'targets'):
      ids = ex[key]
      assert 0 < len(ids) <= L[key], (name, key)
      assert ids[-1] == 1, (name, key)  # EOS
      assert ids.max() < vocab.byte_vocabulary().vocab_size
  ex = next(seqio.get_mixture_or_task('offline_date_fr').get_dataset(
      L, split='test', shuffle=False).as_numpy_iterator())
  assert vocab.byte_vocabulary().decode(ex['targets'].tolist()) == (
      ex['targets_pretokenized'].decode())


def test_denoise_targets_are_the_uncorrupted_chunk():
  lengths = {'inputs': 64, 'targets': 72}
  ds = seqio.get_mixture_or_task('offline_denoise').get_dataset(
      lengths, split='validation', shuffle=False, seed=3)
  sentinel_min = vocab.byte_vocabulary().vocab_size - 8  # bytes 0xF8-0xFF never occur in UTF-8
  for ex in ds.take(5).as_numpy_iterator():
    inputs, targets = ex['inputs'][:-1].tolist(), ex['targets'][:-1].tolist()
    assert max(targets) < sentinel_min and len(targets) > len(inputs) - 8
    kept = iter(targets)  # every uncorrupted input token, in order, is in the target
    assert all(t in kept for t in inputs if t < sentinel_min)
    assert any(t >= sentinel_min for t in inputs)


def _first(name, seed, n=8):
  ds = seqio.get_mixture_or_task(name).get_dataset(
      L, split='train', shuffle=True, seed=seed)
  return [ex['inputs'].tolist() for ex in ds.take(n).as_numpy_iterator()]


def test_mixtures_shuffle_is_seeded():
  a = _first('offline_suite_mix', seed=1, n=64)
  prefixes = {bytes(t - 3 for t in x[:-1]).decode().split(' ')[0] for x in a}
  assert prefixes == {'num2words', 'date', 'currency', 'unit', 'translit'}
  assert _first('offline_lang_ru', 1) == _first('offline_lang_ru', 1)
  assert _first('offline_lang_ru', 1) != _first('offline_lang_ru', 2)
  # Example order within one task is seeded too (source-level permutation).
  assert _first('offline_unit_pl', 3) == _first('offline_unit_pl', 3)
  assert _first('offline_unit_pl', 3) != _first('offline_unit_pl', 4)


def _restore(inputs, targets, vocab_size, max_spans=20):
  """Undoes span corruption: put each sentinel's span back into the inputs."""
  spans, current = {}, None
  for t in targets:
    if t >= vocab_size - max_spans:
      current = t
      spans[current] = []
    else:
      spans[current].append(t)
  out = []
  for t in inputs:
    out += spans[t] if t in spans else [t]
  return out


def test_span_corruption_by_hand():
  tokens = tf.range(10, 20)
  mask = tf.constant([0, 0, 1, 1, 0, 0, 0, 1, 0, 0]) > 0
  inputs, targets = sc.corrupt(tokens, mask, vocab_size=100)
  assert inputs.numpy().tolist() == [10, 11, 99, 14, 15, 16, 98, 18, 19]
  assert targets.numpy().tolist() == [99, 12, 13, 98, 17]


@pytest.mark.parametrize('length', [2, 7, 20, 70, 333])
def test_noise_mask_counts_and_roundtrip(length):
  for s in range(3):
    mask = sc.noise_span_mask(tf.constant(length), 0.15, 3.0,
                              tf.constant([s, 5])).numpy()
    assert mask.shape == (length,)
    num_noise = min(max(round(length * 0.15), 1), length - 1)
    assert mask.sum() == num_noise
    starts = int(np.sum(mask[1:] & ~mask[:-1]) + mask[0])
    assert starts == min(max(round(num_noise / 3.0), 1), length - num_noise)
    assert not mask[0]  # starts with a kept span
    tokens = tf.range(3, 3 + length)
    inputs, targets = sc.corrupt(tokens, tf.constant(mask), vocab_size=1000)
    assert _restore(inputs.numpy().tolist(), targets.numpy().tolist(),
                    1000) == list(range(3, 3 + length))


def test_span_corruption_task_lengths_and_roundtrip():
  chunk, tlen = sc.chunk_length_for(64)
  assert chunk - round(chunk * 0.15) + max(round(round(chunk * 0.15) / 3), 1) \
      + 1 == 64
  task = seqio.get_mixture_or_task('offline_span_corruption_de')
  vs = vocab.byte_vocabulary().vocab_size
  docs = ' '.join(data.pretrain_documents('de')['validation']).encode()
  n = 0
  for ex in task.get_dataset({'inputs': 64, 'targets': 64},
                             split='validation', shuffle=False,
                             seed=0).take(20).as_numpy_iterator():
    assert len(ex['inputs']) <= 64 and len(ex['targets']) <= tlen
    # <= 4 spans per 70-byte chunk: sentinels are bytes 0xFF..0xFC, which
    # UTF-8 text never contains.
    restored = _restore(ex['inputs'][:-1].tolist(),
                        ex['targets'][:-1].tolist(), vs, max_spans=4)
    assert bytes(t - 3 for t in restored) in docs
    n += 1
  assert n == 20


def test_evaluator_with_perfect_and_wrong_predictions():
  def run(predict):
    ev = seqio.Evaluator(
        'offline_translit_ff', feature_converter=seqio.EncDecFeatureConverter(
            pack=False), eval_split='validation', sequence_length=None,
        use_memory_cache=False, async_compute_metrics=False)
    res, _ = ev.evaluate(compute_metrics=True, predict_fn=predict)
    return res.result()['offline_translit_ff']

  perfect = run(lambda ds: [(i, ex['decoder_target_tokens'].tolist())
                            for i, ex in ds.as_numpy_iterator()])
  assert perfect == {'cer': 0.0, 'sequence_accuracy': 100.0}
  empty = run(lambda ds: [(i, [1]) for i, _ in ds.as_numpy_iterator()])
  assert empty == {'cer': 100.0, 'sequence_accuracy': 0.0}


def test_idempotent_and_suggestions():
  # Re-executing the registering module (as a second import under another
  # name would) replaces the registrations instead of raising.
  importlib.reload(offline_suite)
  import tasks as tasks_again
  assert tasks_again is tasks
  offline_suite.register_offline_suite()
  with pytest.raises(KeyError, match='offline_num2words_de'):
    tasks.get_task_or_mixture('offline_num2word_de')
  assert tasks.get_task_or_mixture('offline_suite_mix').name == (
      'offline_suite_mix')


def test_sentencepiece_vocabulary(tmp_path):
  import sentencepiece as spm
  text = tmp_path / 'text.txt'
  text.write_text('\n'.join(
      t for s in data.SPLITS for _, t in data.num2words_examples('en')[s]) +
      '\n' + '\n'.join(i for i, _ in data.num2words_examples('en')['train']))
  spm.SentencePieceTrainer.train(
      input=str(text), model_prefix=str(tmp_path / 'sp'), vocab_size=200,
      model_type='unigram', pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  with pytest.raises(ValueError, match='remote'):
    vocab.get_vocabulary(spm_path='gs://bucket/spiece.model')
  with pytest.raises(FileNotFoundError):
    vocab.get_vocabulary(spm_path=str(tmp_path / 'missing.model'))
  sp_vocab = vocab.get_vocabulary(spm_path=str(tmp_path / 'sp.model'),
                                  extra_ids=10)
  try:
    offline_suite.register_offline_suite(sp_vocab)
    task = seqio.get_mixture_or_task('offline_num2words_en')
    assert task.output_features['targets'].vocabulary is sp_vocab
    ex = next(task.get_dataset({'inputs': 32, 'targets': 64}, split='test',
                               shuffle=False).as_numpy_iterator())
    assert ex['targets'][-1] == 1
    assert sp_vocab.decode(ex['targets'].tolist()) == (
        ex['targets_pretokenized'].decode())
    sc_ex = next(seqio.get_mixture_or_task(
        'offline_span_corruption_en').get_dataset(
            {'inputs': 32, 'targets': 32}, split='train',
            shuffle=False).as_numpy_iterator())
    assert sc_ex['targets'][0] == sp_vocab.vocab_size - 1  # <extra_id_0>
    # The trainer's flow: gin binds the model file, then tasks.register_all().
    import gin
    offline_suite.register_offline_suite(vocab.byte_vocabulary())
    gin.parse_config([
        f"tasks.vocab.get_vocabulary.spm_path = '{tmp_path / 'sp.model'}'",
        'tasks.vocab.get_vocabulary.extra_ids = 10'])
    tasks.register_all()
    assert seqio.get_mixture_or_task('offline_date_de').output_features[
        'inputs'].vocabulary is sp_vocab
  finally:
    import gin
    gin.clear_config()
    offline_suite.register_offline_suite(vocab.byte_vocabulary())


def test_readme_documents_every_task_and_size():
  readme = open(os.path.join(os.path.dirname(tasks.__file__),
                             'README.md'), encoding='utf-8').read()
  for family, lang, sizes in offline_suite.suite_table():
    assert f'offline_{family}' in readme
    if family == 'translit':
      assert f"{lang} {sizes['train']}/{sizes['validation']}/{sizes['test']}" \
          in readme
    else:
      assert f"{sizes['train']} / {sizes['validation']} / {sizes['test']}" \
          in readme


def test_registering_again_keeps_the_same_task_objects_until_something_changed():
  # A sweep parses gin and registers for every run: equal vocabulary, nothing else registered
  # under these names -> the same Task/Mixture objects, so per-task eval caches stay valid.
  offline_suite.register_offline_suite(vocab.byte_vocabulary())
  task = seqio.get_mixture_or_task('offline_date_de')
  mix = seqio.get_mixture_or_task('offline_bench')
  offline_suite.register_offline_suite(vocab.byte_vocabulary())
  tasks.register_all()
  assert seqio.get_mixture_or_task('offline_date_de') is task
  assert seqio.get_mixture_or_task('offline_bench') is mix
  # A name removed (or replaced) behind its back: everything is registered afresh.
  tasks.registry.remove(['offline_date_de'])
  offline_suite.register_offline_suite(vocab.byte_vocabulary())
  assert seqio.get_mixture_or_task('offline_date_de') is not task
  assert seqio.get_mixture_or_task('offline_bench') is not mix
  # Another vocabulary replaces the registrations.
  task = seqio.get_mixture_or_task('offline_date_de')
  try:
    offline_suite.register_offline_suite(vocab.byte_vocabulary(extra_ids=5))
    assert seqio.get_mixture_or_task('offline_date_de') is not task
    assert seqio.get_mixture_or_task('offline_date_de').output_features[
        'targets'].vocabulary == vocab.byte_vocabulary(extra_ids=5)
  finally:
    offline_suite.register_offline_suite(vocab.byte_vocabulary())


def _decoded(ds, n=None):
  return [(bytes(ex['inputs_pretokenized']), bytes(ex['targets_pretokenized']))
          for ex in (ds.take(n) if n else ds).as_numpy_iterator()]


def test_a_training_limit_keeps_the_first_n_examples_of_each_task():
  full = {name: _decoded(seqio.get_mixture_or_task(name).get_dataset(
      L, split='train', shuffle=False, num_epochs=1))
      for name in ('offline_date_de', 'offline_unit_fi', 'offline_translit_vai')}
  held = {s: _decoded(seqio.get_mixture_or_task('offline_date_de').get_dataset(
      L, split=s, shuffle=False, num_epochs=1)) for s in ('validation', 'test')}
  try:
    tasks.register_all(offline_train_examples_per_task=7)
    assert tasks.registration() == {'offline': {'train_examples_per_task': 7}}
    for name, examples in full.items():
      task = seqio.get_mixture_or_task(name)
      assert task.num_input_examples('train') == 7
      limited = _decoded(task.get_dataset(L, split='train', shuffle=False, num_epochs=1))
      assert limited == examples[:7] and len(set(examples)) > 7
      # Training reads them endlessly (20 epochs here), shuffled, and nothing else.
      epochs = _decoded(task.get_dataset(L, split='train', shuffle=True, seed=1,
                                         num_epochs=None), 140)
      assert len(epochs) == 140 and set(epochs) == set(examples[:7])
    for s, examples in held.items():  # validation and test are whole
      assert _decoded(seqio.get_mixture_or_task('offline_date_de').get_dataset(
          L, split=s, shuffle=False, num_epochs=1)) == examples
    # More than a task has: all of its own.
    tasks.register_all(offline_train_examples_per_task=1000)
    assert seqio.get_mixture_or_task('offline_translit_vai').num_input_examples('train') == 239
    assert seqio.get_mixture_or_task('offline_date_de').num_input_examples('train') == 1000
    for bad in (0, -3, 2.5, True, '64'):
      with pytest.raises(ValueError, match='train_examples_per_task must be None'):
        offline_suite.register_offline_suite(vocab.byte_vocabulary(), bad)
  finally:
    tasks.register_all()
  assert tasks.registration() == {}
  assert seqio.get_mixture_or_task('offline_date_de').num_input_examples('train') == 2000
  # A run's record re-applies the limit (what eval and infer do with run_config.json).
  try:
    tasks.apply_registration({'offline': {'train_examples_per_task': 5}})
    assert seqio.get_mixture_or_task('offline_unit_fi').num_input_examples('train') == 5
  finally:
    tasks.register_all()


def test_the_near_base_mixtures():
  names = lambda m: sorted(t.name for t in seqio.get_mixture_or_task(m).tasks)  # noqa: E731
  in_base, held_out = names('offline_bench_in_base'), names('offline_bench_held_out')
  assert len(in_base) == len(held_out) == 15
  assert sorted(in_base + held_out) == names('offline_bench')
  assert {n.rsplit('_', 1)[1] for n in in_base} == {'en', 'de', 'fr', 'es', 'it'}
  assert {n.rsplit('_', 1)[1] for n in held_out} == {'pt', 'ru', 'pl', 'tr', 'fi'}
  near = seqio.get_mixture_or_task('offline_pretrain_near_mix')
  rates = {t.name: near.get_rate(t) for t in near.tasks}
  pretrain = seqio.get_mixture_or_task('offline_pretrain_mix')
  assert set(rates) == set(in_base) | {t.name for t in pretrain.tasks}
  # 1:1: the pretraining mix's tasks and the 15 benchmark tasks have equal total rates.
  assert sum(rates[t.name] for t in pretrain.tasks) == sum(rates[n] for n in in_base) == 15
  assert rates['offline_span_corruption'] == rates['offline_denoise']


def test_the_unit_task_with_500_test_examples_leaves_the_unit_task_as_it_was():
  # The unit task's inputs and Russian examples as generated before the variant existed (sha256
  # of their JSON): the results trained and scored on them stay valid.
  def digest(x):
    return hashlib.sha256(json.dumps(x, ensure_ascii=False).encode()).hexdigest()
  assert digest(data.unit_inputs()) == (
      'a3f261472648b15bd8ec849b70d346fa33851e0d6b20ca0802b4da37a2456e91')
  assert digest(data.unit_examples('ru')) == (
      '1054f082d75ea6f375a95c8521b2925f155a12affec62fd3618deb98b6bb9694')
  for lang in ('ru', 'fi'):
    unit, large = data.unit_examples(lang), data.unit_large_test_examples(lang)
    assert large['train'] == unit['train'] and large['validation'] == unit['validation']
    assert large['test'][:200] == unit['test'] and len(large['test']) == data.UNIT_LARGE_TEST
    # The 300 more are new inputs: distinct, in no split of the unit task.
    seen = {i for s in data.SPLITS for i, _ in unit[s]}
    extra = {i for i, _ in large['test'][200:]}
    assert len(extra) == 300 and not extra & seen
  # Parallel across languages, as every split of the suite.
  payload = lambda lang: [i.split(': ', 1)[1]  # noqa: E731
                          for i, _ in data.unit_large_test_examples(lang)['test']]
  assert payload('ru') == payload('fi')
  task = seqio.get_mixture_or_task('offline_unit_ru_test500')
  assert offline_suite.large_test_task_name('ru') == task.name
  assert [task.num_input_examples(s) for s in data.SPLITS] == [2000, 200, 500]
  assert tasks.family_and_language(task.name) == ('unit', 'ru')
  test = _decoded(task.get_dataset(L, split='test', shuffle=False, num_epochs=1))
  assert test == [(i.encode(), t.encode()) for i, t in data.unit_large_test_examples('ru')['test']]
  # In no mixture: the benchmark and the suite mixtures are as they were.
  for mixture in ('offline_bench', 'offline_suite_mix', 'offline_unit', 'offline_lang_ru'):
    assert not any(t.name.endswith('_test500')
                   for t in seqio.get_mixture_or_task(mixture).tasks), mixture
  # A training limit applies to it as to the unit task.
  try:
    tasks.register_all(offline_train_examples_per_task=64)
    assert seqio.get_mixture_or_task(task.name).num_input_examples('train') == 64
    assert seqio.get_mixture_or_task(task.name).num_input_examples('test') == 500
  finally:
    tasks.register_all()
