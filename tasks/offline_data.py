"""Deterministic example generators of the bundled offline suite.

Everything is generated from data that installed PyPI packages carry
(num2words' number grammars, babel's CLDR locale data); no file is read and
nothing is downloaded. Generation is seeded by a stable hash of the task name
(zlib.crc32, never Python's salted `hash`), so the same package versions give
the same examples on every machine and run. Examples are split without
overlap: the test split is drawn first, then validation, then train.

The same random inputs are used for every language of a task (seeded by the
task, not the language), so the splits are parallel across languages: a test
input is a test input in every language, and cross-lingual transfer can be
measured without leakage.
"""
from __future__ import annotations

import dataclasses
import datetime
import decimal
import functools
import random
import unicodedata
import zlib
from typing import Callable, Sequence

import babel
import babel.dates
import babel.numbers
import babel.units
import num2words as num2words_lib

SPLITS = ('train', 'validation', 'test')

# Languages that both num2words and babel cover well.
FORMAT_LANGUAGES = ('en', 'de', 'fr', 'es', 'it', 'pt', 'ru', 'pl', 'tr', 'fi')

# CLDR locales published in two scripts: (language, source locale, source
# script, target locale, target script).
TRANSLIT_PAIRS = (
    ('sr', 'sr', 'Cyrl', 'sr_Latn', 'Latn'),     # Serbian
    ('bs', 'bs', 'Latn', 'bs_Cyrl', 'Cyrl'),     # Bosnian
    ('ff', 'ff', 'Latn', 'ff_Adlm', 'Adlm'),     # Fula: Latin -> Adlam
    ('shi', 'shi', 'Tfng', 'shi_Latn', 'Latn'),  # Tachelhit: Tifinagh -> Latin
    ('vai', 'vai', 'Vaii', 'vai_Latn', 'Latn'),  # Vai syllabary -> Latin
)
TRANSLIT_LANGUAGES = tuple(p[0] for p in TRANSLIT_PAIRS)

# Unicode character-name prefixes of each script (letters must match).
_SCRIPT_PREFIX = {'Latn': ('LATIN',), 'Cyrl': ('CYRILLIC',),
                  'Adlm': ('ADLAM',), 'Tfng': ('TIFINAGH',), 'Vaii': ('VAI',)}

CURRENCIES = ('EUR', 'USD', 'GBP', 'JPY', 'CHF', 'RUB', 'TRY', 'PLN', 'INR',
              'BRL', 'CNY', 'SEK')
UNITS = ('length-kilometer', 'length-meter', 'length-centimeter',
         'mass-kilogram', 'mass-gram', 'duration-hour', 'duration-minute',
         'duration-day', 'volume-liter', 'temperature-celsius',
         'speed-kilometer-per-hour', 'area-square-meter')
DATE_STYLES = ('medium', 'long')


@dataclasses.dataclass(frozen=True)
class SplitSizes:
  train: int
  validation: int
  test: int

  @property
  def total(self) -> int:
    return self.train + self.validation + self.test

  def as_dict(self) -> dict[str, int]:
    return {'train': self.train, 'validation': self.validation,
            'test': self.test}


FORMAT_SIZES = SplitSizes(train=2000, validation=200, test=200)


def stable_seed(*parts: str) -> int:
  return zlib.crc32('/'.join(parts).encode('utf-8'))


def _split(items: Sequence, sizes: SplitSizes) -> dict[str, list]:
  test = list(items[:sizes.test])
  validation = list(items[sizes.test:sizes.test + sizes.validation])
  train = list(items[sizes.test + sizes.validation:sizes.total])
  return {'train': train, 'validation': validation, 'test': test}


def _unique_draws(draw: Callable[[random.Random], object], n: int,
                  seed: int) -> list:
  rng = random.Random(seed)
  seen, out = set(), []
  for _ in range(100 * n):
    item = draw(rng)
    if item not in seen:
      seen.add(item)
      out.append(item)
      if len(out) == n:
        return out
  raise RuntimeError(f'Could not draw {n} distinct items.')


# ---------------------------------------------------------------------------
# Parallel inputs shared by all languages of a task
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def number_inputs(sizes: SplitSizes = FORMAT_SIZES) -> dict[str, list[int]]:
  """Integers 0 .. 9,999,999, log-uniform in magnitude (small ones common)."""
  def draw(rng):
    return int(10 ** rng.uniform(0, 7)) - 1 if rng.random() < 0.9 else (
        rng.randrange(0, 100))
  return _split(_unique_draws(draw, sizes.total, stable_seed('num2words')),
                sizes)


@functools.lru_cache(maxsize=None)
def date_inputs(sizes: SplitSizes = FORMAT_SIZES
                ) -> dict[str, list[tuple[datetime.date, str]]]:
  """(date in 1900-2099, CLDR style) pairs."""
  start = datetime.date(1900, 1, 1).toordinal()
  end = datetime.date(2099, 12, 31).toordinal()

  def draw(rng):
    return (datetime.date.fromordinal(rng.randint(start, end)),
            rng.choice(DATE_STYLES))
  return _split(_unique_draws(draw, sizes.total, stable_seed('date')), sizes)


