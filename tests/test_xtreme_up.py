"""XTREME-UP registration and preprocessing on fixture files in the official format.

The fixtures are small JSONL files this test writes in the release layout
`<task>/<split>/<file>.jsonl`, with the field names of the v1.1 release.
"""
import json
import os
import re

import numpy as np
import pytest
import seqio

import tasks
from tasks import registry
from tasks import xtreme_up

_EXAMPLES = {
    'translation': [{'input': 'Good morning.', 'target': 'Bonjour.'},
                    {'input': 'Thanks', 'target': 'Merci'}],
    'semantic_parsing': [{'input': 'set an alarm for 7',
                          'target': '[IN:CREATE_ALARM [SL:DATE_TIME for 7 ] ]'}],
    'qa_in_lang': [{'question': 'Who?', 'title': 'Ada', 'context': 'Ada wrote.',
                    'target': 'Ada'}],
    'qa_cross_lang': [{'question': 'Wer?', 'title': 'Ada',
                       'context': 'Ada wrote.', 'target': 'Ada'}],
    # 'Zoë' takes 4 bytes: 'é'-like chars are 2 bytes in UTF-8.
    'ner': [{'text': 'Zoë\tlives in Lagos',
             'spans': [{'start_byte': 0, 'limit_byte': 4, 'label': 'PER'},
                       {'start_byte': 14, 'limit_byte': 19, 'label': 'LOC'}]}],
    'autocomplete': [{'context': 'The cat sat on the m', 'target': 'mat'}],
    'transliteration': [{'input': 'namaste', 'target': 'नमस्ते'}],
    'retrieval_in_lang': [{'id': 'p7', 'title': 'Ada LOVELACE',
                           'context': 'WROTE Notes', 'question': 'WHO Wrote?'}],
    'retrieval_cross_lang': [{'id': 'q1', 'title': 'T', 'context': 'C',
                              'question': 'Ü Q?'}],
}
_INDEX = [{'id': 'p7', 'title': 'Ada LOVELACE', 'context': 'WROTE Notes'},
          {'id': 'p8', 'title': 'Other', 'context': 'Text'}]


def _write(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')


def write_release(root, families=xtreme_up.FAMILIES, languages=None,
                  skip=()):
  """Writes a fixture release; returns the list of written paths."""
  written = []
  for family in families:
    for sub in xtreme_up.subtasks(family, languages):
      for split in xtreme_up.SPLITS:
        path = os.path.join(root, family, split, f'{sub.stem}.jsonl')
        if os.path.relpath(path, root) in skip:
          continue
        _write(path, _EXAMPLES[family])
        written.append(path)
    if family.startswith('retrieval'):
      _write(os.path.join(root, family, 'index.jsonl'), _INDEX)
  return written


def _first(name, split='test'):
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False)
  return [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in ex.items()}
          for ex in ds.as_numpy_iterator()]


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('xtreme_up'))
  write_release(root)
  names = xtreme_up.register_xtreme_up(root)
  yield root, names
  xtreme_up.unregister()


def test_registers_every_family_language_and_mixture(release):
  _, names = release
  n_trans = sum(2 * len(p) for p in xtreme_up.TRANSLITERATION_SCRIPTS.values())
  expected_tasks = (93 + n_trans + 20 + 21 + 9 + 26 + 2 * (9 + 26) + 23
                    + 2)  # retrieval: train + query tasks; 2 index tasks
  tasks_ = [n for n in names if n in seqio.TaskRegistry.names()]
  assert len(tasks_) == expected_tasks
  for family in xtreme_up.FAMILIES:
    assert f'xtreme_up_{family}' in seqio.MixtureRegistry.names()
  assert 'xtreme_up_multitask' in seqio.MixtureRegistry.names()
  assert 'xtreme_up_retrieval_in_lang_query' in names
  # Under-represented mixtures: MT drops the 23 high-resource languages.
  ul = seqio.get_mixture_or_task('xtreme_up_translation_ul')
  assert len(ul.tasks) == 93 - 23
  assert 'xtreme_up_translation_en_de' not in {t.name for t in ul.tasks}
  assert 'xtreme_up_translation_en_sw' in {t.name for t in ul.tasks}
  # Code-switched semantic parsing (bn_cs, hi_cs, ta_cs) is off by default.
  assert not [n for n in names if n.startswith('xtreme_up_semantic_parsing')
              and n.endswith('_cs')]
  assert len(seqio.get_mixture_or_task('xtreme_up_transliteration').tasks) == 30


