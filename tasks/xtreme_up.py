"""XTREME-UP v1.1 text tasks as seqio Tasks and Mixtures.

Data: the official release `xtreme-up-v1.1.jsonl.tgz`
(https://storage.googleapis.com/xtreme-up/xtreme-up-v1.1.jsonl.tgz, described
at https://github.com/google-research/xtreme-up), unpacked to a directory with
one folder per task, `<task>/<split>/<file>.jsonl`, split in
{train, validation, test}:

| family (folder)        | file stem per language | JSONL fields read             |
|------------------------|------------------------|-------------------------------|
| translation            | en2{lang}              | input, target                 |
| transliteration        | {src}2{tgt}.{lang}     | input, target                 |
| ner                    | {lang}                 | text, spans[start_byte, limit_byte, label] |
| semantic_parsing       | {lang}                 | input, target                 |
| qa_in_lang             | {lang}                 | question, title, context, target |
| qa_cross_lang          | {lang}                 | question, title, context, target |
| retrieval_in_lang      | {lang} (+ index.jsonl) | id, title, context, question  |
| retrieval_cross_lang   | {lang} (+ index.jsonl) | id, title, context, question  |
| autocomplete           | {lang}                 | context, target               |

Preprocessing into (inputs, targets) follows the official baseline
(`baseline/jsonl_to_seqio_tsv_lib.py` and the `*_tasks.py` files):
- translation, semantic parsing: input -> target.
- QA: `question: {question} title: {title} context: {context}` -> target.
- NER: text (tabs -> spaces) -> `LABEL: entity $$ LABEL: entity`, entities cut
  from the UTF-8 bytes [start_byte, limit_byte) of the text.
- transliteration: `{lang}-{src}-{tgt} {input}` -> target (e.g. `hi-Latn-Deva`).
- autocomplete: `{lang}-{context}$` -> target (the `$` marks a partial word).
- retrieval: training pairs lower(question) -> lower(title + ' ' + context);
  query tasks lower(question) -> id and one index task
  lower(title + ' ' + context) -> id per family, lowercased ASCII-only as
  `tf.strings.lower` does in the baseline.
We read the JSONL directly instead of the baseline's TSV round trip, so a tab
or newline inside a field cannot shift columns.

Task names (no model suffix: the vocabulary is a registration argument):
`xtreme_up_translation_en_{lang}`, `xtreme_up_transliteration_{lang}_{src}_{tgt}`,
`xtreme_up_{family}_{lang}` for the others, `xtreme_up_retrieval_{in,cross}_lang_{lang}`
(train pairs), `..._{lang}_query` and `..._index` (inference, MRR).
Mixtures: `xtreme_up_{family}` (all languages), `xtreme_up_{family}_ul` (the
under-represented languages the official scorer reports), and
`xtreme_up_multitask` (every registered generation task, rate 1 each).

Registration is explicit, never at import: `register_xtreme_up(data_dir)`,
also reached through `tasks.register_all()` after gin is parsed (gin
`tasks.xtreme_up.register_xtreme_up.data_dir = '...'` or the
XTREME_UP_DATA_DIR variable) and on the first
`tasks.get_task_or_mixture('xtreme_up_...')`. A subset of the release
registers the complete (task, language) units it holds and warns about the
rest (`missing_files()`; `strict=True` makes them an error). A missing
directory, one without any complete unit, or an empty file raises
`XtremeUpDataError` naming the paths and the release URL; nothing is
registered then. `registration_args()` is what a training run records so eval
and infer register the same tasks.

Files are read when a task's dataset is first built, or all at once by
`check_files(task_names)` (`tasks.check_data`). A line that is not UTF-8, not
JSON, or lacks a field raises `XtremeUpDataError` (a `tasks.DataError`) with a
one-line message `path:line: what is wrong; how to fix`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import gin
import seqio
import tensorflow as tf
from absl import logging

from tasks import metrics
from tasks import registry
from tasks.data_files import DataError, iter_jsonl
from tasks import truncation
from tasks import vocab as vocab_lib

RELEASE_URL = 'https://storage.googleapis.com/xtreme-up/xtreme-up-v1.1.jsonl.tgz'
PROJECT_URL = 'https://github.com/google-research/xtreme-up'
ENV_VAR = 'XTREME_UP_DATA_DIR'
SPLITS = ('train', 'validation', 'test')

# Languages per task in the v1.1 release (evaluation/constants.py there).
_LANGS = {
    'translation': (
        'af am ar as az be bg bn bs ca ceb ckb cs cy da de el es et fa ff fi '
        'fil fr ga gl gu ha he hi hr hu hy id ig is it ja jv ka kk km kn ko ky '
        'lb lg ln lo lt lv mi mk ml mn mr ms mt my ne nl no nso ny om or pa pl '
        'ps pt ro ru sd sk sl sn so sr sv sw ta te tg th tr uk ur uz vi xh yo '
        'zh zu'),
    'ner': 'am bm bbj ee ha ig rw lg luo mos ny pcm sn sw tn tw wo xh yo zu',
    'semantic_parsing': (
        'am be bn fi ha hu ja pt_br ru sw ta tr yo zu de_localized '
        'en de es fr hi th'),
    'semantic_parsing_code_switched': 'bn_cs hi_cs ta_cs',
    'qa_in_lang': 'ar bn fi id ko ru sw te en',
    'qa_cross_lang': (
        'ar bn fi ko ru te as bho brx gbm gom gu hi hne kn mai ml mni mr mwr '
        'or pa ps sa ta ur'),
    'autocomplete': (
        'be lv is et el ug ga ro pcm he id bg sl uk sk gl eu ur hy gd en lt da'),
}
LANGUAGES: dict[str, tuple[str, ...]] = {k: tuple(v.split())
                                         for k, v in _LANGS.items()}
LANGUAGES['retrieval_in_lang'] = LANGUAGES['qa_in_lang']
LANGUAGES['retrieval_cross_lang'] = LANGUAGES['qa_cross_lang']

# (source script, target script) pairs per language; tasks run both ways.
TRANSLITERATION_SCRIPTS: dict[str, tuple[tuple[str, str], ...]] = {
    'am': (('Latn', 'Ethi'),), 'bn': (('Latn', 'Beng'),),
    'gu': (('Latn', 'Gujr'),), 'hi': (('Latn', 'Deva'),),
    'kn': (('Latn', 'Knda'),), 'ml': (('Latn', 'Mlym'),),
    'mr': (('Latn', 'Deva'),),
    'pa': (('Latn', 'Guru'), ('Arab', 'Guru'), ('Latn', 'Arab')),
    'sd': (('Latn', 'Arab'),), 'si': (('Latn', 'Sinh'),),
    'ta': (('Latn', 'Taml'),), 'te': (('Latn', 'Telu'),),
    'ur': (('Latn', 'Arab'),),
}
LANGUAGES['transliteration'] = tuple(TRANSLITERATION_SCRIPTS)

# The benchmark's high-resource languages; every other task language is
# under-represented (matches `constants.is_under_represented` on all task
# languages: locale suffixes such as pt_br / hi_cs are stripped first).
HIGH_RESOURCE = frozenset(
    'en ar ca zh hr cs nl fi fr de hi hu it ja ko fa pl pt ru sr es sv tr vi '
    'cmn'.split())


def is_under_represented(lang: str) -> bool:
  return lang.split('_')[0] not in HIGH_RESOURCE


FAMILIES = ('translation', 'transliteration', 'ner', 'semantic_parsing',
            'qa_in_lang', 'qa_cross_lang', 'retrieval_in_lang',
            'retrieval_cross_lang', 'autocomplete')


class XtremeUpDataError(DataError):
  """The XTREME-UP data directory is missing, incomplete or malformed (a `tasks.DataError`)."""


# ---------------------------------------------------------------------------
# Official preprocessing: one JSON dict -> {'inputs': str, 'targets': str}
# ---------------------------------------------------------------------------

_ASCII_LOWER = str.maketrans('ABCDEFGHIJKLMNOPQRSTUVWXYZ',
                             'abcdefghijklmnopqrstuvwxyz')


def ascii_lower(text: str) -> str:
  """Lowercases A-Z only, like `tf.strings.lower` without an encoding."""
  return text.translate(_ASCII_LOWER)


def preprocess_default(ex: Mapping[str, Any], stem: str) -> dict[str, str]:
  del stem
  return {'inputs': ex['input'], 'targets': ex['target']}


def preprocess_qa(ex: Mapping[str, Any], stem: str) -> dict[str, str]:
  del stem
  return {'inputs': (f"question: {ex['question']} title: {ex['title']} "
                     f"context: {ex['context']}"),
          'targets': ex['target']}


def preprocess_ner(ex: Mapping[str, Any], stem: str) -> dict[str, str]:
  del stem
  text = ex['text']
  raw = text.encode('utf-8')
  spans = [f"{s['label']}: {raw[s['start_byte']:s['limit_byte']].decode('utf-8')}"
           for s in ex['spans']]
  return {'inputs': text.replace('\t', ' '),
          'targets': metrics.NER_DELIMITER.join(spans).replace('\t', ' ')}


def preprocess_transliteration(ex: Mapping[str, Any],
                               stem: str) -> dict[str, str]:
  scripts, lang = stem.split('.')
  src, tgt = scripts.split('2')
  return {'inputs': f"{lang}-{src}-{tgt} {ex['input']}",
          'targets': ex['target']}


def preprocess_autocomplete(ex: Mapping[str, Any],
                            stem: str) -> dict[str, str]:
  return {'inputs': f"{stem}-{ex['context']}$", 'targets': ex['target']}


def _passage(ex: Mapping[str, Any]) -> str:
  return ascii_lower(f"{ex['title']} {ex['context']}")


def preprocess_retrieval_train(ex: Mapping[str, Any],
                               stem: str) -> dict[str, str]:
  del stem
  return {'inputs': ascii_lower(str(ex['question'])), 'targets': _passage(ex)}


def preprocess_retrieval_query(ex: Mapping[str, Any],
                               stem: str) -> dict[str, str]:
  del stem
  return {'inputs': ascii_lower(str(ex['question'])), 'targets': str(ex['id'])}


def preprocess_retrieval_index(ex: Mapping[str, Any],
                               stem: str) -> dict[str, str]:
  del stem
  return {'inputs': _passage(ex), 'targets': str(ex['id'])}


# ---------------------------------------------------------------------------
# Per-family specification
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SubTask:
  """One seqio Task: a family, a language (or script pair) and its files."""
  family: str
  name: str        # registered task name
  stem: str        # file name without '.jsonl'
  lang: str        # language code (for the under-represented mixture)


def subtasks(family: str, languages: Iterable[str] | None = None,
             include_code_switching: bool = False) -> list[SubTask]:
  """The (task, language) units of one family, in official order."""
  if family not in FAMILIES:
    raise ValueError(f'Unknown XTREME-UP family {family!r}; known: {FAMILIES}')
  langs = list(LANGUAGES[family])
  if family == 'semantic_parsing' and include_code_switching:
    langs += LANGUAGES['semantic_parsing_code_switched']
  if languages is not None:
    wanted = set(languages)
    langs = [l for l in langs if l in wanted]
  out = []
  for lang in langs:
    if family == 'translation':
      out.append(SubTask(family, f'xtreme_up_translation_en_{lang}',
                         f'en2{lang}', lang))
    elif family == 'transliteration':
      for a, b in TRANSLITERATION_SCRIPTS[lang]:
        for src, tgt in ((a, b), (b, a)):
          out.append(SubTask(
              family, f'xtreme_up_transliteration_{lang}_{src}_{tgt}',
              f'{src}2{tgt}.{lang}', lang))
    else:
      out.append(SubTask(family, f'xtreme_up_{family}_{lang}', lang, lang))
  return out


_PREPROCESS: dict[str, Callable[[Mapping[str, Any], str], dict[str, str]]] = {
    'translation': preprocess_default,
    'semantic_parsing': preprocess_default,
    'transliteration': preprocess_transliteration,
    'ner': preprocess_ner,
    'qa_in_lang': preprocess_qa,
    'qa_cross_lang': preprocess_qa,
    'autocomplete': preprocess_autocomplete,
    'retrieval_in_lang': preprocess_retrieval_train,
    'retrieval_cross_lang': preprocess_retrieval_train,
}

_METRICS: dict[str, list[Callable[..., Mapping[str, float]]]] = {
    'translation': [metrics.chrf_seqio],
    'semantic_parsing': [metrics.sequence_accuracy_seqio],
    'transliteration': [metrics.cer_seqio],
    'ner': [metrics.span_f1_seqio],
    'qa_in_lang': [metrics.squad_seqio],
    'qa_cross_lang': [metrics.squad_seqio],
    'autocomplete': [metrics.top3_accuracy_seqio],
    'retrieval_in_lang': [],   # training pairs; MRR is on the query tasks
    'retrieval_cross_lang': [],
}


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, stem: str, kind: str, mtime: float,
                 size: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
  del mtime, size  # Cache keys: a rewritten file is read again.
  fn = _preprocess_fn(kind)
  fix = f'expected the official v1.1 JSONL format ({PROJECT_URL})'
  inputs, targets = [], []
  for i, record in iter_jsonl(path, XtremeUpDataError):
    if not isinstance(record, dict):
      raise XtremeUpDataError.at(path, i, f'a JSON {type(record).__name__}, not an object', fix)
    try:
      ex = fn(record, stem)
    except KeyError as e:
      raise XtremeUpDataError.at(path, i, f'missing field {e} of a {kind} record',
                                 fix) from None
    except (ValueError, TypeError) as e:
      raise XtremeUpDataError.at(path, i, f'bad {kind} record ({type(e).__name__}: {e})',
                                 fix) from None
    inputs.append(ex['inputs'])
    targets.append(ex['targets'])
  return tuple(inputs), tuple(targets)


def _preprocess_fn(kind: str):
  if kind == 'retrieval_query':
    return preprocess_retrieval_query
  if kind == 'retrieval_index':
    return preprocess_retrieval_index
  return _PREPROCESS[kind]


def _read(path: str, kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(inputs, targets) of one JSONL file, read once while the file is unchanged."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    raise XtremeUpDataError.at(path, None, 'file not found (removed since registration?)',
                               'restore it or register XTREME-UP again') from None
  return _read_cached(path, os.path.basename(path)[:-len('.jsonl')], kind, st.st_mtime,
                      st.st_size)


def read_examples(path: str, kind: str) -> list[dict[str, str]]:
  """Preprocessed examples of one JSONL file (kind: family or retrieval_*).

  Raises:
    XtremeUpDataError: `path:line: ...` for a line that is not UTF-8, not JSON, or lacks a field.
  """
  inputs, targets = _read(path, kind)
  return [{'inputs': i, 'targets': t} for i, t in zip(inputs, targets)]


def _make_dataset_fn(paths: Mapping[str, str], kind: str):
  """dataset_fn(split, shuffle_files, seed) over preprocessed examples."""

  def dataset_fn(split: str, shuffle_files: bool = False,
                 seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # One file per split; seqio shuffles examples.
    inputs, targets = _read(paths[split], kind)
    return tf.data.Dataset.from_tensor_slices({
        'inputs': tf.constant(list(inputs), dtype=tf.string, shape=[len(inputs)]),
        'targets': tf.constant(list(targets), dtype=tf.string,
                               shape=[len(targets)]),
    })

  return dataset_fn


def check_files(task_names: Iterable[str]) -> list[str]:
  """Reads and decodes every file of the registered XTREME-UP tasks among `task_names` (all
  their splits; other names are ignored); returns the paths read.

  Raises:
    XtremeUpDataError: the first file that is missing, not UTF-8, or has a bad line.
  """
  read = []
  for name in task_names:
    paths, kind = _STATE['files'].get(name, ({}, None))
    for path in paths.values():
      _read(path, kind)
      read.append(path)
  return read


_PREPROCESSORS = [
    seqio.preprocessors.tokenize,
    seqio.CacheDatasetPlaceholder(),
    truncation.append_eos_after_trim,
]


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

_STATE: dict[str, Any] = {'data_dir': None, 'names': [], 'args': None,
                          'missing': [], 'family': {}, 'files': {}}


def registered_data_dir() -> str | None:
  """The data dir of the last successful registration (None if none)."""
  return _STATE['data_dir']


def registered_names() -> list[str]:
  """Task and mixture names registered by the last `register_xtreme_up`."""
  return list(_STATE['names'])


def registration_args() -> dict[str, Any] | None:
  """The JSON-able arguments of the last successful registration (None if
  none): what a training run records so eval and infer can register the same
  tasks (`register_xtreme_up(**args)`)."""
  return dict(_STATE['args']) if _STATE['args'] else None


def family_of(name: str) -> str | None:
  """The family of a registered XTREME-UP task (query tasks: their
  retrieval family); None for any other name."""
  return _STATE['family'].get(name)


def missing_files() -> list[str]:
  """Expected files the last registration did not find (their tasks skipped)."""
  return list(_STATE['missing'])


def unregister() -> None:
  """Removes every task and mixture of the last registration."""
  registry.remove(_STATE['names'])
  _STATE.update(data_dir=None, names=[], args=None, missing=[], family={}, files={})


def expected_files(data_dir: str, families: Sequence[str] | None = None,
                   languages: Iterable[str] | None = None,
                   splits: Sequence[str] = SPLITS,
                   include_code_switching: bool = False) -> list[str]:
  """Every path registration needs, in the official layout."""
  paths = []
  for family in families or FAMILIES:
    for sub in subtasks(family, languages, include_code_switching):
      paths += [os.path.join(data_dir, family, s, f'{sub.stem}.jsonl')
                for s in splits]
    if family.startswith('retrieval'):
      paths.append(os.path.join(data_dir, family, 'index.jsonl'))
  return paths


def _error(msg: str, missing: Sequence[str] = ()) -> XtremeUpDataError:
  return XtremeUpDataError(
      f'{msg}{_listing(missing)}\nExpected the XTREME-UP v1.1 JSONL release laid '
      'out as <data_dir>/<task>/<split>/<file>.jsonl (split in train, '
      'validation, test; retrieval also <task>/index.jsonl). Download '
      f'{RELEASE_URL} (see {PROJECT_URL}), unpack it and pass its directory '
      f'to tasks.xtreme_up.register_xtreme_up(data_dir), or set ${ENV_VAR} '
      "or gin 'tasks.xtreme_up.register_xtreme_up.data_dir'. Use "
      '`families=`/`languages=` to register a subset, `required_splits=` if a '
      'split is absent.')


def _listing(paths: Sequence[str], shown: int = 25) -> str:
  more = (f'\n  ... and {len(paths) - shown} more' if len(paths) > shown
          else '')
  return ''.join(f'\n  {p}' for p in paths[:shown]) + more


@dataclasses.dataclass
class Plan:
  """What a data directory allows: complete (task, language) units to
  register, by family, and the expected files that are missing or empty."""
  data_dir: str
  units: dict[str, list[tuple[SubTask, dict[str, str]]]]  # family -> units
  missing: list[str]
  empty: list[str]


def _split_files(data_dir: str, sub: SubTask, required_splits: Sequence[str],
                 plan: Plan) -> dict[str, str] | None:
  """{split: path} of one unit, or None (recording why) if it is incomplete."""
  paths, absent = {}, []
  for split in SPLITS:
    path = os.path.join(data_dir, sub.family, split, f'{sub.stem}.jsonl')
    if os.path.isfile(path):
      if os.path.getsize(path) == 0:
        plan.empty.append(path)
      paths[split] = path
    elif split in required_splits:
      absent.append(path)
  if not paths and not required_splits:
    absent.append(os.path.join(data_dir, sub.family, '<any split>',
                               f'{sub.stem}.jsonl'))
  plan.missing += absent
  return None if absent else paths


def plan_registration(data_dir: str, families: Sequence[str] | None = None,
                      languages: Iterable[str] | None = None,
                      required_splits: Sequence[str] = SPLITS,
                      include_code_switching: bool = False) -> Plan:
  """Looks at `data_dir` (nothing is registered): which units are complete.

  A unit (one task and language) is complete when every required split file
  exists; a retrieval family also needs its index.jsonl.

  Raises:
    ValueError: an unknown family, or languages matching no requested family.
  """
  for family in families or ():
    if family not in FAMILIES:
      raise ValueError(f'Unknown XTREME-UP family {family!r}; known: '
                       f'{FAMILIES} (ASR is speech and not registered).')
  languages = set(languages) if languages is not None else None
  plan = Plan(data_dir, {}, [], [])
  for family in families or FAMILIES:
    subs = subtasks(family, languages, include_code_switching)
    if not subs:
      if families is not None:
        raise ValueError(f'None of the languages {sorted(languages)} belongs '
                         f'to XTREME-UP family {family!r}.')
      continue
    index = os.path.join(data_dir, family, 'index.jsonl')
    if family.startswith('retrieval') and not os.path.isfile(index):
      plan.missing += [index] + expected_files(data_dir, [family], languages,
                                               required_splits,
                                               include_code_switching)[:-1]
      continue
    if family.startswith('retrieval') and os.path.getsize(index) == 0:
      plan.empty.append(index)
    units = [(sub, paths) for sub in subs
             if (paths := _split_files(data_dir, sub, required_splits, plan))]
    if units:
      plan.units[family] = units
  if not plan.units and languages is not None and families is None and not (
      plan.missing):
    raise ValueError(f'None of the languages {sorted(languages)} belongs to '
                     'an XTREME-UP family.')
  return plan


def _add_task(name: str, paths: Mapping[str, str], kind: str, output_features,
              metric_fns) -> str:
  _STATE['files'][name] = (dict(paths), kind)
  registry.add_task(
      name,
      source=seqio.FunctionDataSource(_make_dataset_fn(paths, kind),
                                      splits=tuple(paths)),
      preprocessors=list(_PREPROCESSORS),
      output_features=output_features,
      metric_fns=list(metric_fns))
  return name


def _register_family(family: str, units: Sequence[tuple[SubTask, dict]],
                     data_dir: str, output_features) -> list[str]:
  """The family's tasks (retrieval: also query and index tasks) and its
  mixtures `xtreme_up_<family>`, `..._ul`, `..._query`."""
  names = [_add_task(sub.name, paths, family, output_features,
                     _METRICS[family]) for sub, paths in units]
  mixtures = {f'xtreme_up_{family}': list(names),
              f'xtreme_up_{family}_ul': [
                  sub.name for sub, _ in units
                  if is_under_represented(sub.lang)]}
  if family.startswith('retrieval'):
    queries = []
    for sub, paths in units:
      eval_paths = {s: p for s, p in paths.items() if s != 'train'}
      if eval_paths:
        queries.append(_add_task(f'{sub.name}_query', eval_paths,
                                 'retrieval_query', output_features,
                                 [metrics.mrr_seqio]))
    names += queries
    names.append(_add_task(
        f'xtreme_up_{family}_index',
        {'index': os.path.join(data_dir, family, 'index.jsonl')},
        'retrieval_index', output_features, []))
    mixtures[f'xtreme_up_{family}_query'] = queries
  for name, members in mixtures.items():
    if members:
      registry.add_mixture(name, members)
      names.append(name)
  return names


def _partial_message(plan: Plan, families, languages,
                     include_code_switching: bool) -> str:
  """'registered ... ; not registered (files missing): ...', one line per family."""
  def langs(units):
    return ' '.join(sub.lang if sub.family != 'transliteration' else
                    sub.name[len('xtreme_up_transliteration_'):]
                    for sub, _ in units)
  registered = '; '.join(f'{f}: {langs(u)}' for f, u in plan.units.items())
  absent = []
  for family in families or FAMILIES:
    subs = subtasks(family, languages, include_code_switching)
    kept = {sub.name for sub, _ in plan.units.get(family, [])}
    lost = [(sub, None) for sub in subs if sub.name not in kept]
    if lost and not kept:
      absent.append(f'{family} (all {len(lost)})')
    elif lost:
      absent.append(f'{family}: {langs(lost)}')
  return (f'XTREME-UP data directory {plan.data_dir} is partial: registered '
          f'{sum(len(u) for u in plan.units.values())} tasks ({registered}). '
          f'Not registered, their files missing: {"; ".join(absent)}. '
          f'{len(plan.missing)} file(s) in all (tasks.xtreme_up.missing_files()'
          ' lists them; strict=True makes this an error).')


@gin.configurable
def register_xtreme_up(
    data_dir: str | None = None,
    families: Sequence[str] | None = None,
    languages: Iterable[str] | None = None,
    required_splits: Sequence[str] = SPLITS,
    vocabulary: seqio.Vocabulary | None = None,
    include_code_switching: bool = False,
    strict: bool = False,
) -> list[str]:
  """Registers the XTREME-UP tasks and mixtures the data dir holds.

  A partial directory (say one family, one language) registers what is
  complete and logs a warning naming the missing files (`missing_files()`
  lists them); `strict=True` makes any missing file an error instead.

  Args:
    data_dir: the unpacked `xtreme-up-v1.1.jsonl` directory; default
      $XTREME_UP_DATA_DIR.
    families: task families (folders) to consider; default all nine text
      families in FAMILIES.
    languages: restrict to these language codes (default: every official
      language of each family).
    required_splits: splits a (task, language) must have to be registered;
      other splits are registered when their file exists.
    vocabulary: seqio vocabulary (default `tasks.vocab.get_vocabulary()`:
      bytes unless gin gives a SentencePiece path).
    include_code_switching: also semantic parsing bn_cs / hi_cs / ta_cs.
    strict: raise if any expected file is missing.

  Returns:
    The registered task and mixture names.

  Raises:
    XtremeUpDataError: data dir not given or not found, no complete unit at
      all, an empty file, or (strict) any missing file. Nothing is registered
      in that case.
  """
  data_dir = data_dir or os.environ.get(ENV_VAR)
  if not data_dir:
    raise _error(f'No XTREME-UP data directory given (argument, gin, or '
                 f'${ENV_VAR}).')
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  if not os.path.isdir(data_dir):
    raise _error(f'XTREME-UP data directory {data_dir} does not exist.')
  families = tuple(families) if families is not None else None
  languages = sorted(set(languages)) if languages is not None else None
  plan = plan_registration(data_dir, families, languages, required_splits,
                           include_code_switching)
  if plan.empty:
    raise _error(f'XTREME-UP data directory {data_dir} has empty file(s):',
                 plan.empty)
  if not plan.units or (strict and plan.missing):
    raise _error(f'XTREME-UP data directory {data_dir} is incomplete: '
                 f'{len(plan.missing)} expected file(s) missing:', plan.missing)
  vocabulary = vocabulary if vocabulary is not None else (
      vocab_lib.get_vocabulary())
  output_features = vocab_lib.get_output_features(vocabulary)

  unregister()  # Drop a previous registration (another dir or vocabulary).
  names: list[str] = []
  for family, units in plan.units.items():
    names += _register_family(family, units, data_dir, output_features)
  registry.add_mixture('xtreme_up_multitask', [
      sub.name for units in plan.units.values() for sub, _ in units])
  names.append('xtreme_up_multitask')
  _STATE['family'] = {
      name: family for family, units in plan.units.items() for sub, _ in units
      for name in (sub.name, f'{sub.name}_query')}
  _STATE.update(data_dir=data_dir, names=names, missing=plan.missing, args=dict(
      data_dir=data_dir, families=list(families) if families else None,
      languages=languages, required_splits=list(required_splits),
      include_code_switching=include_code_switching, strict=strict))
  if plan.missing:
    logging.warning('%s', _partial_message(plan, families, languages,
                                           include_code_switching))
  return names
