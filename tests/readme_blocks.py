"""The one ```sh block of a README that mentions a word, and running it as written (for tests that
run README commands)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sh_block(readme: str, word: str) -> str:
  """The single ```sh block of `readme` (relative to the repository root) mentioning `word`."""
  with open(os.path.join(ROOT, readme), encoding='utf-8') as f:
    text = f.read()
  blocks = [b for b in re.findall(r'```sh\n(.*?)```', text, re.S) if word in b]
  assert len(blocks) == 1, f'{readme} should hold exactly one sh block mentioning {word}'
  return blocks[0]


def run_sh_block(readme: str, word: str, cwd, *, unset: tuple[str, ...] = (),
                 timeout: int = 900) -> subprocess.CompletedProcess:
  """Runs `sh_block(readme, word)` with bash -euo pipefail in `cwd`, as a user would: this
  Python's bin first on PATH, the repository importable, `unset` variables removed from the
  environment. Asserts it exits 0 (the message holds the output's tails)."""
  env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3',
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])
  for name in unset:
    env.pop(name, None)
  proc = subprocess.run(['bash', '-euo', 'pipefail', '-c', sh_block(readme, word)], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc
