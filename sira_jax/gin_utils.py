"""T5X-style gin command lines: `--gin_file=a.gin --gin_file=b.gin --gin.NAME=value`.

`--gin.NAME=value` is rewritten to `--gin_bindings=NAME = value` before absl parses flags (as T5X
does). The value is a gin literal; a bare word that is not one (e.g. a path) is quoted for you, so
`--gin.MODEL_DIR=/tmp/run` and `--gin.MODEL_DIR="'/tmp/run'"` mean the same.
Gin files are searched in `--gin_search_paths` (default: the current directory, then the project's
`gin/` directory), so `--gin_file=runs/finetune.gin` works from anywhere.
"""
from __future__ import annotations

import ast
import difflib
import io
import logging
import os
import re
import sys
import textwrap
import tokenize
from typing import Sequence

import gin
from absl import flags

PROJECT_GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'gin')


def define_gin_flags():
  if 'gin_file' in flags.FLAGS:
    return
  flags.DEFINE_multi_string('gin_file', [], 'Gin config files, applied in order.')
  flags.DEFINE_multi_string('gin_bindings', [], 'Gin bindings (NAME=value), applied after files.')
  flags.DEFINE_list('gin_search_paths', ['.', PROJECT_GIN_DIR],
                    'Directories searched for gin files and gin `include`s.')


def _quote_if_needed(value: str) -> str:
  v = value.strip()
  if not v:
    return "''"
  if v.startswith(('@', '%', '(', '[', '{', '"', "'")) or v in ('None', 'True', 'False'):
    return v
  try:
    ast.literal_eval(v)
    return v
  except (ValueError, SyntaxError):
    return repr(v)


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """['--gin.A=1', '--gin.B', 'x'] -> ['--gin_bindings=A = 1', '--gin_bindings=B = 'x'']."""
  out = []
  i = 0
  argv = list(argv)
  while i < len(argv):
    a = argv[i]
    m = re.match(r'^--?gin\.([^=]+)(?:=(.*))?$', a, re.S)
    if m:
      name, value = m.group(1), m.group(2)
      if value is None:
        i += 1
        if i >= len(argv):
          raise ValueError(f'{a} needs a value')
        value = argv[i]
      out.append(f'--gin_bindings={name} = {_quote_if_needed(value)}')
    else:
      out.append(a)
    i += 1
  return out


def flags_parser(argv: Sequence[str]) -> list[str]:
  """absl `flags_parser` for app.run that understands `--gin.NAME=value`."""
  return flags.FLAGS(rewrite_gin_args(argv))


def _harden_gin_file_readers():
  """Makes gin's 'config on the Python path' lookup return False instead of raising.

  gin treats `runs/x.gin` as package `runs` + file; a plain directory named `runs` (or `models`) in
  the working directory, e.g. the main job's output dir, is a namespace package without __file__
  and gin's check raises TypeError before trying the search paths.
  """
  from gin import config as gin_config
  from gin import resource_reader
  # Private access: gin's public `register_file_reader` only appends readers; none replaces one.
  readers = gin_config._FILE_READERS
  for i, (reader, check) in enumerate(list(readers)):
    if check is resource_reader.system_path_file_exists:
      def safe(path, _check=check):
        try:
          return _check(path)
        except Exception:
          return False
      readers[i] = (reader, safe)


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              search_paths: Sequence[str] = ('.', PROJECT_GIN_DIR), *,
              finalize: bool = True, check_unused: Sequence[str] | None = None) -> None:
  """Parses files then bindings; errors (a typo, an unknown name) name the culprit and the files.

  A binding gin refuses raises GinConfigError with `.binding` set to it. check_unused: the
  bindings whose macro the configuration must use (`check_macros_used`; default: all).
  """
  _harden_gin_file_readers()
  for p in search_paths:
    if p and os.path.isdir(p):
      gin.add_config_file_search_path(os.path.abspath(p))
  files = [_resolve(f, search_paths) for f in gin_files]
  where = f'\n  files: {files}\n  bindings: {list(gin_bindings)}'
  logging.disable(logging.ERROR)  # gin logs every search-path miss of an `include` as an error
  try:
    gin.parse_config_files_and_bindings(files, [], finalize_config=False)
  except (ValueError, SyntaxError, KeyError, TypeError, IOError) as e:
    raise GinConfigError(f'gin configuration error: {e}{where}') from e
  finally:
    logging.disable(logging.NOTSET)
  for b in gin_bindings:  # one at a time, so an error names its binding
    try:
      gin.parse_config(b)
    except (ValueError, SyntaxError, KeyError, TypeError) as e:
      raise GinConfigError(f'gin configuration error: {e}{where}', binding=b,
                           reason=f'gin refuses it: {e}') from e
  if finalize:
    try:
      gin.finalize()  # a %gin.REQUIRED macro nothing set is refused here
    except ValueError as e:
      raise GinConfigError(f'gin configuration error: {e}{where}') from e
  check_macros_used(gin_bindings if check_unused is None else check_unused)