def test_official_preprocessing(release):
  assert _first('xtreme_up_translation_en_am')[0]['inputs_pretokenized'] == (
      'Good morning.')
  qa = _first('xtreme_up_qa_in_lang_sw')[0]
  assert qa['inputs_pretokenized'] == (
      'question: Who? title: Ada context: Ada wrote.')
  assert qa['targets_pretokenized'] == 'Ada'
  ner = _first('xtreme_up_ner_yo')[0]
  assert ner['inputs_pretokenized'] == 'Zoë lives in Lagos'  # tab -> space
  assert ner['targets_pretokenized'] == 'PER: Zoë $$ LOC: Lagos'
  ac = _first('xtreme_up_autocomplete_ga')[0]
  assert ac['inputs_pretokenized'] == 'ga-The cat sat on the m$'
  assert ac['targets_pretokenized'] == 'mat'
  tr = _first('xtreme_up_transliteration_pa_Arab_Guru')[0]
  assert tr['inputs_pretokenized'] == 'pa-Arab-Guru namaste'
  sp = _first('xtreme_up_semantic_parsing_pt_br')[0]
  assert sp['targets_pretokenized'].startswith('[IN:CREATE_ALARM')
  ret = _first('xtreme_up_retrieval_in_lang_bn', split='train')[0]
  assert ret['inputs_pretokenized'] == 'who wrote?'
  assert ret['targets_pretokenized'] == 'ada lovelace wrote notes'
  query = _first('xtreme_up_retrieval_cross_lang_ta_query')[0]
  # ASCII-only lowercasing, as tf.strings.lower in the baseline: Ü stays.
  assert query['inputs_pretokenized'] == 'Ü q?'
  assert query['targets_pretokenized'] == 'q1'
  index = _first('xtreme_up_retrieval_in_lang_index', split='index')
  assert [e['targets_pretokenized'] for e in index] == ['p7', 'p8']


def test_tokenized_with_eos_and_metrics(release):
  ex = _first('xtreme_up_translation_en_am', split='train')[0]
  assert ex['targets'][-1] == 1  # EOS
  # Byte vocabulary: UTF-8 byte b -> id b + 3.
  assert list(ex['targets'][:-1]) == [b + 3 for b in 'Bonjour.'.encode()]
  task = seqio.get_mixture_or_task('xtreme_up_translation_en_am')
  assert [f.__name__ for f in task.metric_fns] == ['chrf_seqio']
  assert seqio.get_mixture_or_task('xtreme_up_ner_yo').metric_fns[0](
      ['PER: a'], ['PER: a']) == {'span_f1': pytest.approx(100.0)}
  assert seqio.get_mixture_or_task(
      'xtreme_up_retrieval_in_lang_ar_query').metric_fns[0].__name__ == (
          'mrr_seqio')


@pytest.mark.parametrize('name,expected', [
    ('xtreme_up_ner_yo', {'span_f1': 100.0}),
    ('xtreme_up_qa_cross_lang_ta', {'f1': 100.0, 'em': 100.0}),
    ('xtreme_up_transliteration_hi_Latn_Deva', {'cer': 0.0}),
    ('xtreme_up_translation_en_am', {'chrf': 100.0}),
    ('xtreme_up_semantic_parsing_ja', {'sequence_accuracy': 100.0}),
    ('xtreme_up_autocomplete_ga', {'accuracy_at_1': 100.0}),
    ('xtreme_up_retrieval_in_lang_ar_query', {'mrr': 1.0}),
])
def test_evaluator_perfect_predictions(release, name, expected):
  """seqio.Evaluator with a predictor that echoes targets scores perfectly."""
  evaluator = seqio.Evaluator(
      name, feature_converter=seqio.EncDecFeatureConverter(pack=False),
      eval_split='test', use_memory_cache=False, sequence_length=None,
      async_compute_metrics=False)

  def predict_fn(ds):  # Targets as the model's output tokens (EOS, padding).
    return [(i, ex['decoder_target_tokens'].tolist())
            for i, ex in ds.as_numpy_iterator()]

  result, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn)
  got = result.result()[name]
  assert got == pytest.approx(expected)


def test_get_task_or_mixture_suggests(release):
  assert tasks.get_task_or_mixture('xtreme_up_ner_yo').name == 'xtreme_up_ner_yo'
  with pytest.raises(KeyError, match='xtreme_up_ner_yo'):
    tasks.get_task_or_mixture('xtreme_up_ner_yoo')


def test_reregistration_is_idempotent(release):
  root, names = release
  again = xtreme_up.register_xtreme_up(root)
  assert again == names


