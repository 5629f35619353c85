"""The one ```sh block of a README that mentions a word (for tests that run README commands)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh_block(readme: str, word: str) -> str:
  """The single ```sh block of `readme` (relative to the repository root) mentioning `word`."""
  with open(os.path.join(ROOT, readme), encoding='utf-8') as f:
    text = f.read()
  blocks = [b for b in re.findall(r'```sh\n(.*?)```', text, re.S) if word in b]
  assert len(blocks) == 1, f'{readme} should hold exactly one sh block mentioning {word}'
  return blocks[0]