def parse_and_register(gin_files: Sequence[str], gin_bindings: Sequence[str],
                       search_paths: Sequence[str] = ('.', PROJECT_GIN_DIR), *,
                       finalize: bool = True, check_unused: Sequence[str] | None = None) -> None:
  """What every gin-configured program does first (train, eval, infer, the experiments): clears
  gin, parses `gin_files` then `gin_bindings` (`parse_gin`), and registers the tasks with the
  configured vocabulary and data directories (`data.register_tasks`)."""
  from sira_jax import data
  gin.clear_config()
  parse_gin(gin_files, gin_bindings, search_paths, finalize=finalize, check_unused=check_unused)
  data.register_tasks()


def binding_macro(binding: str) -> str | None:
  """The macro a binding `NAME = value` defines (None for `configurable.param = value`)."""
  m = re.match(r'^\s*([A-Za-z_][\w]*)\s*=', binding)
  return m.group(1) if m else None


def referenced_macros() -> set[str]:
  """Macros some binding of the parsed gin configuration references (`%NAME`, `%scope/NAME`),
  read from `gin.config_str()`'s tokens (so a '%' inside a string literal is no reference)."""
  tokens = list(tokenize.generate_tokens(io.StringIO(gin.config_str()).readline))
  used = set()
  for i, t in enumerate(tokens):
    if t.type == tokenize.OP and t.string == '%':
      name, j = '', i + 1
      while j < len(tokens) and (tokens[j].type == tokenize.NAME or tokens[j].string in ('/', '.')):
        name += tokens[j].string
        j += 1
      used.add(name)
  return used


def check_macros_used(gin_bindings: Sequence[str]) -> None:
  """Refuses a macro set on the command line (`--gin.NAME=value`) that no binding uses.

  A typo such as `--gin.NUM_EXPERT=8` for NUM_EXPERTS would otherwise define a new, unused macro
  and the run would silently keep the configured value. The error lists the closest macros.
  """
  used = referenced_macros()
  for b in gin_bindings:
    name = binding_macro(b)
    if name is not None and name not in used:
      reason = unused_macro_reason(name, used)
      raise GinConfigError(f'--gin.{name}: {reason}', binding=b, reason=reason)


def unused_macro_reason(name: str, used: set[str]) -> str:
  """Why setting macro `name` is refused, with the closest of the `used` macros."""
  close = difflib.get_close_matches(name, sorted(used), n=5, cutoff=0.6)
  hint = (f'did you mean {", ".join(close)}?' if close else
          f'macros this configuration uses: {", ".join(sorted(used)) or "(none)"}')
  return (f'no binding in the gin files uses the macro {name!r}, so setting it changes nothing; '
          f'{hint}')


def bound_parameters(fn_or_cls) -> set[str]:
  """Names of the parameters of a configurable bound in the gin config (unscoped bindings)."""
  try:
    return set(gin.get_bindings(fn_or_cls, resolve_references=False))
  except (ValueError, KeyError):
    return set()


def _resolve(path: str, search_paths: Sequence[str]) -> str:
  if os.path.isabs(path) and os.path.exists(path):
    return path
  for p in search_paths:
    cand = os.path.join(p, path)
    if os.path.exists(cand):
      return os.path.abspath(cand)
  raise GinConfigError(f'gin file {path!r} not found in search paths {list(search_paths)}')


class GinConfigError(ValueError):
  """A gin configuration that cannot be parsed or sets nothing. binding: the binding to blame
  (None when a file is); reason: why, naming no flag (a CLI names the flag its user typed)."""

  def __init__(self, message: str, *, binding: str | None = None, reason: str | None = None):
    super().__init__(message)
    self.binding = binding
    self.reason = reason or message


def run(main, argv=None):
  """`absl.app.run(main)` with gin flags defined and `--gin.X=v` rewriting."""
  from absl import app
  define_gin_flags()
  app.run(main, argv=argv if argv is not None else sys.argv, flags_parser=flags_parser)


def parse_gin_from_flags(finalize: bool = True):
  """`parse_and_register` with the gin flags (--gin_file, --gin.X / --gin_bindings)."""
  FLAGS = flags.FLAGS
  parse_and_register(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths, finalize=finalize)


# What a CLI reports as a user error (one line, exit 2): configuration, data and checkpoint
# errors are ValueErrors (ConfigError, CheckpointError, tasks.DataError, GinConfigError), an
# unknown task a KeyError, a path that cannot be written an OSError.
USER_ERRORS = (ValueError, KeyError, OSError)


def exit_with_error(e: BaseException, code: int = 2):
  """Prints `error: <message>` as one line on stderr and exits with `code` (no traceback)."""
  msg = e.args[0] if isinstance(e, KeyError) and len(e.args) == 1 else e
  if isinstance(e, OSError) and e.filename and e.strerror:
    msg = f'{e.filename}: {e.strerror}'
  # gin appends "In call to configurable 'train' (<function ...>)" to an error raised inside one.
  text = re.sub(r"\s+In call to configurable .*$", '', str(msg), flags=re.S)
  line = ' '.join(text.split())
  print(f'error: {line}', file=sys.stderr, flush=True)
  sys.exit(code)


