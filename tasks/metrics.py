"""XTREME-UP evaluation metrics, matching the official scorer's definitions.

The official scorer is `evaluation/metrics.py` of google-research/xtreme-up.
Every metric here returns a number on the 0-100 scale, like the official one
(MRR, which the official scorer reports in [0, 1], is the exception and stays
in [0, 1] as there). Each function takes `targets` then `predictions`, the
order of seqio metric functions; the `*_seqio` wrappers return `{name: value}`
dicts that `seqio.Task(metric_fns=...)` / `seqio.Evaluator` accept.

| task                      | metric               | function            |
|---------------------------|----------------------|---------------------|
| transliteration           | CER (lower = better) | `cer`               |
| translation (MT)          | chrF (corpus, chrF2) | `chrf`              |
| QA in-language / cross    | token F1 (SQuAD)     | `squad_f1`          |
| retrieval                 | MRR@10 over ids      | `mrr`               |
| NER                       | span F1              | `span_f1`           |
| semantic parsing          | sequence accuracy    | `sequence_accuracy` |
| autocomplete              | top-3 accuracy       | `top3_accuracy`     |

chrF: the official `chrf` is `100 * sacrebleu.corpus_chrf(predictions,
targets)`, written for sacrebleu 1.x (under 2.x it raises a TypeError: the
result is a `CHRFScore` object, and the references must be a list of
streams). We compute what it computes under 1.x (1.5.1): corpus chrF2,
character order 6, beta 2, whitespace removed; n-gram counts summed over the
corpus, then precision and recall averaged over the orders that have both
hypothesis and reference n-grams. sacrebleu 2.x counts differently when a
reference is shorter than 6 non-space characters (targets ['', 'x'],
predictions ['.', 'x']: 2.x gives 100.0, 1.x and `chrf` 83.33); on longer
references the two agree (tests/test_metrics.py checks both).
"""
from __future__ import annotations

import collections
import re
import string
import unicodedata
from typing import Any, Mapping, Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein

# ---------------------------------------------------------------------------
# Edit distance / CER
# ---------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
  """Minimum number of single-character insertions, deletions, substitutions.

  Same definition as `nltk.edit_distance(a, b)` with its defaults
  (substitution cost 1, no transpositions), which the official CER uses;
  computed by rapidfuzz over Unicode code points.
  """
  return Levenshtein.distance(a, b)


def asr_text_preprocess(text: str) -> str:
  """Text normalisation of the official ASR CER ('cer_normalized')."""
  text = re.sub(r'[\t\n]', ' ', text.lower())
  text = re.sub(r'[,.\?!]+ ', ' ', text)
  text = re.sub(r'[,.\?!]+$', ' ', text)
  text = re.sub(r' [,.\?!]+', ' ', text)
  text = re.sub(r"['\(\)\[\]]", ' ', text)
  return re.sub(' +', ' ', text.strip())


def cer(targets: Sequence[str], predictions: Sequence[str],
        apply_asr_normalization: bool = False) -> float:
  """Corpus character error rate, in percent.

  100 * sum_i edit(target_i, prediction_i) / sum_i len(target_i), after NFKC
  normalisation of both sides (and the ASR text normalisation if asked).
  Example: targets ['abc', 'aa'], predictions ['abd', 'a'] -> 100 * 2/5 = 40.
  """
  _check_lengths(targets, predictions)
  if apply_asr_normalization:
    targets = [asr_text_preprocess(t) for t in targets]
    predictions = [asr_text_preprocess(p) for p in predictions]
  targets = [unicodedata.normalize('NFKC', t) for t in targets]
  predictions = [unicodedata.normalize('NFKC', p) for p in predictions]
  edits = sum(levenshtein(t, p) for t, p in zip(targets, predictions))
  chars = sum(len(t) for t in targets)
  if chars == 0:
    raise ValueError('CER is undefined when all targets are empty.')
  return 100.0 * edits / chars


# ---------------------------------------------------------------------------
# chrF, sequence accuracy
# ---------------------------------------------------------------------------


def _char_ngrams(text: str, n: int) -> collections.Counter:
  return collections.Counter(text[i:i + n] for i in range(len(text) - n + 1))


