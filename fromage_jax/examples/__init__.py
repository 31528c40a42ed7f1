"""Runnable examples: `python -m fromage_jax.examples.<name>`.

They need the "examples" extra: `pip install "fromage_jax[examples]"` (in a
checkout of the repository: `pip install -e ".[examples]"`).
"""
