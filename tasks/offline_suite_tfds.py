"""The bundled offline suite as a TFDS dataset: `offline_suite/<task>_<lang>:1.0.0`.

One builder config per generation task-language of tasks/offline_suite.py (45: num2words, date,
currency and unit in 10 languages, translit in 5), e.g. `offline_suite/date_fr`. Features
`inputs` and `targets` (text); splits train / validation / test with the same examples as the
function-backed task `offline_<task>_<lang>` (the generators of tasks/offline_data.py). TFDS
orders them on disk by a hash of their keys, as it writes every dataset (an ordered dataset,
`disable_shuffling`, would refuse the file shuffling that training asks for).

Build into a data directory (offline; all 45 configs in about 20 seconds):

  python -m tasks.offline_suite_tfds --data_dir=DIR [--configs=date_fr,unit_de]

or in Python `build(data_dir, configs)`, or `tfds.builder('offline_suite/date_fr',
data_dir=...).download_and_prepare()` after importing this module. The TFDS command line
`tfds build offline_suite --imports=tasks.offline_suite_tfds --data_dir=DIR [--config=date_fr]`
builds it too where apache-beam is installed: the `tfds` entry point imports it for another
subcommand (convert_format), and this project does not install it; those arguments work through
`tensorflow_datasets.scripts.cli.build.Args` without it.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import tensorflow_datasets as tfds

from tasks import offline_data as data
from tasks import offline_suite

NAME = 'offline_suite'
VERSION = '1.0.0'


def config_name(task: str, lang: str) -> str:
  """The builder config of a generation task-language: 'date_fr' for ('date', 'fr')."""
  return f'{task}_{lang}'


def tfds_name(task: str, lang: str) -> str:
  """The full TFDS name of a task-language, 'offline_suite/date_fr:1.0.0'."""
  return f'{NAME}/{config_name(task, lang)}:{VERSION}'


class OfflineSuiteConfig(tfds.core.BuilderConfig):
  """One generation task in one language."""

  def __init__(self, *, task: str, lang: str):
    super().__init__(name=config_name(task, lang), version=VERSION,
                     description=f'offline_{task}_{lang} of the bundled offline suite')
    self.task = task
    self.lang = lang


class OfflineSuite(tfds.core.GeneratorBasedBuilder):
  """The generation tasks of the bundled offline suite (tasks/offline_suite.py)."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): 'The 45 generation task-languages of the offline suite.'}
  BUILDER_CONFIGS = [OfflineSuiteConfig(task=task, lang=lang)
                     for task, (_, languages, _) in offline_suite.GENERATION_TASKS.items()
                     for lang in languages]

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo itself, not dataset_info_from_configs: that reads metadata files beside the
    # module's package, which `python -m tasks.offline_suite_tfds` (module __main__) has not.
    return tfds.core.DatasetInfo(
        builder=self,
        description='The generation tasks of the bundled offline suite (tasks/offline_suite.py).',
        features=tfds.features.FeaturesDict({'inputs': tfds.features.Text(),
                                             'targets': tfds.features.Text()}),
        supervised_keys=('inputs', 'targets'))

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: examples come from installed packages.
    return {split: self._generate_examples(split) for split in data.SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict[str, str]]]:
    generator = offline_suite.GENERATION_TASKS[self.builder_config.task][0]
    for i, (inputs, targets) in enumerate(generator(self.builder_config.lang)[split]):
      yield i, {'inputs': inputs, 'targets': targets}


def all_configs() -> list[str]:
  return [c.name for c in OfflineSuite.BUILDER_CONFIGS]


def build(data_dir: str, configs: Sequence[str] | None = None) -> list[str]:
  """Prepares `configs` (default: all 45) under `data_dir`; returns their TFDS names.
  Already prepared configs are kept as they are."""
  configs = list(configs) if configs else all_configs()
  unknown = sorted(set(configs) - set(all_configs()))
  if unknown:
    raise ValueError(f'Unknown {NAME} configs {unknown}; known: {", ".join(all_configs())}.')
  names = []
  for config in configs:
    builder = OfflineSuite(config=config, data_dir=data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    names.append(f'{NAME}/{config}:{VERSION}')
  return names


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags
  for name in build(flags.FLAGS.data_dir, flags.FLAGS.configs):
    print(name)


if __name__ == '__main__':
  from absl import app, flags
  flags.DEFINE_string('data_dir', None, 'TFDS data directory to build into.', required=True)
  flags.DEFINE_list('configs', None, 'Configs to build (default: all 45), e.g. date_fr,unit_de.')
  app.run(main)
