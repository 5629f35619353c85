"""sira-jax: SiRA (Sparse Mixture of Low Rank Adaptation) and baselines in JAX/Flax."""

import os as _os

# TensorFlow (behind seqio) logs C++ warnings about partially read dataset caches on every eval;
# keep them off the terminal unless the user asks for them.
_os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def load_pretrained(path, adapter=None, **kwargs):
  """(model, params) from a HF T5-family directory or a T5X checkpoint; see sira_jax.t5.loading."""
  from sira_jax.t5.loading import load_pretrained as _load  # Lazy: keeps `import sira_jax` light.
  return _load(path, adapter, **kwargs)
