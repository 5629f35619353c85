"""Every gin file in gin/ parses and builds its objects (model configs, adapters, run settings)."""
import glob
import os

import gin
import jax
import pytest

from experiments import main as main_lib  # noqa: F401  registers `run_main`
from sira_jax import eval as eval_lib  # noqa: F401  registers `evaluate`
from sira_jax import gin_utils
from sira_jax import infer as infer_lib  # noqa: F401  registers `infer`
from sira_jax import model_init
from sira_jax.adapters import AdapterConfig
from sira_jax.t5.config import T5Config

GIN_DIR = gin_utils.PROJECT_GIN_DIR
RUN_MACROS = ["MODEL_DIR = '/tmp/unused_model_dir'", "MIXTURE_OR_TASK_NAME = 'offline_suite_mix'",
              'TRAIN_STEPS = 3', "INITIAL_CHECKPOINT_PATH = '/tmp/unused_base'"]
ALL_FILES = sorted(os.path.relpath(p, GIN_DIR)
                   for p in glob.glob(os.path.join(GIN_DIR, '**', '*.gin'), recursive=True))
SIZES = {  # expected (d_model, layers, vocab) of each size file
    'models/t5_tiny.gin': (64, 2, 384), 'models/t5_small.gin': (512, 8, 32128),
    'models/t5_1_1_base.gin': (768, 12, 32128), 'models/t5_1_1_large.gin': (1024, 24, 32128),
    'models/mt5_small.gin': (512, 8, 250112), 'models/mt5_base.gin': (768, 12, 250112),
    'models/t5_1_1_xl.gin': (2048, 24, 32128), 'models/t5_1_1_xxl.gin': (4096, 24, 32128),
    'models/mt5_large.gin': (1024, 24, 250112), 'models/mt5_xl.gin': (2048, 24, 250112),
    'models/mt5_xxl.gin': (4096, 24, 250112),
    'models/t5_bench.gin': (128, 3, 384),
}


pytestmark = pytest.mark.usefixtures('clean_gin')


def _parse(files, bindings=()):
  gin_utils.parse_gin(files, list(bindings), ['.', GIN_DIR])


# How to parse each project gin file on its own: the files it needs before it and the macros it
# requires. A gin file under a directory without a recipe fails `test_every_gin_file_parses`.
# gin/t5x/ needs t5x's configurables: tests/test_t5x_configs.py parses each of those files.
_RECIPES = {
    'models/': ([], []),
    'adapters/': (['models/t5_tiny.gin'], []),
    'runs/': (['models/t5_tiny.gin', 'adapters/lora.gin'], RUN_MACROS),
    'benchmark/': (['adapters/sira.gin'], RUN_MACROS[:1] + RUN_MACROS[3:]),
    'tasks/': ([], []),
    '': ([], []),  # top-level files (main.gin)
}
_REQUIRES_SIZE = {'models/t5_architecture.gin'}  # a template: the size files set its macros


def _recipe(path):
  prefix = os.path.dirname(path) + '/' if os.path.dirname(path) else ''
  if prefix not in _RECIPES:
    pytest.fail(f'no parse recipe for gin/{path}: add its directory to _RECIPES')
  return _RECIPES[prefix]


@pytest.mark.parametrize('path', [f for f in ALL_FILES if not f.startswith('t5x/')])
def test_every_gin_file_parses(path):
  before, macros = _recipe(path)
  files = ['models/t5_tiny.gin'] if path in _REQUIRES_SIZE else [*before, path]
  # The recipe's macros that these files do not use are refused by name (gin_utils): drop those.
  macros = list(macros)
  while True:
    try:
      _parse(files, macros)
      break
    except gin_utils.GinConfigError as e:
      unused = [m for m in macros if f"macro '{m.split(' = ')[0]}'" in str(e)]
      if not unused:
        raise
      macros.remove(unused[0])
      gin.clear_config()
  assert gin.config_str()  # something was bound


@pytest.mark.parametrize('path', sorted(SIZES))
def test_model_files_build_configs(path):
  _parse([path])
  cfg = T5Config()
  d_model, layers, vocab = SIZES[path]
  assert (cfg.d_model, cfg.num_encoder_layers, cfg.vocab_size) == (d_model, layers, vocab)
  assert cfg.adapter.kind == 'none'
  if d_model >= 2048:  # XL/XXL: the same code path as large, only wider (keeps CI time down)
    return
  # The network builds on this config (abstract init: shapes only, no compute).
  model = model_init.build_model(cfg.replace(vocab_size=64) if vocab > 40000 else cfg)
  tokens = (jax.numpy.ones((1, 2), 'int32'),) * 3
  shapes = jax.eval_shape(lambda k: model.init({'params': k}, *tokens, enable_dropout=False),
                          jax.random.PRNGKey(0))
  assert 'params' in shapes


def test_architecture_file_requires_size_macros():
  with pytest.raises(gin_utils.GinConfigError, match='VOCAB_SIZE.*REQUIRED'):
    _parse(['models/t5_architecture.gin'])


@pytest.mark.parametrize('path', sorted(f for f in ALL_FILES if f.startswith('adapters/')))
def test_adapter_files_build_adapted_configs(path):
  _parse(['models/t5_tiny.gin', path])
  cfg = T5Config()
  kind = os.path.splitext(os.path.basename(path))[0]
  assert cfg.adapter.kind == kind
  sites = cfg.adapted_sites()
  assert sites and all(c.kind == kind for c in sites.values())
  # Unadapted sites stay plain: the scoped binding does not leak into AdapterConfig().
  assert AdapterConfig().kind == 'none'
  assert cfg.adapter_for('encoder/mlp/wo').kind == 'none'
  model = model_init.build_model(cfg)
  shapes = jax.eval_shape(lambda k: model.init({'params': k, 'dropout': k},
                                               *(jax.numpy.ones((1, 4), 'int32'),) * 3,
                                               enable_dropout=False), jax.random.PRNGKey(0))
  flat = jax.tree_util.tree_flatten_with_path(shapes['params'])[0]
  names = {jax.tree_util.keystr(p) for p, _ in flat}
  assert any('lora_a' in n for n in names)


@pytest.mark.parametrize('run', ['runs/pretrain.gin', 'runs/finetune.gin', 'runs/common_train.gin'])
def test_train_run_files_bind_train(run):
  files = ['models/t5_tiny.gin'] + (['adapters/sira.gin'] if 'finetune' in run else []) + [run]
  # INITIAL_CHECKPOINT_PATH only where a binding uses it (an unused command-line macro is refused).
  _parse(files, RUN_MACROS if 'finetune' in run else RUN_MACROS[:3])
  b = gin.get_bindings('train')
  assert b['model_dir'] == '/tmp/unused_model_dir' and b['train_steps'] == 3
  assert isinstance(b['model_config'], T5Config) and b['model_config'].d_model == 64
  assert b['task_feature_lengths'] == ({'inputs': 64, 'targets': 32} if run == 'runs/pretrain.gin'
                                       else {'inputs': 128, 'targets': 160})
  if run == 'runs/pretrain.gin':
    assert b['pretrain'] is True and b['learning_rate'] == 1e-2 and b['schedule'] == 'rsqrt'
  if run == 'runs/finetune.gin':
    assert b['pretrain'] is False and b['initial_checkpoint_path'] == '/tmp/unused_base'
    assert b['model_config'].adapter.kind == 'sira'


def test_run_files_require_their_macros():
  with pytest.raises(gin_utils.GinConfigError, match='INITIAL_CHECKPOINT_PATH.*REQUIRED'):
    _parse(['models/t5_tiny.gin', 'adapters/lora.gin', 'runs/finetune.gin'], RUN_MACROS[:3])


@pytest.mark.parametrize('run,fn', [('runs/eval.gin', 'evaluate'), ('runs/infer.gin', 'infer')])
def test_eval_and_infer_run_files(run, fn):
  _parse([run], RUN_MACROS[:2])
  b = gin.get_bindings(fn)
  assert b['model_dir'] == '/tmp/unused_model_dir'
  assert b['mixture_or_task_name'] == 'offline_suite_mix'
  assert b['split'] == ('validation' if fn == 'evaluate' else 'test')


def test_main_gin_builds_its_sweep():
  _parse(['main.gin'])
  sweep = main_lib.main_sweep()
  points = sweep.points()
  assert len(points) == 3 and all(r.kind == 'finetune' for r in sweep.runs)
  seeds = gin.query_parameter('SEEDS/macro.value')
  assert len(seeds) >= 2 and all(len([r for r in sweep.runs if r.point == p]) == len(seeds)
                                 for p in points)
  default = gin.query_parameter('LEARNING_RATE/macro.value')
  rates = gin.query_parameter('main_sweep.method_learning_rates') or {}
  assert all(r.learning_rate == rates.get(r.point, default) for r in sweep.runs)
  assert sweep.routing_points[0] in points
  with gin.unlock_config():
    gin.bind_parameter('main_sweep.method_learning_rates', {'lora r5': 1e-3})
  with pytest.raises(ValueError, match=r"names \['lora r5'\], which are not methods"):
    main_lib.main_sweep()


@pytest.mark.parametrize('files,pretrain,mixture', [
    (['benchmark/pretrain.gin'], True, 'offline_pretrain_mix'),
    (['adapters/sira.gin', 'benchmark/finetune.gin'], False, 'offline_bench'),
    (['benchmark/full_finetune.gin'], True, 'offline_bench')])
def test_benchmark_files(files, pretrain, mixture):
  base = ["INITIAL_CHECKPOINT_PATH = '/tmp/base'"] if mixture == 'offline_bench' else []
  _parse(files, ["MODEL_DIR = '/tmp/unused_model_dir'", *base])
  b = gin.get_bindings('train')
  assert b['pretrain'] == pretrain and b['mixture_or_task_name'] == mixture
  assert b['train_steps'] > 0
  cfg = T5Config()
  assert (cfg.d_model, cfg.num_encoder_layers) == SIZES['models/t5_bench.gin'][:2]
  if mixture == 'offline_bench':
    assert b['initial_checkpoint_path'] == '/tmp/base'  # full fine-tuning starts from the base too
    assert cfg.adapter.kind == ('sira' if 'adapters/sira.gin' in files else 'none')
    if cfg.adapter.kind == 'sira':  # the benchmark's adapter sites win over the adapter file's
      assert '*/mlp/wo' in cfg.adapter_targets


def test_command_line_gin_syntax():
  args = gin_utils.rewrite_gin_args(
      ['prog', '--gin.MODEL_DIR=/tmp/x', '--gin.TRAIN_STEPS=5', '--gin.train.seed', '3',
       "--gin.MIXTURE_OR_TASK_NAME='offline_date'", '--gin_file=models/t5_tiny.gin'])
  assert args == ['prog', "--gin_bindings=MODEL_DIR = '/tmp/x'", '--gin_bindings=TRAIN_STEPS = 5',
                  '--gin_bindings=train.seed = 3',
                  "--gin_bindings=MIXTURE_OR_TASK_NAME = 'offline_date'",
                  '--gin_file=models/t5_tiny.gin']
