"""The bundled offline suite: multilingual seq2seq tasks needing no download.

Generated deterministically (fixed seeds) from data that installed PyPI
packages carry, by tasks/offline_data.py; registered on `import tasks`.

| task (prefix)        | what                                   | languages | train / validation / test per language | metrics |
|----------------------|----------------------------------------|-----------|--------------------|---------|
| offline_num2words_L  | 'num2words L: 1234' -> number in words (num2words) | 10 | 2000 / 200 / 200 | sequence accuracy, chrF |
| offline_date_L       | 'date long L: 2023-04-17' -> CLDR date, styles medium/long (babel) | 10 | 2000 / 200 / 200 | sequence accuracy, chrF |
| offline_currency_L   | 'currency L: 1234.50 EUR' -> CLDR currency format (babel) | 10 | 2000 / 200 / 200 | sequence accuracy, chrF |
| offline_unit_L       | 'unit L: 21 length-kilometer' -> CLDR unit with plural rules (babel) | 10 | 2000 / 200 / 200 | sequence accuracy, chrF |
| offline_translit_L   | 'translit sr-Cyrl-Latn: Немачка' -> 'Nemačka': CLDR names of locales published in two scripts | 5 | sr 959/159/159, bs 960/160/160, ff 261/43/43, shi 266/44/44, vai 239/39/39 | CER, sequence accuracy |
| offline_span_corruption_L | T5 span corruption (15% noise, mean span 3) of short CLDR/number/date texts | 15 | 1000 / 50 / 50 documents (~300 bytes each; chunked by length) | none (pretraining) |

Languages: FORMAT_LANGUAGES = en de fr es it pt ru pl tr fi; transliteration:
sr (Cyrillic->Latin), bs (Latin->Cyrillic), ff (Latin->Adlam), shi
(Tifinagh->Latin), vai (Vai->Latin); span corruption: all 15.

Mixtures (rate 1 per task-language):
- `offline_{num2words,date,currency,unit,translit}`: one task over languages.
- `offline_lang_L`: all tasks of language L (FORMAT_LANGUAGES).
- `offline_suite_mix`: every generation task and language (45 tasks).
- `offline_bench`: the sweeps' benchmark (experiments/): date, currency and
  unit formatting in the 10 FORMAT_LANGUAGES (30 tasks; inputs <= 39 bytes,
  targets <= 40 bytes, so gin/benchmark's lengths 64/48 truncate nothing).
- `offline_suite_xl_train` / `offline_suite_xl_heldout`: cross-lingual split;
  train on the formatting tasks in 8 languages, evaluate on the held-out
  languages fi and tr (parallel inputs, so no test input is seen in training).
- `offline_bench_in_base` / `offline_bench_held_out`: the benchmark's 15
  tasks of en, de, fr, es, it / of pt, ru, pl, tr, fi (NEAR_BASE_LANGUAGES
  and the rest); `offline_pretrain_near_mix`: the base pretraining mix 1:1
  with `offline_bench_in_base` (a base near the held-out tasks; the regime
  candidate `regime_near_base` in experiments/sweeps.py fine-tunes it on
  `offline_bench_held_out`).
- `offline_unit_L_test500` (Tasks, in no mixture): `offline_unit_L` with 500
  test examples: its 200, then the next 300 draws of the unit task's input
  stream (disjoint from its splits, which stay as they are); train and
  validation are offline_unit_L's. More test power for one task (c2 in a
  regime, experiments/sweeps.py `C2_TASK`).
- `offline_span_corruption` (a single Task, not a mixture): pretraining over
  the 15 languages' documents, one input pipeline.
- `offline_denoise`: the same documents and corruption with the whole chunk
  as target (denoising reconstruction, as in MASS / BART: inputs <= 64 tokens
  give targets <= 71); `offline_pretrain_mix`: span corruption and denoising
  1:1, the benchmark base's pretraining (gin/benchmark/pretrain.gin).

Training-example limit: `register_offline_suite(train_examples_per_task=N)`
(gin: the macro TRAIN_EXAMPLES_PER_TASK of gin/benchmark/finetune.gin, bound
to `register_all.offline_train_examples_per_task`) gives every generation
task's 'train' split only its first N examples, in their generated order (a
task with fewer keeps all of its own); validation and test are unchanged, the
task names too. Training repeats them for as many epochs as the steps take
(data.train_batches reads the training split endlessly). A run records the
limit in its run_config.json (`registration_args`), so eval, infer and a
resumed run see the same tasks.

Inputs share the same random draws across languages of a task, and splits are
disjoint (see offline_data). Example strings are generated on the first
`get_dataset` of a task (well under a second per task-language) and cached.
"""
from __future__ import annotations

