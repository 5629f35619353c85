"""TFDS-backed tasks (tasks/tfds_tasks.py) over the offline suite built as a TFDS dataset
(tasks/offline_suite_tfds.py), offline: registered through gin/tasks/tfds_task.gin they give the
function-backed tasks' examples, their registration is recorded and re-applied, bad settings and
damaged data raise tasks.DataError naming the dataset, the directory and the fix."""
import dataclasses
import os
import shutil

import gin
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

import tasks
from sira_jax import gin_utils
from tasks import offline_suite_tfds
from tasks import tfds_tasks

CONFIGS = ('date_de', 'unit_fr', 'translit_sr')
LENGTHS = {'inputs': 128, 'targets': 160}
SPLITS = ('train', 'validation', 'test')
GIN_TASKS = {'tfds_offline_date_de': 'offline_date_de', 'tfds_offline_unit_fr': 'offline_unit_fr'}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('tensorflow_datasets'))
  assert offline_suite_tfds.build(d, CONFIGS) == [f'offline_suite/{c}:1.0.0' for c in CONFIGS]
  return d


@pytest.fixture(autouse=True)
def _clean():
  gin.clear_config()
  tfds_tasks.unregister()
  yield
  gin.clear_config()
  tfds_tasks.unregister()


def _examples(name, split):
  """(inputs text, targets text, inputs ids, targets ids) of every example, sorted (TFDS writes
  examples in an order of its own)."""
  ds = tasks.get_task_or_mixture(name).get_dataset(LENGTHS, split=split, shuffle=False)
  return sorted((ex['inputs_pretokenized'], ex['targets_pretokenized'], tuple(ex['inputs']),
                 tuple(ex['targets'])) for ex in ds.as_numpy_iterator())


@seqio.map_over_dataset
def reverse_task(ex):
  """A preprocessor of one's own: the reverse task (formatted text -> raw input)."""
  return {'inputs': ex['targets'], 'targets': ex['inputs']}


class TinySentiment(tfds.core.GeneratorBasedBuilder):
  """A dataset of one's own with a class label, as many TFDS classification datasets have."""
  VERSION = tfds.core.Version('1.0.0')
  SENTENCES = {'train': [('good', 1), ('bad', 0), ('fine', 1)], 'test': [('awful', 0)]}

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'sentence': tfds.features.Text(),
        'label': tfds.features.ClassLabel(names=['negative', 'positive'])}))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in self.SENTENCES}

  def _generate_examples(self, split):
    for i, (sentence, label) in enumerate(self.SENTENCES[split]):
      yield i, {'sentence': sentence, 'label': label}


@seqio.map_over_dataset
def label_name(ex):
  """inputs: the sentence; targets: the label's name."""
  return {'inputs': ex['sentence'],
          'targets': tf.gather(tf.constant(['negative', 'positive']), ex['label'])}


def _register_gin_file(data_dir):
  gin_utils.parse_gin(['tasks/tfds_task.gin'], [f'TFDS_DATA_DIR = {data_dir!r}'],
                      ['.', gin_utils.PROJECT_GIN_DIR])
  return tasks.register_all()


def test_gin_file_tasks_equal_the_function_backed_tasks(data_dir):
  names = _register_gin_file(data_dir)
  assert {*GIN_TASKS, 'tfds_offline_mix'} <= set(names)
  mix = tasks.get_task_or_mixture('tfds_offline_mix')
  assert sorted(t.name for t in mix.tasks) == sorted(GIN_TASKS)
  for tfds_name, offline_name in GIN_TASKS.items():
    task, offline = (tasks.get_task_or_mixture(n) for n in (tfds_name, offline_name))
    assert [f.__name__ for f in task.metric_fns] == [f.__name__ for f in offline.metric_fns]
    assert task.output_features == offline.output_features
    for split in SPLITS:
      got, want = _examples(tfds_name, split), _examples(offline_name, split)
      assert len(got) == len(want) == offline_suite_tfds.offline_suite.split_sizes(
          *offline_name.split('_')[1:])[split]
      assert got == want, (tfds_name, split)
      assert all(ex[3][-1] == 1 for ex in got)  # EOS appended


def test_python_api_with_split_slices_and_metrics(data_dir):
  task = tfds_tasks.TfdsTask(
      name='tfds_translit_sr', tfds_name='offline_suite/translit_sr:1.0.0', metrics=['cer'],
      tfds_data_dir=data_dir, splits={'train': 'train[:100]', 'validation': 'validation'})
  assert tasks.register_tfds_task(task) == 'tfds_translit_sr'
  registered = tasks.get_task_or_mixture('tfds_translit_sr')
  assert registered.splits == ('train', 'validation')
  assert [f.__name__ for f in registered.metric_fns] == ['cer_seqio']
  assert _examples('tfds_translit_sr', 'validation') == _examples('offline_translit_sr',
                                                                  'validation')
  train = _examples('tfds_translit_sr', 'train')
  assert len(train) == 100 and set(train) <= set(_examples('offline_translit_sr', 'train'))