def run_gin_command(command, report) -> None:
  """Body of a gin-configured CLI (eval, infer): quiet logs, parse the gin flags and register the
  tasks (`parse_gin_from_flags`), `report(command())`. A user error (`USER_ERRORS`) prints one line
  `error: ...` and exits 2; Ctrl-C exits 130 with one line."""
  quiet_logs()
  try:
    parse_gin_from_flags()
    result = command()
  except USER_ERRORS as e:
    exit_with_error(e, 2)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr, flush=True)
    sys.exit(130)
  report(result)


_SEQIO_NOISE = ('Using an uncached FunctionDataset', 'sequence lengths are longer than necessary',
                "'logger_cls' is empty")


def quiet_logs():
  """CLI logging: absl/seqio at WARNING (progress bars and printed summaries carry the rest)."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  # seqio warns once per task that the bundled (generated, in-memory) tasks are not cached: true
  # and harmless here, and 45 copies of it bury the progress output.
  # Its Evaluator also warns that fixed lengths are "longer than necessary" (they are fixed on
  # purpose: one compiled decode shape for every task) and that "'logger_cls' is empty" (the
  # project writes its own metric files): both on every evaluation, neither actionable.
  logging.getLogger('absl').addFilter(
      lambda record: not any(m in record.getMessage() for m in _SEQIO_NOISE))
  logging.getLogger('tensorflow').setLevel(logging.ERROR)


# ----------------------------------------------------------------------------------------------
# --help (fast: reads the gin files, imports nothing heavy)
# ----------------------------------------------------------------------------------------------
def _gin_file_summary(rel: str) -> tuple[str, list[tuple[str, str]]]:
  """(first comment line, [(MACRO, default)]) of a project gin file."""
  with open(os.path.join(PROJECT_GIN_DIR, rel)) as f:
    lines = f.read().splitlines()
  head = []
  for ln in lines:  # the leading comment block, up to its first sentence
    if not ln.startswith('#'):
      break
    head.append(ln.lstrip('# ').strip())
  title = ' '.join(head)
  m = re.search(r'\.(\s|$)', title)
  title = title[:m.start() + 1] if m else title
  macros = []
  for ln in lines:
    m = re.match(r'^([A-Z][A-Z0-9_]*)\s*=\s*(.+)$', ln)
    if m:
      macros.append((m.group(1), m.group(2).strip()))
  return title, macros


def gin_help(groups: Sequence[str]) -> str:
  """Help text listing the project gin files of `groups` (e.g. 'models', 'adapters', or a
  file 'runs/eval.gin') with their macros and defaults (%gin.REQUIRED: must be set)."""
  out = []
  for g in groups:
    if g.endswith('.gin'):
      files = [g]
    else:
      files = sorted(os.path.join(g, n) for n in os.listdir(os.path.join(PROJECT_GIN_DIR, g))
                     if n.endswith('.gin'))
    out.append(f'{g} (--gin_file=...):' if not g.endswith('.gin') else f'{g}:')
    for rel in files:
      title, macros = _gin_file_summary(rel)
      out.append(f'  {rel:28s} {title}')
      if macros and not rel.startswith('models/'):
        out.append(textwrap.fill(', '.join(f'{k}={v}' for k, v in macros), width=100,
                                 initial_indent=' ' * 6, subsequent_indent=' ' * 6))
  return '\n'.join(out)


def exit_if_help(doc: str, groups: Sequence[str], argv: Sequence[str] | None = None) -> None:
  """`--help` / `-h`: prints the command's docstring and the gin files/macros of `groups`, exits 0.

  Runs before the command imports jax/TensorFlow, so help takes a fraction of a second.
  `--helpfull` still goes to absl (every flag).
  """
  argv = sys.argv[1:] if argv is None else argv
  if not any(a in ('--help', '-h', '--helpshort', '-?') for a in argv):
    return
  print(doc.strip('\n'))
  print()
  print('Set a macro with --gin.NAME=value (e.g. --gin.NUM_EXPERTS=8); a macro no gin file uses is '
        'refused.')
  print(gin_help(groups))
  print('\nFlags: --gin_file (repeatable), --gin.NAME=value / --gin_bindings, --gin_search_paths'
        + (', --overwrite' if 'runs/finetune.gin' in groups else '') + '; --helpfull lists all.')
  sys.exit(0)


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow and seqio (the input pipelines) for a CLI, without the start-up noise.

  TensorFlow's C++ libraries print their start-up lines (oneDNN, "Could not find cuda drivers",
  each twice) straight to the stderr file descriptor, and on a machine without a GPU its first op
  logs "failed call to cuInit". The imports run with fd 2 pointed at /dev/null, and TensorFlow is
  kept off the GPUs (it only feeds data; JAX owns the accelerators, as in T5X). A failing import
  still raises, with stderr restored.
  """
  sys.stderr.flush()
  fd = sys.stderr.fileno()
  saved, devnull = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, fd)
  try:
    import tensorflow as tf
    import seqio  # noqa: F401
    tf.config.set_visible_devices([], 'GPU')
  finally:
    os.dup2(saved, fd)
    os.close(saved)
    os.close(devnull)
