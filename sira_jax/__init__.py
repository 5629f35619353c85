"""sira-jax: SiRA (Sparse Mixture of Low Rank Adaptation) and baselines in JAX/Flax."""
