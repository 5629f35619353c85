"""sira-jax benchmarks: `python -m experiments.bench` (see __main__.py)."""