def chrf(targets: Sequence[str], predictions: Sequence[str], order: int = 6,
         beta: float = 2.0) -> float:
  """Corpus chrF2 as sacrebleu 1.x computes it, 0-100. See the module docstring.

  stats[n] = (hypothesis n-grams, reference n-grams, common n-grams), summed
  over the corpus; P and R are averaged over the orders where both counts are
  positive; chrF = (1 + b^2) P R / (b^2 P + R).
  """
  _check_lengths(targets, predictions)
  stats = np.zeros((order, 3))
  for target, prediction in zip(targets, predictions):
    ref, hyp = re.sub(r'\s+', '', target), re.sub(r'\s+', '', prediction)
    for n in range(1, order + 1):
      h, r = _char_ngrams(hyp, n), _char_ngrams(ref, n)
      stats[n - 1] += (sum(h.values()), sum(r.values()), sum((h & r).values()))
  valid = (stats[:, 0] > 0) & (stats[:, 1] > 0)
  if not valid.any():
    return 0.0
  precision = float(np.mean(stats[valid, 2] / stats[valid, 0]))
  recall = float(np.mean(stats[valid, 2] / stats[valid, 1]))
  if precision + recall == 0:
    return 0.0
  b2 = beta ** 2
  return 100.0 * (1 + b2) * precision * recall / (b2 * precision + recall)


def sequence_accuracy(targets: Sequence[str],
                      predictions: Sequence[str]) -> float:
  """100 * fraction of predictions exactly equal to their target."""
  _check_lengths(targets, predictions)
  return 100.0 * float(np.mean([p == t for t, p in zip(targets, predictions)]))


# ---------------------------------------------------------------------------
# QA: SQuAD token F1
# ---------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)


def normalize_squad(text: str) -> str:
  """Lowercase, drop ASCII punctuation, drop English articles, squash spaces."""
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in _PUNCTUATION)
  text = re.sub(r'\b(a|an|the)\b', ' ', text)
  return ' '.join(text.split())


def _token_f1(target: str, prediction: str) -> float:
  pred_tokens = prediction.split()
  target_tokens = target.split()
  common = collections.Counter(pred_tokens) & collections.Counter(target_tokens)
  num_same = sum(common.values())
  if num_same == 0:  # Also when both are empty: the official scorer gives 0.
    return 0.0
  precision = num_same / len(pred_tokens)
  recall = num_same / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


def squad_f1(targets: Sequence[str], predictions: Sequence[str]) -> float:
  """Mean per-example token F1 after SQuAD normalisation, 0-100."""
  _check_lengths(targets, predictions)
  scores = [_token_f1(normalize_squad(t), normalize_squad(p))
            for t, p in zip(targets, predictions)]
  return 100.0 * float(np.mean(scores))


def squad_exact_match(targets: Sequence[str],
                      predictions: Sequence[str]) -> float:
  """Exact match after SQuAD normalisation, 0-100 (reported beside F1)."""
  _check_lengths(targets, predictions)
  return 100.0 * float(np.mean([normalize_squad(t) == normalize_squad(p)
                                for t, p in zip(targets, predictions)]))


# ---------------------------------------------------------------------------
# NER: span F1 over "LABEL: entity $$ LABEL: entity"
# ---------------------------------------------------------------------------

NER_DELIMITER = ' $$ '


def parse_ner_spans(text: str) -> list[tuple[str, str]]:
  """'PER: Ada $$ LOC: Rome' -> [('PER', 'Ada'), ('LOC', 'Rome')].

  Pieces that do not split into exactly two parts on ':' are ignored, as in
  the official scorer (so an entity containing ':' never counts).
  """
  spans = []
  for piece in text.split(NER_DELIMITER):
    parts = piece.strip().split(':')
    if len(parts) != 2:
      continue
    spans.append((parts[0].strip(), parts[1].strip()))
  return spans


def span_f1(targets: Sequence[str], predictions: Sequence[str]) -> float:
  """Micro span F1 over (label, entity) pairs, multiset matching, 0-100."""
  _check_lengths(targets, predictions)
  tp = fp = fn = 0
  for target, prediction in zip(targets, predictions):
    gold = parse_ner_spans(target)
    for span in parse_ner_spans(prediction):
      if span in gold:
        tp += 1
        gold.remove(span)
      else:
        fp += 1
    fn += len(gold)
  eps = 1e-13  # The official smoothing constant.
  precision = tp / (tp + fp + eps)
  recall = tp / (tp + fn + eps)
  return 100.0 * 2.0 * precision * recall / (precision + recall + eps)


# ---------------------------------------------------------------------------
# Ranked outputs: autocomplete top-3, retrieval MRR
# ---------------------------------------------------------------------------


def top3_accuracy(targets: Sequence[str],
                  predictions: Sequence[Sequence[str]]) -> float:
  """100 * fraction of examples whose target is among exactly 3 predictions."""
  _check_lengths(targets, predictions)
  for topk in predictions:
    if isinstance(topk, str) or len(topk) != 3:
      raise ValueError(
          f'top-3 accuracy needs exactly 3 predictions per example, got {topk!r}'
          ' (decode with num_decodes=3 and return all decodes).')
  return 100.0 * float(np.mean([any(p == t for p in topk)
                                for t, topk in zip(targets, predictions)]))


