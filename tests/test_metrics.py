"""XTREME-UP metrics on cases worked out by hand from the official definitions.

Each expected number below is derived in the comment next to it from the
definition in google-research/xtreme-up `evaluation/metrics.py` (and
`qa_utils.py`), not from running our code.
"""
import math

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import sacrebleu

from tasks import metrics


@pytest.mark.parametrize('a,b,d', [
    ('kitten', 'sitting', 3),  # k->s, e->i, +g
    ('flaw', 'lawn', 2),       # -f, +n
    ('', 'abc', 3),
    ('abc', 'abc', 0),
    ('ab', 'ba', 2),           # no transpositions (nltk default)
    ('\U0001F600x', 'x', 1),   # one code point (not two UTF-16 units)
    ('\u00e9', 'e\u0301', 2),   # precomposed vs combining: e for \u00e9, +\u0301 (no normalising)
    ('\u0928\u092e\u0938\u094d\u0924\u0947', '\u0928\u092e\u0938\u094d\u0924', 1),  # -vowel sign
])
def test_levenshtein(a, b, d):
  assert metrics.levenshtein(a, b) == d
  assert metrics.levenshtein(b, a) == d


def _edit_distance_by_definition(a, b):
  """nltk.edit_distance's recurrence (unit costs, no transpositions), row by row."""
  row = list(range(len(b) + 1))
  for i, ca in enumerate(a, start=1):
    prev, row[0] = row[0], i
    for j, cb in enumerate(b, start=1):
      prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
  return row[-1]


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.text(alphabet='ab\u00e9\u0301\u0928\U0001F600', max_size=12),
                  st.text(alphabet='ab\u00e9\u0301\u0928\U0001F600', max_size=12))
def test_levenshtein_is_the_official_definition(a, b):
  assert metrics.levenshtein(a, b) == _edit_distance_by_definition(a, b)


def test_cer_docstring_example():
  # Official docstring: edits 1 + 1 over 3 + 2 target chars = 40%.
  assert metrics.cer(['abc', 'aa'], ['abd', 'a']) == pytest.approx(40.0)


def test_cer_is_corpus_level_not_mean_of_ratios():
  # 'a'->'b' is 1 edit / 1 char; 'abcd' exact. Corpus: 1/5 = 20%.
  # (A per-example mean would be (100 + 0) / 2 = 50%.)
  assert metrics.cer(['a', 'abcd'], ['b', 'abcd']) == pytest.approx(20.0)


def test_cer_applies_nfkc():
  # U+FB01 'fi' ligature is NFKC 'fi' (2 chars), so 'fi' is exact: 0%.
  assert metrics.cer(['\ufb01x'], ['fix']) == 0.0
  # Decomposed e + combining acute composes to one char: 'é' vs 'e' is 1/1.
  assert metrics.cer(['e\u0301'], ['e']) == pytest.approx(100.0)


def test_cer_asr_normalisation_matches_official_tests():
  # From the official metrics_test: 2 edits over 13 chars of 'this is a cat'.
  assert metrics.cer(['this is a cat?'], ['this is a t'],
                     apply_asr_normalization=True) == pytest.approx(200 / 13)
  # One substitution + one extra space char: 2 / 9 (the space counts).
  assert metrics.cer(['如果  有多一張船票'], ['如果冇多一張船票'],
                     apply_asr_normalization=True) == pytest.approx(200 / 9)
  assert metrics.asr_text_preprocess('abcd [ABC] (fg) ???   OK! ') == (
      'abcd abc fg ok')


def test_chrf_by_hand():
  # One sentence, ref 'abcdefg' hyp 'abcdefh': for order n both have 8-n
  # n-grams and 7-n match, so P_n = R_n = (7-n)/(8-n); chrF2 of equal P and R
  # averaged over n = 1..6 is their mean.
  expected = 100 * np.mean([(7 - n) / (8 - n) for n in range(1, 7)])
  assert metrics.chrf(['abcdefg'], ['abcdefh']) == pytest.approx(expected)
  # hyp 'ab' ref 'abc': n=1 P=1 R=2/3, n=2 P=1 R=1/2, n>=3 no hyp n-grams
  # (left out of the average). P=1, R=7/12, F2 = 5PR/(4P+R) = 7/11.
  assert metrics.chrf(['abc'], ['ab']) == pytest.approx(700 / 11)
  # Corpus level: statistics are summed over sentences before the ratios.
  # ['abc','x'] vs ['ab','x']: n=1 hyp 3 ref 4 match 3; n=2 hyp 1 ref 2
  # match 1. P=1, R=(3/4+1/2)/2=5/8, F2 = 5*5/8 / (4+5/8) = 25/37.
  assert metrics.chrf(['abc', 'x'], ['ab', 'x']) == pytest.approx(2500 / 37)
  # Whitespace is ignored by default.
  assert metrics.chrf(['a b'], ['ab']) == pytest.approx(100.0)
  assert metrics.chrf(['abc'], ['xyz']) == 0.0


def test_chrf_counts_as_sacrebleu_1x_on_short_references():
  """The official scorer was written for sacrebleu 1.x; 2.x counts short references differently.

  ['', 'x'] vs ['.', 'x']: order 1 has 2 hypothesis chars, 1 reference char, 1 common, orders >= 2
  have no n-grams (left out): P = 1/2, R = 1, F2 = 5 * 1/2 / (4/2 + 1) = 5/6. (sacrebleu 1.5.1
  gives 83.33 too; 2.6.0 gives 100.0.)
  """
  assert metrics.chrf(['', 'x'], ['.', 'x']) == pytest.approx(500 / 6)
  assert sacrebleu.corpus_chrf(['.', 'x'], [['', 'x']]).score == pytest.approx(100.0)