@functools.lru_cache(maxsize=None)
def currency_inputs(sizes: SplitSizes = FORMAT_SIZES
                    ) -> dict[str, list[tuple[str, str]]]:
  """(amount with 2 decimals as a string, ISO 4217 code) pairs."""
  def draw(rng):
    cents = int(10 ** rng.uniform(0, 8))  # 0.01 .. 1,000,000.00
    return (f'{cents // 100}.{cents % 100:02d}', rng.choice(CURRENCIES))
  return _split(_unique_draws(draw, sizes.total, stable_seed('currency')),
                sizes)


def _unit_draw(rng: random.Random) -> tuple[str, str]:
  """One (value as a string: integer or one decimal, CLDR unit id) pair."""
  if rng.random() < 0.75:
    value = str(int(10 ** rng.uniform(0, 4)) - 1)  # 0 .. 9998
  else:
    value = f'{rng.randrange(0, 1000)}.{rng.randrange(1, 10)}'
  return (value, rng.choice(UNITS))


@functools.lru_cache(maxsize=None)
def unit_inputs(sizes: SplitSizes = FORMAT_SIZES
                ) -> dict[str, list[tuple[str, str]]]:
  """(value as a string: integer or one decimal, CLDR unit id) pairs."""
  return _split(_unique_draws(_unit_draw, sizes.total, stable_seed('unit')), sizes)


@functools.lru_cache(maxsize=None)
def unit_extra_test_inputs(n: int) -> list[tuple[str, str]]:
  """The n unit inputs drawn after the FORMAT_SIZES.total of `unit_inputs`, from the same seeded
  stream of distinct draws: disjoint from every split of the unit task, whose draws (a prefix of
  the same stream) stay as they are."""
  total = FORMAT_SIZES.total
  return _unique_draws(_unit_draw, total + n, stable_seed('unit'))[total:]


# ---------------------------------------------------------------------------
# Task generators: (task, language) -> {split: [(inputs, targets)]}
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def num2words_examples(lang: str) -> dict[str, list[tuple[str, str]]]:
  """'num2words de: 1234' -> 'eintausendzweihundertvierunddreißig'."""
  return {split: [(f'num2words {lang}: {n}', num2words_lib.num2words(n, lang=lang))
                  for n in nums]
          for split, nums in number_inputs().items()}


@functools.lru_cache(maxsize=None)
def date_examples(lang: str) -> dict[str, list[tuple[str, str]]]:
  """'date long fr: 2023-04-17' -> '17 avril 2023' (CLDR date formats)."""
  return {split: [(f'date {style} {lang}: {d.isoformat()}',
                   babel.dates.format_date(d, format=style, locale=lang))
                  for d, style in items]
          for split, items in date_inputs().items()}


@functools.lru_cache(maxsize=None)
def currency_examples(lang: str) -> dict[str, list[tuple[str, str]]]:
  """'currency de: 1234.50 EUR' -> '1.234,50 €' (CLDR currency formats)."""
  return {split: [(f'currency {lang}: {amount} {code}',
                   babel.numbers.format_currency(amount, code, locale=lang))
                  for amount, code in items]
          for split, items in currency_inputs().items()}


def _unit_example(lang: str, value: str, unit: str) -> tuple[str, str]:
  return (f'unit {lang}: {value} {unit}',
          babel.units.format_unit(decimal.Decimal(value), unit, length='long',
                                  locale=lang))


@functools.lru_cache(maxsize=None)
def unit_examples(lang: str) -> dict[str, list[tuple[str, str]]]:
  """'unit ru: 21 length-kilometer' -> '21 километр' (CLDR plural rules)."""
  return {split: [_unit_example(lang, value, unit) for value, unit in items]
          for split, items in unit_inputs().items()}


# Test examples of the unit task's large-test variant (`unit_large_test_examples`).
UNIT_LARGE_TEST = 500


@functools.lru_cache(maxsize=None)
def unit_large_test_examples(lang: str) -> dict[str, list[tuple[str, str]]]:
  """The unit task with UNIT_LARGE_TEST test examples: its train and validation splits, its 200
  test examples, then the next draws of its input stream (`unit_extra_test_inputs`)."""
  examples = unit_examples(lang)
  extra = unit_extra_test_inputs(UNIT_LARGE_TEST - FORMAT_SIZES.test)
  return dict(examples, test=examples['test'] + [_unit_example(lang, v, u) for v, u in extra])


def _in_script(text: str, script: str) -> bool:
  prefixes = _SCRIPT_PREFIX[script]
  letters = [c for c in text if c.isalpha()]
  if any(c.isdigit() for c in text):  # e.g. 'M01' placeholders
    return False
  return bool(letters) and all(
      unicodedata.name(c, '').startswith(prefixes) for c in letters)


@functools.lru_cache(maxsize=None)
def translit_pairs(lang: str) -> list[tuple[str, str]]:
  """Distinct (source, target) CLDR display names of one key in two scripts.

  Keys: territory, language, currency and script display names, wide and
  abbreviated month names, wide day names. A pair is kept when every letter
  of each side is in that side's script and neither has a digit (drops
  untransliterated fallbacks such as 'M01'), and the source text was not seen
  before.
  """
  (_, src_loc, src_script, tgt_loc, tgt_script), = [
      p for p in TRANSLIT_PAIRS if p[0] == lang]
  src, tgt = babel.Locale.parse(src_loc), babel.Locale.parse(tgt_loc)

  def tables(loc):
    yield from (loc.territories, loc.languages, loc.currencies, loc.scripts)
    yield loc.months['format']['wide']
    yield loc.months['format']['abbreviated']
    yield loc.days['format']['wide']

  pairs, seen = [], set()
  for table_s, table_t in zip(tables(src), tables(tgt)):
    for key in sorted(table_s, key=str):
      if key not in table_t:
        continue
      s, t = table_s[key], table_t[key]
      if s in seen or not _in_script(s, src_script) or not _in_script(
          t, tgt_script):
        continue
      seen.add(s)
      pairs.append((s, t))
  return pairs


def translit_sizes(lang: str) -> SplitSizes:
  n = len(translit_pairs(lang))
  n_eval = min(200, n // 8)
  return SplitSizes(train=n - 2 * n_eval, validation=n_eval, test=n_eval)


@functools.lru_cache(maxsize=None)
def translit_examples(lang: str) -> dict[str, list[tuple[str, str]]]:
  """'translit sr-Cyrl-Latn: Немачка' -> 'Nemačka'."""
  (_, _, src_script, _, tgt_script), = [
      p for p in TRANSLIT_PAIRS if p[0] == lang]
  pairs = list(translit_pairs(lang))
  random.Random(stable_seed('translit', lang)).shuffle(pairs)
  prefix = f'translit {lang}-{src_script}-{tgt_script}: '
  return _split([(prefix + s, t) for s, t in pairs], translit_sizes(lang))


# ---------------------------------------------------------------------------
# Plain text for span-corruption pretraining
# ---------------------------------------------------------------------------

PRETRAIN_LANGUAGES = FORMAT_LANGUAGES + TRANSLIT_LANGUAGES
PRETRAIN_SIZES = SplitSizes(train=1000, validation=50, test=50)


def _locale_for_text(lang: str) -> list[str]:
  """Locales whose data writes this language's text (both scripts if two)."""
  for pair in TRANSLIT_PAIRS:
    if pair[0] == lang:
      return [pair[1], pair[3]]
  return [lang]


@functools.lru_cache(maxsize=None)
def _phrase_pool(lang: str) -> tuple[str, ...]:
  pool = []
  for loc_name in _locale_for_text(lang):
    loc = babel.Locale.parse(loc_name)
    for table in (loc.territories, loc.languages, loc.currencies):
      pool += [table[k] for k in sorted(table, key=str)]
    pool += [loc.months['format']['wide'][m] for m in range(1, 13)]
    pool += [loc.days['format']['wide'][d] for d in range(7)]
  return tuple(dict.fromkeys(p for p in pool if p.strip()))


@functools.lru_cache(maxsize=None)
def pretrain_documents(lang: str) -> dict[str, list[str]]:
  """Short documents of CLDR names, number words, dates and amounts.

  Each document joins 6-12 phrases drawn with a seeded RNG: CLDR display
  names in the language, and (for the FORMAT_LANGUAGES) number words, dates,
  currency amounts and unit expressions formatted for the language.
  """
  rng = random.Random(stable_seed('pretrain', lang))
  pool = _phrase_pool(lang)
  formats = lang in FORMAT_LANGUAGES
  start = datetime.date(1900, 1, 1).toordinal()

  def phrase():
    kind = rng.random() if formats else 0.0
    if kind < 0.6:
      return rng.choice(pool)
    if kind < 0.75:
      return num2words_lib.num2words(rng.randrange(0, 100000), lang=lang)
    if kind < 0.85:
      d = datetime.date.fromordinal(rng.randint(start, start + 73000))
      return babel.dates.format_date(d, format='long', locale=lang)
    if kind < 0.93:
      return babel.numbers.format_currency(
          rng.randrange(1, 100000) / 100, rng.choice(CURRENCIES), locale=lang)
    return babel.units.format_unit(rng.randrange(1, 500), rng.choice(UNITS),
                                   length='long', locale=lang)

  docs = []
  for _ in range(PRETRAIN_SIZES.total):
    n = rng.randint(6, 12)
    sentences, current = [], []
    for _ in range(n):
      current.append(phrase())
      if rng.random() < 0.3:
        sentences.append(', '.join(current) + '.')
        current = []
    if current:
      sentences.append(', '.join(current) + '.')
    docs.append(' '.join(sentences))
  return _split(docs, PRETRAIN_SIZES)