import functools
from typing import Callable

import seqio
import tensorflow as tf

from tasks import metrics
from tasks import offline_data as data
from tasks import registry
from tasks import span_corruption
from tasks import truncation
from tasks import vocab as vocab_lib

PREFIX = 'offline'
HELD_OUT_LANGUAGES = ('fi', 'tr')
BENCH_TASKS = ('date', 'currency', 'unit')
# The languages whose benchmark tasks the near base (`offline_pretrain_near_mix`) pretrains on; the
# other FORMAT_LANGUAGES' benchmark tasks (`offline_bench_held_out`) are fine-tuned on.
NEAR_BASE_LANGUAGES = ('en', 'de', 'fr', 'es', 'it')

GeneratorFn = Callable[[str], dict[str, list[tuple[str, str]]]]

# task -> (generator, languages, metric fns)
GENERATION_TASKS: dict[str, tuple[GeneratorFn, tuple[str, ...], list]] = {
    'num2words': (data.num2words_examples, data.FORMAT_LANGUAGES,
                  [metrics.sequence_accuracy_seqio, metrics.chrf_seqio]),
    'date': (data.date_examples, data.FORMAT_LANGUAGES,
             [metrics.sequence_accuracy_seqio, metrics.chrf_seqio]),
    'currency': (data.currency_examples, data.FORMAT_LANGUAGES,
                 [metrics.sequence_accuracy_seqio, metrics.chrf_seqio]),
    'unit': (data.unit_examples, data.FORMAT_LANGUAGES,
             [metrics.sequence_accuracy_seqio, metrics.chrf_seqio]),
    'translit': (data.translit_examples, data.TRANSLIT_LANGUAGES,
                 [metrics.cer_seqio, metrics.sequence_accuracy_seqio]),
}


def task_name(task: str, lang: str) -> str:
  return f'{PREFIX}_{task}_{lang}'


def large_test_task_name(lang: str) -> str:
  """`offline_unit_<lang>_test500`: the unit task of `lang` with UNIT_LARGE_TEST test examples
  (its 200, then 300 more draws of its inputs; train and validation its own)."""
  return f'{task_name("unit", lang)}_test{data.UNIT_LARGE_TEST}'


def split_sizes(task: str, lang: str) -> dict[str, int]:
  """Number of examples per split (documents for span corruption)."""
  if task == 'translit':
    return data.translit_sizes(lang).as_dict()
  if task == 'span_corruption':
    return data.PRETRAIN_SIZES.as_dict()
  return data.FORMAT_SIZES.as_dict()


# The source permutes its (small, in-memory) strings fully when asked to
# shuffle, so the task-level buffer over tokenized examples can stay small and
# the first batch comes quickly; each epoch is permuted afresh.
SHUFFLE_BUFFER_SIZE = 128


def _maybe_shuffle(ds: tf.data.Dataset, n: int, shuffle: bool,
                   seed: int | None) -> tf.data.Dataset:
  if shuffle and n > 1:
    ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
  return ds


def _pairs_dataset_fn(generator: GeneratorFn, lang: str,
                      train_examples: int | None = None):
  """The task's examples of a split; 'train' cut to its first
  `train_examples` (None: all)."""
  def dataset_fn(split: str, shuffle_files: bool = False,
                 seed: int | None = None) -> tf.data.Dataset:
    pairs = generator(lang)[split]
    if split == 'train' and train_examples is not None:
      pairs = pairs[:train_examples]
    ds = tf.data.Dataset.from_tensor_slices({
        'inputs': tf.constant([p[0] for p in pairs], tf.string),
        'targets': tf.constant([p[1] for p in pairs], tf.string)})
    return _maybe_shuffle(ds, len(pairs), shuffle_files, seed)
  return dataset_fn


