"""Reading task data files, with one error class that names the file and the line.

`DataError` (a ValueError) is what every task data source raises for data it cannot use: a file
that is missing or empty, not UTF-8, a line that is not JSON, a record without a field. Its
message is one line, `path:line: what is wrong; how to fix` (`DataError.at` builds it), so a
command line can print it as it is. `iter_jsonl` reads a JSON Lines file that way.
"""
from __future__ import annotations

import json
from typing import Any, Iterator


class DataError(ValueError):
  """A task data file is missing, unreadable or malformed. `path` and `line` (1-based; None for
  the whole file) say where."""

  path: str | None = None
  line: int | None = None

  @classmethod
  def at(cls, path: str, line: int | None, problem: str, fix: str) -> 'DataError':
    """`path:line: problem; fix` (no line number when `line` is None)."""
    where = path if line is None else f'{path}:{line}'
    error = cls(f'{where}: {problem}; {fix}')
    error.path, error.line = path, line
    return error


def iter_jsonl(path: str, error: type[DataError] = DataError) -> Iterator[tuple[int, Any]]:
  """(line number from 1, decoded JSON value) of each non-blank line of a UTF-8 JSON Lines file.

  Raises:
    `error` (a DataError subclass): a line that is not UTF-8 or not one JSON value.
  """
  with open(path, 'rb') as f:
    for number, raw in enumerate(f, start=1):
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise error.at(path, number, f'invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte '
                       f'{e.start + 1} of the line)', 'save the file as UTF-8') from None
      if not line.strip():
        continue
      try:
        value = json.loads(line.rstrip('\r\n'))
      except json.JSONDecodeError as e:
        raise error.at(path, number, f'not JSON ({e.msg} at column {e.pos + 1})',
                       'each line must be one JSON object') from None
      yield number, value