def test_missing_dir_names_paths_and_release(tmp_path, monkeypatch):
  monkeypatch.delenv(xtreme_up.ENV_VAR, raising=False)
  with pytest.raises(xtreme_up.XtremeUpDataError,
                     match='storage.googleapis.com/xtreme-up'):
    xtreme_up.register_xtreme_up(None)
  with pytest.raises(xtreme_up.XtremeUpDataError, match='does not exist'):
    xtreme_up.register_xtreme_up(str(tmp_path / 'nope'))


def test_partial_dir_registers_what_is_there_and_names_the_rest(tmp_path, caplog):
  """One family, one language: registers it (no '773 expected file(s) missing') and warns."""
  write_release(str(tmp_path), families=('ner',), languages=['yo'])
  caplog.set_level('WARNING')
  try:
    names = xtreme_up.register_xtreme_up(str(tmp_path))
    assert names == ['xtreme_up_ner_yo', 'xtreme_up_ner', 'xtreme_up_ner_ul',
                     'xtreme_up_multitask']
    assert [t.name for t in seqio.get_mixture_or_task('xtreme_up_multitask').tasks] == [
        'xtreme_up_ner_yo']
    missing = xtreme_up.missing_files()
    assert os.path.join(str(tmp_path), 'ner', 'test', 'zu.jsonl') in missing
    assert os.path.join(str(tmp_path), 'translation', 'train', 'en2am.jsonl') in missing
    assert os.path.join(str(tmp_path), 'retrieval_in_lang', 'index.jsonl') in missing
    warning = ' '.join(r.getMessage() for r in caplog.records)
    assert 'partial' in warning and 'registered 1 tasks (ner: yo)' in warning
    assert 'translation (all 93)' in warning and 'ner: am bm' in warning
    assert f'{len(missing)} file(s) in all' in warning
    assert _first('xtreme_up_ner_yo')[0]['targets_pretokenized'] == 'PER: Zoë $$ LOC: Lagos'
    # strict=True: any missing file is an error, and nothing changes.
    with pytest.raises(xtreme_up.XtremeUpDataError, match='incomplete'):
      xtreme_up.register_xtreme_up(str(tmp_path), strict=True)
    assert xtreme_up.registered_names() == names
  finally:
    xtreme_up.unregister()


def test_incomplete_units_are_skipped_and_listed(tmp_path):
  before = set(registry.registered_names())
  write_release(str(tmp_path), families=('ner',),
                skip=('ner/test/yo.jsonl', 'ner/validation/zu.jsonl'))
  try:
    names = xtreme_up.register_xtreme_up(str(tmp_path), families=['ner'])
    assert 'xtreme_up_ner_yo' not in names and 'xtreme_up_ner_zu' not in names
    assert 'xtreme_up_ner_sw' in names
    assert xtreme_up.missing_files() == [
        os.path.join(str(tmp_path), 'ner', 'test', 'yo.jsonl'),
        os.path.join(str(tmp_path), 'ner', 'validation', 'zu.jsonl')]
  finally:
    xtreme_up.unregister()
  # No complete unit at all: an error listing the missing files; nothing registered.
  with pytest.raises(xtreme_up.XtremeUpDataError,
                     match=r'(?s)incomplete: 3 expected file\(s\).*semantic_parsing/test/ja'):
    xtreme_up.register_xtreme_up(str(tmp_path), families=['semantic_parsing'],
                                 languages=['ja'])
  assert set(registry.registered_names()) == before


def test_registration_record_is_reapplied(tmp_path, monkeypatch):
  """What a run records (tasks.registration) registers the same tasks in a fresh state."""
  write_release(str(tmp_path), families=('autocomplete',), languages=['ga', 'en'])
  monkeypatch.delenv(xtreme_up.ENV_VAR, raising=False)
  try:
    names = xtreme_up.register_xtreme_up(str(tmp_path), families=['autocomplete'],
                                         languages=['ga'])
    record = json.loads(json.dumps(tasks.registration()))  # as run_config.json holds it
    assert record['xtreme_up']['languages'] == ['ga']
    xtreme_up.unregister()
    assert tasks.registration() == {}
    assert tasks.apply_registration(record) == names
    assert tasks.family('xtreme_up_autocomplete_ga') == 'xtreme_up_autocomplete'
    assert tasks.family('offline_num2words_de') == 'offline_num2words'
  finally:
    xtreme_up.unregister()