def test_chrf_agrees_with_sacrebleu_2x_on_long_references():
  rng = np.random.default_rng(0)
  for _ in range(30):
    k = int(rng.integers(1, 4))
    words = lambda: ' '.join(''.join(rng.choice(list('abcde.'), int(rng.integers(6, 12))))
                             for _ in range(int(rng.integers(1, 3))))
    targets, predictions = [words() for _ in range(k)], [words() for _ in range(k)]
    assert metrics.chrf(targets, predictions) == pytest.approx(
        sacrebleu.corpus_chrf(predictions, [targets]).score, abs=1e-9)


def test_sequence_accuracy_exact_no_strip():
  assert metrics.sequence_accuracy(['a', 'b', ' c'], ['a', 'B', 'c']) == (
      pytest.approx(100 / 3))


def test_squad_f1_by_hand():
  # 'The Eiffel Tower' -> 'eiffel tower'; 'eiffel tower in Paris' -> 4 tokens.
  # common 2: P = 2/4, R = 2/2, F1 = 2/3. Second pair normalises equal: 1.
  got = metrics.squad_f1(['The Eiffel Tower', 'No Answer'],
                         ['eiffel tower in Paris', 'no answer.'])
  assert got == pytest.approx(100 * (2 / 3 + 1) / 2)
  # Repeated tokens count with multiplicity: 'a b b' vs 'b b b' -> common
  # {b: 2}; P = 2/3, R = 2/3 -> F1 = 2/3. ('a' is an article: use 'x'.)
  assert metrics.squad_f1(['x b b'], ['b b b']) == pytest.approx(200 / 3)
  # Official quirk: both empty after normalisation scores 0, not 1.
  assert metrics.squad_f1(['the'], ['a']) == 0.0
  assert metrics.squad_exact_match(['the'], ['a']) == 100.0


def test_normalize_squad():
  assert metrics.normalize_squad('  The  "Quick", brown-fox!  ') == (
      'quick brownfox')
  # Only ASCII punctuation is removed; non-Latin text is kept.
  assert metrics.normalize_squad('Москва, «город»') == 'москва «город»'


def test_span_f1_by_hand():
  # tp: PER Ada. fp: LOC Paris. fn: LOC Rome, ORG UN. P = 1/2, R = 1/3,
  # F1 = 2 * (1/6) / (5/6) = 0.4.
  got = metrics.span_f1(['PER: Ada $$ LOC: Rome', 'ORG: UN'],
                        ['PER: Ada $$ LOC: Paris', ''])
  assert got == pytest.approx(40.0, abs=1e-9)
  # Multiset matching: gold two 'PER: A', predicted three -> tp 2 fp 1 fn 0;
  # P = 2/3, R = 1, F1 = 0.8.
  assert metrics.span_f1(['PER: A $$ PER: A'],
                         ['PER: A $$ PER: A $$ PER: A']) == pytest.approx(80.0)
  # Whitespace around labels/entities is stripped; pieces without exactly
  # one ':' are dropped on both sides.
  assert metrics.span_f1(['PER:Ada $$ TIME: 10:30'], [' PER :  Ada ']) == (
      pytest.approx(100.0))
  assert metrics.span_f1(['PER: Ada'], ['garbage']) == pytest.approx(0.0)


def test_top3_accuracy():
  assert metrics.top3_accuracy(['a', 'b'], [['x', 'a', 'y'], ['x', 'y', 'z']
                                           ]) == pytest.approx(50.0)
  with pytest.raises(ValueError, match='exactly 3'):
    metrics.top3_accuracy(['a'], [['a', 'b']])


def test_mrr():
  # ranks 1, 3, absent -> (1 + 1/3 + 0) / 3 = 4/9; not scaled by 100.
  got = metrics.mrr(['p1', 'p2', 'p3'],
                    [['p1', 'x'], ['x', 'y', 'p2'], ['z']])
  assert got == pytest.approx(4 / 9)


def test_rank_candidates():
  q = np.array([[1.0, 0.0], [0.0, 1.0]])
  c = np.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]])
  assert metrics.rank_candidates(q, c, ['a', 'b', 'c'], k=2) == [
      ['a', 'c'], ['b', 'c']]


def test_seqio_wrappers_and_score():
  assert metrics.chrf_seqio(['abc'], ['abc']) == {'chrf': pytest.approx(100)}
  assert metrics.cer_seqio(['abc'], ['abd']) == {
      'cer': pytest.approx(100 / 3)}
  assert metrics.squad_seqio(['x y'], ['x y']) == {'f1': 100.0, 'em': 100.0}
  assert metrics.span_f1_seqio(['A: b'], ['A: b'])['span_f1'] == (
      pytest.approx(100.0))
  # One decode per example is never reported as top-3.
  assert metrics.top3_accuracy_seqio(['a', 'b'], ['a', 'c']) == {
      'accuracy_at_1': 50.0}
  assert metrics.top3_accuracy_seqio(['a'], [['c', 'b', 'a']]) == {
      'top3_accuracy': 100.0}
  assert metrics.mrr_seqio(['a', 'b'], ['a', 'c']) == {'mrr': 0.5}
  assert metrics.score('CER', ['ab'], ['a']) == pytest.approx(50.0)
  assert math.isclose(metrics.score('mrr', ['a'], [['b', 'a']]), 0.5)
  with pytest.raises(ValueError):
    metrics.score('bleu', ['a'], ['a'])
  with pytest.raises(ValueError):
    metrics.sequence_accuracy(['a'], ['a', 'b'])