def _text_dataset_fn(langs: tuple[str, ...]):
  def dataset_fn(split: str, shuffle_files: bool = False,
                 seed: int | None = None) -> tf.data.Dataset:
    docs = [doc for lang in langs for doc in data.pretrain_documents(lang)[split]]
    ds = tf.data.Dataset.from_tensor_slices(
        {'targets': tf.constant(docs, tf.string)})
    return _maybe_shuffle(ds, len(docs), shuffle_files, seed)
  return dataset_fn


def register_offline_suite(vocabulary: seqio.Vocabulary | None = None,
                           train_examples_per_task: int | None = None
                           ) -> list[str]:
  """(Re)registers every offline task and mixture; returns their names.

  vocabulary: default `tasks.vocab.get_vocabulary()` (bytes unless gin sets
  a SentencePiece model path). train_examples_per_task: each generation
  task's training split is its first N examples (None: all; module
  docstring). Calling again with another vocabulary or limit replaces the
  registrations; with equal ones, while every name still
  holds what this module registered, it keeps them: the same task objects,
  so what is cached per task (an evaluator's preprocessed examples, eval
  batches) stays valid across the runs of a sweep, each of which parses gin
  and registers again.
  """
  vocabulary = vocabulary if vocabulary is not None else (
      vocab_lib.get_vocabulary())
  check_train_examples_per_task(train_examples_per_task)
  settings = (vocabulary, train_examples_per_task)
  if _LAST_REGISTRATION and _LAST_REGISTRATION[0] == settings and all(
      registry.registered(name) is obj
      for name, obj in _LAST_REGISTRATION[1].items()):
    return list(_LAST_REGISTRATION[1])
  names = _register_offline_suite(vocabulary, train_examples_per_task)
  _LAST_REGISTRATION[:] = [
      settings, {name: registry.registered(name) for name in names}]
  return names


# [(vocabulary, train_examples_per_task), {name: registered Task or Mixture}]
# of the last registration.
_LAST_REGISTRATION: list = []


def check_train_examples_per_task(n) -> None:
  """Refuses a training-example limit that is not None or an int >= 1."""
  if n is not None and (isinstance(n, bool) or not isinstance(n, int)
                        or n < 1):
    raise ValueError(
        f'train_examples_per_task must be None (all) or an integer >= 1, got '
        f'{n!r} (gin: TRAIN_EXAMPLES_PER_TASK)')


def registration_args() -> dict[str, int] | None:
  """{'train_examples_per_task': N} while the suite is registered with a
  training-example limit, else None: what a training run records
  (`tasks.registration`) so eval, infer and a resumed run register the same
  tasks (`register_offline_suite(**args)`)."""
  if _LAST_REGISTRATION and _LAST_REGISTRATION[0][1] is not None:
    return {'train_examples_per_task': _LAST_REGISTRATION[0][1]}
  return None