def test_infer_registers_the_tasks_of_the_run(tmp_path, monkeypatch):
  """infer (like eval) re-applies the registration recorded in the run's run_config.json."""
  from sira_jax import infer as infer_lib
  write_release(str(tmp_path / 'data'), families=('autocomplete',), languages=['ga'])
  monkeypatch.delenv(xtreme_up.ENV_VAR, raising=False)
  run = tmp_path / 'run'
  run.mkdir()
  try:
    xtreme_up.register_xtreme_up(str(tmp_path / 'data'))
    (run / 'run_config.json').write_text(json.dumps(tasks.registration()))
    xtreme_up.unregister()

    def echo_target(batch):  # 'mat' + EOS for every row
      return np.tile(np.array([[ord('m') + 3, ord('a') + 3, ord('t') + 3, 1]]),
                     (len(batch['encoder_input_tokens']), 1))

    [path] = infer_lib.infer(model_dir=str(run), mixture_or_task_name='xtreme_up_autocomplete',
                             split='test', task_feature_lengths={'inputs': 64, 'targets': 8},
                             predict=echo_target, progress_bar=False)
    assert [json.loads(l)['prediction'] for l in open(path)] == ['mat']
  finally:
    xtreme_up.unregister()


def test_no_import_cycle_and_no_registration_at_import(tmp_path):
  """tasks.registry knows no family; importing tasks registers no XTREME-UP task, even with
  $XTREME_UP_DATA_DIR set (registration waits for register_all or first use)."""
  import ast
  import subprocess
  import sys
  tree = ast.parse(open(registry.__file__, encoding='utf-8').read())
  imported = [getattr(n, 'module', None) or n.names[0].name for n in ast.walk(tree)
              if isinstance(n, (ast.Import, ast.ImportFrom))]
  assert not [m for m in imported if m and m.startswith('tasks')], imported
  write_release(str(tmp_path), families=('ner',), languages=['yo'])
  code = ('import seqio, tasks; '
          'assert not [n for n in seqio.TaskRegistry.names() if n.startswith("xtreme_up")]; '
          'assert tasks.get_task_or_mixture("xtreme_up_ner_yo").name == "xtreme_up_ner_yo"')
  env = dict(os.environ, XTREME_UP_DATA_DIR=str(tmp_path), TF_CPP_MIN_LOG_LEVEL='3')
  subprocess.run([sys.executable, '-c', code], env=env, check=True, timeout=300)


def test_empty_file_is_an_error(tmp_path):
  write_release(str(tmp_path), families=('autocomplete',), languages=['en'])
  open(tmp_path / 'autocomplete' / 'test' / 'en.jsonl', 'w').close()
  with pytest.raises(xtreme_up.XtremeUpDataError, match='empty'):
    xtreme_up.register_xtreme_up(str(tmp_path), families=['autocomplete'],
                                 languages=['en'])


def test_subset_and_optional_train(tmp_path):
  write_release(str(tmp_path), families=('qa_cross_lang',), languages=['hi'],
                skip=('qa_cross_lang/train/hi.jsonl',))
  with pytest.raises(xtreme_up.XtremeUpDataError, match='train'):
    xtreme_up.register_xtreme_up(str(tmp_path), languages=['hi'],
                                 families=['qa_cross_lang'])
  names = xtreme_up.register_xtreme_up(
      str(tmp_path), families=['qa_cross_lang'], languages=['hi'],
      required_splits=('validation', 'test'))
  try:
    task = seqio.get_mixture_or_task('xtreme_up_qa_cross_lang_hi')
    assert set(task.splits) == {'validation', 'test'}
    assert names == ['xtreme_up_qa_cross_lang_hi', 'xtreme_up_qa_cross_lang',
                     'xtreme_up_multitask']  # hi is high-resource: no _ul
  finally:
    xtreme_up.unregister()


def test_bad_json_line_reports_location(tmp_path):
  write_release(str(tmp_path), families=('translation',), languages=['am'])
  with open(tmp_path / 'translation' / 'train' / 'en2am.jsonl', 'a') as f:
    f.write('{"input": "no target"}\n')
  xtreme_up.register_xtreme_up(str(tmp_path), families=['translation'], languages=['am'])
  try:
    with pytest.raises(xtreme_up.XtremeUpDataError, match=r'en2am.jsonl:3'):
      _first('xtreme_up_translation_en_am', split='train')
  finally:
    xtreme_up.unregister()


