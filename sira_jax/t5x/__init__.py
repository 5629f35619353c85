"""SiRA and its baselines under real T5X (`t5x.train`, `t5x.eval`, `t5x.infer`).

Importable only where T5X is installed (google-research/t5x is not on PyPI); `import sira_jax` never
imports this package. Modules:

  models        `SiraEncoderDecoderModel`: T5X's EncoderDecoderModel over `sira_jax.t5.network`, with
                `params_axes`, the shared loss (`sira_jax.losses`), routing metrics and SMoE-Dropout's
                schedule.
  partitioning  logical-axis rules (PjitPartitioner and MoePjitPartitioner) and Adafactor factor rules
                for the adapter axes `expert`, `rank`, `unmodeled`.
  optimizers    freezing in T5X's own terms: an optimizer that keeps state and updates only for the
                adapter and router params.

Gin configs: `gin/t5x/` (models/, adapters/, runs/, tasks/).
"""
try:
  import t5x  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only where t5x is absent
  raise ImportError(
      'sira_jax.t5x needs T5X (google-research/t5x), which is not on PyPI: install it from a '
      'checkout with `pip install --no-deps -e <t5x checkout>` (see README, "Training with T5X"). '
      'The project\'s own trainer (python -m sira_jax.train) needs no T5X.', name=e.name) from e