def test_registration_is_recorded_and_reapplied(data_dir, monkeypatch):
  monkeypatch.chdir(data_dir)  # A relative data dir is recorded as an absolute one.
  _register_gin_file('.')
  record = tasks.registration()
  assert set(record) == {'tfds'}
  assert {t['tfds_data_dir'] for t in record['tfds']['tasks']} == {data_dir}
  assert record['tfds']['mixtures'] == {'tfds_offline_mix': sorted(GIN_TASKS)}
  want = _examples('tfds_offline_unit_fr', 'test')
  gin.clear_config()
  tfds_tasks.unregister()
  assert 'tfds_offline_mix' not in tasks.registered_names()
  assert set(tasks.apply_registration(record)) == {*GIN_TASKS, 'tfds_offline_mix'}
  assert tasks.registration() == record
  assert _examples('tfds_offline_unit_fr', 'test') == want
  # Applying it again changes nothing; a differing record keeps the explicit registration.
  assert tasks.apply_registration(record) == []
  other = {'tfds': dict(record['tfds'], mixtures={})}
  assert tasks.apply_registration(other) == [] and tasks.registration() == record


def test_missing_data_dir_names_the_dataset_directory_and_build_command(data_dir, tmp_path):
  empty = str(tmp_path / 'nothing_here')
  task = tfds_tasks.TfdsTask(name='t', tfds_name='offline_suite/date_fr:1.0.0',
                             tfds_data_dir=empty)
  with pytest.raises(tasks.DataError) as e:
    tfds_tasks.register_tfds_tasks([task])
  msg = str(e.value)
  assert msg.startswith(f'{empty}: ')
  assert "'offline_suite/date_fr:1.0.0' is not prepared in this directory" in msg
  assert f'python -m tasks.offline_suite_tfds --data_dir={empty} --configs=date_fr' in msg
  assert 'offline_suite/date_fr/1.0.0/' in msg and '$TFDS_DATA_DIR' in msg
  assert 't' not in tasks.registered_names()


@pytest.mark.parametrize('fields,expected', [
    # A config not built there: the message lists what the directory holds.
    (dict(tfds_name='offline_suite/date_fr:1.0.0'),
     r"'offline_suite/date_fr:1.0.0' is not prepared in this directory .*it holds "
     r"offline_suite/\{date_de/1.0.0, translit_sr/1.0.0, unit_fr/1.0.0\}"),
    (dict(tfds_name='no_such_dataset/x:1.0.0'),
     r"'no_such_dataset/x:1.0.0' is not prepared .*Dataset no_such_dataset not found.*"
     r"tfds.builder\('no_such_dataset/x:1.0.0'"),
    (dict(tfds_name='offline_suite/date_de:1.0.0', input_key='question'),
     r"has no feature 'question' \(input_key\); its features: inputs, targets; set input_key"),
    (dict(tfds_name='offline_suite/date_de:1.0.0', splits=['train', 'dev[:10]']),
     r"has no split 'dev' \(for task split 'dev\[:10\]'\); its splits: "),
])
def test_bad_settings_raise_data_error(data_dir, fields, expected):
  # The first task is fine: nothing is registered when a later one fails.
  good = tfds_tasks.TfdsTask(name='tfds_ok', tfds_name='offline_suite/date_de:1.0.0',
                             tfds_data_dir=data_dir)
  bad = tfds_tasks.TfdsTask(name='tfds_bad', tfds_data_dir=data_dir, **fields)
  with pytest.raises(tasks.DataError, match=expected) as e:
    tfds_tasks.register_tfds_tasks([good, bad])
  assert "TFDS task 'tfds_bad'" in str(e.value) and data_dir in str(e.value)
  assert tfds_tasks.registered_names() == [] and 'tfds_ok' not in tasks.registered_names()


def test_preprocessor_replaces_the_rekey(data_dir):
  task = tfds_tasks.TfdsTask(name='tfds_reverse_date_de', tfds_name='offline_suite/date_de:1.0.0',
                             input_key='unused', preprocessor=reverse_task, tfds_data_dir=data_dir)
  assert task.preprocessor == 'test_tfds_tasks.reverse_task'  # recorded as its import path
  tfds_tasks.register_tfds_tasks([task])
  reverse = _examples('tfds_reverse_date_de', 'validation')
  forward = _examples('offline_date_de', 'validation')
  assert sorted((t, i) for i, t, _, _ in reverse) == sorted((i, t) for i, t, _, _ in forward)
  bad = dataclasses.replace(task, preprocessor='test_tfds_tasks.no_such_function')
  with pytest.raises(ValueError, match=r"cannot import preprocessor 'test_tfds_tasks.no_such_fu"):
    tfds_tasks.register_tfds_tasks([bad])
  # The failed call changed nothing.
  assert tfds_tasks.registered_names() == ['tfds_reverse_date_de']