@pytest.mark.parametrize('bad_line,problem', [
    (b'{"input": "caf\xe9", "target": "x"}\n',
     r'invalid UTF-8 \(byte 0xe9 at byte 15 of the line\); save the file as UTF-8'),
    (b'{"input": "x", "target": \n', r'not JSON \(Expecting value at column 26\); each line '
     r'must be one JSON object'),
    (b'{"input": "no target"}\n', r"missing field 'target' of a translation record; expected "
     r'the official v1.1 JSONL format'),
    (b'["input", "target"]\n', r'a JSON list, not an object'),
])
def test_data_errors_name_the_file_and_line_in_one_line(tmp_path, bad_line, problem):
  write_release(str(tmp_path), families=('translation',), languages=['am'])
  path = str(tmp_path / 'translation' / 'validation' / 'en2am.jsonl')
  with open(path, 'ab') as f:  # lines 1-2 are good, line 3 is not
    f.write(bad_line)
  xtreme_up.register_xtreme_up(str(tmp_path), families=['translation'], languages=['am'])
  try:
    for read in (lambda: tasks.check_data('xtreme_up_translation'),
                 lambda: _first('xtreme_up_translation_en_am', split='validation')):
      with pytest.raises(tasks.DataError) as e:
        read()
      message = str(e.value)
      assert '\n' not in message
      # No chained traceback under it ('During handling of the above exception ...').
      assert e.value.__cause__ is None and (e.value.__context__ is None or
                                            e.value.__suppress_context__)
      assert message.startswith(f'{path}:3: ')
      assert re.search(problem, message), message
      assert (e.value.path, e.value.line) == (path, 3)
  finally:
    xtreme_up.unregister()


def test_check_data_reads_every_file_of_a_task_or_mixture(tmp_path):
  write_release(str(tmp_path), families=('translation', 'retrieval_in_lang'),
                languages=['am', 'sw'])
  xtreme_up.register_xtreme_up(str(tmp_path), families=['translation', 'retrieval_in_lang'],
                               languages=['am', 'sw'])
  try:
    split_files = lambda family, stem: [  # noqa: E731
        str(tmp_path / family / s / f'{stem}.jsonl') for s in xtreme_up.SPLITS]
    assert sorted(tasks.check_data('xtreme_up_translation')) == sorted(
        split_files('translation', 'en2am') + split_files('translation', 'en2sw'))
    assert tasks.check_data('xtreme_up_retrieval_in_lang_index') == [
        str(tmp_path / 'retrieval_in_lang' / 'index.jsonl')]
    assert tasks.check_data('xtreme_up_retrieval_in_lang_sw_query') == split_files(
        'retrieval_in_lang', 'sw')[1:]
    # A file removed since registration is named too.
    os.remove(tmp_path / 'translation' / 'test' / 'en2sw.jsonl')
    with pytest.raises(tasks.DataError, match=r'en2sw.jsonl: file not found'):
      tasks.check_data('xtreme_up_translation_en_sw')
    assert tasks.check_data('offline_bench') == []  # generated from packages: no file
    with pytest.raises(KeyError, match='No seqio Task or Mixture'):
      tasks.check_data('xtreme_up_translation_en_zz')
  finally:
    xtreme_up.unregister()


def test_env_and_gin_trigger_registration(tmp_path, monkeypatch):
  import gin
  write_release(str(tmp_path), families=('ner',), languages=['yo'])
  xtreme_up.unregister()
  monkeypatch.delenv(xtreme_up.ENV_VAR, raising=False)
  with pytest.raises(xtreme_up.XtremeUpDataError, match='No XTREME-UP data'):
    tasks.get_task_or_mixture('xtreme_up_ner_yo')
  try:
    monkeypatch.setenv(xtreme_up.ENV_VAR, str(tmp_path))
    assert tasks.get_task_or_mixture('xtreme_up_ner_yo').name == 'xtreme_up_ner_yo'
    xtreme_up.unregister()
    monkeypatch.delenv(xtreme_up.ENV_VAR)
    gin.parse_config([
        f"tasks.xtreme_up.register_xtreme_up.data_dir = '{tmp_path}'",
        "tasks.xtreme_up.register_xtreme_up.families = ['ner']",
        "tasks.xtreme_up.register_xtreme_up.languages = ['yo']"])
    assert tasks.get_task_or_mixture('xtreme_up_ner_yo').name == (
        'xtreme_up_ner_yo')
    assert xtreme_up.registered_data_dir() == str(tmp_path)
  finally:
    gin.clear_config()
    xtreme_up.unregister()


def test_ascii_lower_matches_tf_strings_lower():
  import tensorflow as tf
  for text in ['ÜBER Straße ΑΒΓ', 'Who WROTE it?', 'ДОМ Ab']:
    assert xtreme_up.ascii_lower(text) == tf.strings.lower(text).numpy(
    ).decode('utf-8')
