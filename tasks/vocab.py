"""Vocabularies and output features of every task in this package.

Default: `seqio.ByteVocabulary()` (ByT5 bytes: 0=PAD, 1=EOS, 2=UNK, byte b ->
b + 3; vocab size 259), which needs no file and serves byte-level models.
For T5 / mT5 weights pass a *local* SentencePiece model file (for example the
`spiece.model` shipped beside a Hugging Face checkpoint); remote paths such as
gs:// or http(s):// are refused, so nothing is ever downloaded.

Gin: `tasks.vocab.get_vocabulary.spm_path = '/path/to/spiece.model'` and
`tasks.vocab.get_vocabulary.extra_ids = 100` (T5 sentinels), then call
`tasks.register_all()` after parsing gin so the tasks use that vocabulary.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Mapping

import gin
import seqio

_REMOTE = re.compile(r'^[a-zA-Z][a-zA-Z0-9+.-]*://')


@functools.lru_cache(maxsize=None)
def byte_vocabulary(extra_ids: int = 0) -> seqio.ByteVocabulary:
  """The ByT5 byte vocabulary (cached, so tasks share one instance)."""
  return seqio.ByteVocabulary(extra_ids=extra_ids)


@functools.lru_cache(maxsize=None)
def sentencepiece_vocabulary(
    path: str, extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
  """A SentencePiece vocabulary from a local model file."""
  if _REMOTE.match(path):
    raise ValueError(
        f'SentencePiece model path {path!r} is remote; this project runs '
        'offline: copy the model file (e.g. spiece.model of a T5/mT5 '
        'checkpoint) to local disk and pass its local path.')
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f'SentencePiece model file not found: {path!r}')
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


@gin.configurable
def get_vocabulary(spm_path: str | None = None,
                   extra_ids: int = 0) -> seqio.Vocabulary:
  """ByteVocabulary by default; SentencePiece when `spm_path` is given."""
  if spm_path:
    return sentencepiece_vocabulary(spm_path, extra_ids)
  return byte_vocabulary(extra_ids)


def get_output_features(
    vocabulary: seqio.Vocabulary | None = None
) -> Mapping[str, seqio.Feature]:
  """'inputs' and 'targets', both with EOS appended."""
  vocabulary = vocabulary if vocabulary is not None else byte_vocabulary()
  return {
      'inputs': seqio.Feature(vocabulary=vocabulary, add_eos=True),
      'targets': seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }
