"""bayesncl_jax: BayesNCL, NCL and SimCLR (CL) in JAX/Flax."""

__version__ = "0.1.0"
