"""T5-family encoder-decoder with adapter injection, decoding, parameter counts and weight loaders."""
from sira_jax.t5.config import T5Config
from sira_jax.t5.network import Transformer

__all__ = ['T5Config', 'Transformer']
