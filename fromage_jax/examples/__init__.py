"""Runnable examples: `python -m fromage_jax.examples.<name>`.

They need the "examples" extra: `python3 -m pip install -e ".[examples]"`.
"""
