"""Moved to `bayesncl_jax.evaluators.linear_probe`; this name stays importable."""
from bayesncl_jax.evaluators.linear_probe import *  # noqa: F401,F403
from bayesncl_jax.evaluators.linear_probe import __all__  # noqa: F401
