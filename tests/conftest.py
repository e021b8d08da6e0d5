"""Test setup: 8 simulated CPU devices, absl flags parsed for Grain workers,
JAX's persistent compilation cache on (cli.enable_compilation_cache: the
user's cache folder unless $BAYESNCL_COMPILATION_CACHE says otherwise), so a
second run of the tests loads the larger compiled programs from disk."""
import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

from bayesncl_jax import cli  # noqa: E402

cli.enable_compilation_cache()