def mrr(targets: Sequence[str], predictions: Sequence[Sequence[str]]) -> float:
  """Mean reciprocal rank of the gold id in each ranked list, in [0, 1].

  The official retrieval score ("MRR@10": the lists hold the 10 nearest
  passages); an absent gold id scores 0. Not scaled by 100, as officially.
  """
  _check_lengths(targets, predictions)
  total = 0.0
  for target, ranked in zip(targets, predictions):
    for rank, candidate in enumerate(ranked, start=1):
      if candidate == target:
        total += 1.0 / rank
        break
  return total / len(targets)


def rank_candidates(query_embeddings: np.ndarray,
                    candidate_embeddings: np.ndarray,
                    candidate_ids: Sequence[str], k: int = 10) -> list[list[str]]:
  """Top-k candidate ids per query by dot product.

  query_embeddings: [Q, D]; candidate_embeddings: [N, D] -> Q lists of k ids.
  Ties keep the lower candidate index first.
  """
  scores = np.asarray(query_embeddings) @ np.asarray(candidate_embeddings).T
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return [[candidate_ids[j] for j in row] for row in order]


def _check_lengths(targets: Sequence[Any], predictions: Sequence[Any]) -> None:
  if len(targets) != len(predictions):
    raise ValueError(f'{len(targets)} targets but {len(predictions)} '
                     'predictions.')
  if not len(targets):
    raise ValueError('No examples to score.')


# ---------------------------------------------------------------------------
# seqio metric functions: (targets, predictions) -> {name: value}
# ---------------------------------------------------------------------------


def cer_seqio(targets, predictions) -> Mapping[str, float]:
  return {'cer': cer(targets, predictions)}


def chrf_seqio(targets, predictions) -> Mapping[str, float]:
  return {'chrf': chrf(targets, predictions)}


def sequence_accuracy_seqio(targets, predictions) -> Mapping[str, float]:
  return {'sequence_accuracy': sequence_accuracy(targets, predictions)}


def squad_seqio(targets, predictions) -> Mapping[str, float]:
  return {'f1': squad_f1(targets, predictions),
          'em': squad_exact_match(targets, predictions)}


def span_f1_seqio(targets, predictions) -> Mapping[str, float]:
  return {'span_f1': span_f1(targets, predictions)}


def top3_accuracy_seqio(targets, predictions) -> Mapping[str, float]:
  """Top-3 accuracy for 3 decodes per example; accuracy@1 for single strings.

  The seqio Evaluator hands one decoded string per example unless the model
  returns all of 3 decodes; a single string is scored as 'accuracy_at_1',
  never mislabelled as top-3.
  """
  if predictions and all(isinstance(p, str) for p in predictions):
    return {'accuracy_at_1': sequence_accuracy(targets, predictions)}
  return {'top3_accuracy': top3_accuracy(targets, predictions)}


def mrr_seqio(targets, predictions) -> Mapping[str, float]:
  """MRR where each prediction is a ranked list of passage ids."""
  if predictions and all(isinstance(p, str) for p in predictions):
    # One id per example (e.g. a generative retriever's single decode).
    predictions = [[p] for p in predictions]
  return {'mrr': mrr(targets, predictions)}


# seqio metric functions by name, for tasks configured by name (tasks/tfds_tasks.py, gin).
SEQIO_METRIC_FNS = {
    'cer': cer_seqio,
    'chrf': chrf_seqio,
    'sequence_accuracy': sequence_accuracy_seqio,
    'squad': squad_seqio,
    'span_f1': span_f1_seqio,
    'top3_accuracy': top3_accuracy_seqio,
    'mrr': mrr_seqio,
}


OFFICIAL_METRIC = {
    'transliteration': 'cer',
    'translation': 'chrf',
    'qa_in_lang': 'f1',
    'qa_cross_lang': 'f1',
    'retrieval_in_lang': 'mrr',
    'retrieval_cross_lang': 'mrr',
    'ner': 'span_f1',
    'semantic_parsing': 'sequence_accuracy',
    'autocomplete': 'top3_accuracy',
}

_SCORERS = {
    'cer': cer,
    'cer_normalized': lambda t, p: cer(t, p, apply_asr_normalization=True),
    'chrf': chrf,
    'f1': squad_f1,
    'span_f1': span_f1,
    'sequence_accuracy': sequence_accuracy,
    'top3_accuracy': top3_accuracy,
    'mrr': mrr,
}


def score(metric_name: str, targets, predictions) -> float:
  """Scores by the official metric name ('cer', 'chrf', 'f1', 'mrr', ...)."""
  key = metric_name.lower()
  if key not in _SCORERS:
    raise ValueError(f'Unknown metric {metric_name!r}; known: {sorted(_SCORERS)}')
  return _SCORERS[key](targets, predictions)