def _register_offline_suite(vocabulary: seqio.Vocabulary,
                            train_examples_per_task: int | None
                            ) -> list[str]:
  """Registers every offline task and mixture with `vocabulary`."""
  features = vocab_lib.get_output_features(vocabulary)
  names: list[str] = []
  by_task: dict[str, list[str]] = {}
  by_lang: dict[str, list[str]] = {}

  def add_pairs_task(name, generator, lang, sizes, metric_fns):
    if train_examples_per_task is not None:
      sizes = dict(sizes, train=min(sizes['train'], train_examples_per_task))
    registry.add_task(
        name,
        source=seqio.FunctionDataSource(
            _pairs_dataset_fn(generator, lang, train_examples_per_task),
            splits=data.SPLITS, num_input_examples=sizes),
        preprocessors=[seqio.preprocessors.tokenize,
                       seqio.CacheDatasetPlaceholder(),
                       truncation.append_eos_after_trim],
        output_features=features,
        metric_fns=list(metric_fns),
        shuffle_buffer_size=SHUFFLE_BUFFER_SIZE)
    names.append(name)

  for task, (generator, languages, metric_fns) in GENERATION_TASKS.items():
    for lang in languages:
      name = task_name(task, lang)
      add_pairs_task(name, generator, lang, split_sizes(task, lang), metric_fns)
      by_task.setdefault(task, []).append(name)
      by_lang.setdefault(lang, []).append(name)
  # The unit task with a larger test split (in no mixture).
  _, unit_languages, unit_metrics = GENERATION_TASKS['unit']
  for lang in unit_languages:
    add_pairs_task(large_test_task_name(lang), data.unit_large_test_examples, lang,
                   dict(split_sizes('unit', lang), test=data.UNIT_LARGE_TEST), unit_metrics)

  # Per-language span corruption tasks, and `offline_span_corruption`: one
  # task over all languages' documents (equal counts per language, so the
  # same distribution as a rate-1 mixture, with one input pipeline).
  pretrain = [(task_name('span_corruption', lang), (lang,))
              for lang in data.PRETRAIN_LANGUAGES]
  pretrain.append((f'{PREFIX}_span_corruption', data.PRETRAIN_LANGUAGES))
  # `offline_denoise`: the same corruption, the whole chunk as target (copy and fill in).
  pretrain.append((f'{PREFIX}_denoise', data.PRETRAIN_LANGUAGES))
  for name, langs in pretrain:
    registry.add_task(
        name,
        source=seqio.FunctionDataSource(
            _text_dataset_fn(langs), splits=data.SPLITS,
            num_input_examples={
                s: n * len(langs) for s, n in
                data.PRETRAIN_SIZES.as_dict().items()}),
        preprocessors=span_corruption.preprocessors(
            full_targets=name == f'{PREFIX}_denoise'),
        output_features=features,
        metric_fns=[],
        shuffle_buffer_size=SHUFFLE_BUFFER_SIZE)
    names.append(name)

  mixtures = {f'{PREFIX}_{task}': members for task, members in by_task.items()}
  mixtures.update({f'{PREFIX}_lang_{lang}': members
                   for lang, members in by_lang.items() if len(members) > 1})
  every = [n for members in by_task.values() for n in members]
  mixtures[f'{PREFIX}_suite_mix'] = every
  mixtures[f'{PREFIX}_bench'] = bench_task_names()
  mixtures[f'{PREFIX}_bench_in_base'] = bench_task_names(NEAR_BASE_LANGUAGES)
  mixtures[f'{PREFIX}_bench_held_out'] = bench_task_names(
      [l for l in data.FORMAT_LANGUAGES if l not in NEAR_BASE_LANGUAGES])
  formatting = [task_name(t, l) for t in ('num2words', 'date', 'currency',
                                          'unit')
                for l in data.FORMAT_LANGUAGES]
  mixtures[f'{PREFIX}_suite_xl_train'] = [
      n for n in formatting if n.rsplit('_', 1)[1] not in HELD_OUT_LANGUAGES]
  mixtures[f'{PREFIX}_suite_xl_heldout'] = [
      n for n in formatting if n.rsplit('_', 1)[1] in HELD_OUT_LANGUAGES]
  # The benchmark base's pretraining: span corruption and denoising reconstruction, 1:1.
  mixtures[f'{PREFIX}_pretrain_mix'] = [f'{PREFIX}_span_corruption', f'{PREFIX}_denoise']
  # The near base's pretraining: that mix 1:1 with the 15 tasks of `offline_bench_in_base` (each
  # half of the examples: the two pretraining tasks at rate 7.5 each, the 15 tasks at 1 each).
  in_base = mixtures[f'{PREFIX}_bench_in_base']
  mixtures[f'{PREFIX}_pretrain_near_mix'] = [
      (f'{PREFIX}_span_corruption', len(in_base) / 2), (f'{PREFIX}_denoise', len(in_base) / 2),
      *((n, 1.0) for n in in_base)]
  for name, members in mixtures.items():
    registry.add_mixture(name, members)
    names.append(name)
  return names


def bench_task_names(languages=data.FORMAT_LANGUAGES) -> list[str]:
  """The benchmark's tasks in `languages`: BENCH_TASKS x languages (all FORMAT_LANGUAGES:
  `offline_bench`)."""
  return [task_name(t, l) for t in BENCH_TASKS for l in languages]


@functools.lru_cache(maxsize=None)
def suite_table() -> list[tuple[str, str, dict[str, int]]]:
  """(task family, language, split sizes) for every registered offline task."""
  rows = []
  for task, (_, languages, _) in GENERATION_TASKS.items():
    rows += [(task, lang, split_sizes(task, lang)) for lang in languages]
  rows += [('span_corruption', lang, split_sizes('span_corruption', lang))
           for lang in data.PRETRAIN_LANGUAGES]
  return rows


OFFLINE_NAMES = register_offline_suite(vocab_lib.byte_vocabulary())