def test_names_of_other_tasks_are_refused(data_dir):
  task = tfds_tasks.TfdsTask(name='offline_date_de', tfds_name='offline_suite/date_de:1.0.0',
                             tfds_data_dir=data_dir)
  with pytest.raises(ValueError, match="'offline_date_de' is taken by another registered task"):
    tasks.register_tfds_task(task)
  ok = dataclasses.replace(task, name='tfds_date_de')
  with pytest.raises(ValueError, match="'offline_bench' is taken"):
    tfds_tasks.register_tfds_tasks([ok], mixtures={'offline_bench': ['tfds_date_de']})
  assert tasks.get_task_or_mixture('offline_date_de').source.__class__ is seqio.FunctionDataSource


def test_unknown_metric_and_local_preprocessor_are_refused():
  with pytest.raises(ValueError, match=r"unknown metrics \['bleu'\]; known: .*'chrf'"):
    tfds_tasks.TfdsTask(name='t', tfds_name='x', metrics=['bleu'])
  with pytest.raises(ValueError, match='not a module-level function'):
    tfds_tasks.TfdsTask(name='t', tfds_name='x', preprocessor=lambda ds: ds)


def test_check_data_reads_every_shard_and_names_damage(data_dir, tmp_path):
  _register_gin_file(data_dir)
  paths = tasks.check_data('tfds_offline_mix')
  assert len(paths) == 6 and all(os.path.isfile(p) for p in paths)
  assert tasks.check_data('offline_date_de') == []
  # A copy of one dataset, damaged: a shard's bytes, then its dataset_info.json.
  copy = str(tmp_path / 'tfds')
  shutil.copytree(os.path.join(data_dir, 'offline_suite'), os.path.join(copy, 'offline_suite'))
  tasks.register_tfds_task(tfds_tasks.TfdsTask(
      name='tfds_damaged', tfds_name='offline_suite/unit_fr:1.0.0', tfds_data_dir=copy))
  variant = os.path.join(copy, 'offline_suite', 'unit_fr', '1.0.0')
  shard = os.path.join(variant, 'offline_suite-test.tfrecord-00000-of-00001')
  with open(shard, 'r+b') as f:
    f.seek(os.path.getsize(shard) // 2)
    f.write(b'\xff' * 64)
  with pytest.raises(tasks.DataError, match=rf'^{shard}:\d+: .*record \d+ of '
                     r"'offline_suite/unit_fr:1.0.0' does not parse .*build the dataset again "
                     r'\(python -m tasks.offline_suite_tfds') as e:
    tasks.check_data('tfds_damaged')
  assert e.value.path == shard and 1 < e.value.line < 200
  os.remove(os.path.join(variant, 'dataset_info.json'))
  with pytest.raises(tasks.DataError, match=rf"^{copy}: .*is not prepared in this directory"):
    tasks.check_data('tfds_damaged')


def test_tfds_build_arguments_build_the_dataset(tmp_path):
  """The documented `tfds build` arguments, through the build subcommand's own parser and code
  (the `tfds` entry point also imports apache-beam, which this project does not install)."""
  import simple_parsing
  from tensorflow_datasets.scripts.cli import build
  data_dir = str(tmp_path / 'tfds')
  argv = f'offline_suite --imports=tasks.offline_suite_tfds --data_dir={data_dir} --config=date_de'
  simple_parsing.parse(build.Args, args=argv.split()).execute()
  assert tfds_tasks.prepared_variants(data_dir, 'offline_suite') == ['date_de/1.0.0']
  tfds_tasks.register_tfds_task(tfds_tasks.TfdsTask(
      name='tfds_built_by_cli', tfds_name='offline_suite/date_de:1.0.0', tfds_data_dir=data_dir))
  assert _examples('tfds_built_by_cli', 'test') == _examples('offline_date_de', 'test')


def test_class_label_needs_a_preprocessor(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  TinySentiment(data_dir=data_dir).download_and_prepare()
  rekeyed = tfds_tasks.TfdsTask(name='tfds_sentiment', tfds_name='tiny_sentiment:1.0.0',
                                input_key='sentence', target_key='label', tfds_data_dir=data_dir)
  with pytest.raises(tasks.DataError, match=r"feature 'label' \(target_key\) of "
                     r"'tiny_sentiment:1.0.0' is ClassLabel, not text; give a preprocessor"):
    tasks.register_tfds_task(rekeyed)
  tasks.register_tfds_task(dataclasses.replace(rekeyed, preprocessor=label_name))
  assert [ex[:2] for ex in _examples('tfds_sentiment', 'train')] == [
      (b'bad', b'negative'), (b'fine', b'positive'), (b'good', b'positive')]
  assert tasks.get_task_or_mixture('tfds_sentiment').splits == ('train', 'test')
