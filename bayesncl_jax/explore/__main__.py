r"""Command line of the feature explorer.

  python -m bayesncl_jax.explore --workdir=DIR [--workdir=DIR2 ...] --out=SITE

Each DIR is a run evaluated with `python -m bayesncl_jax.evaluate
--workdir=DIR`. Several DIRs (e.g. CL, NCL and BayesNCL on the same data)
add a comparison page. Open SITE/index.html in a browser. Exit status 2
with a one-line message when the input cannot be explored.
"""
import sys

from absl import app
from absl import flags
from absl import logging

from bayesncl_jax import cli
from bayesncl_jax import config_lib
from bayesncl_jax import train
from bayesncl_jax.explore import data
from bayesncl_jax.explore import site

FLAGS = flags.FLAGS
_DEFAULTS = site.SiteOptions()


def define_flags():
  flags.DEFINE_multi_string("workdir", None, "An evaluated run's workdir; "
                            "repeat the flag to compare runs.")
  flags.DEFINE_string("out", None, "Folder for the site (created; an "
                      "earlier explorer site there is replaced).")
  flags.DEFINE_integer("top_images", _DEFAULTS.top_images,
                       "Top-activating test images per dimension page.")
  flags.DEFINE_integer("weak_images", _DEFAULTS.weak_images,
                       "Weakly activating test images per dimension page.")
  flags.DEFINE_integer("sample_per_class", _DEFAULTS.sample_per_class,
                       "Test images per class that get a page regardless.")
  flags.DEFINE_integer("neighbours", _DEFAULTS.neighbours,
                       "Nearest neighbours shown on an image page.")
  flags.DEFINE_integer("thumb_size", _DEFAULTS.thumb_size,
                       "Largest thumbnail side in pixels.")
  flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size,
                       "Feature-extraction batch (only when the evaluation "
                       "saved no features).")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  options = site.SiteOptions(
      top_images=FLAGS.top_images, weak_images=FLAGS.weak_images,
      sample_per_class=FLAGS.sample_per_class, neighbours=FLAGS.neighbours,
      thumb_size=FLAGS.thumb_size, batch_size=FLAGS.batch_size)
  for name in ("top_images", "neighbours", "thumb_size", "batch_size"):
    if getattr(options, name) < 1:
      print(f"error: --{name} must be >= 1.", file=sys.stderr)
      sys.exit(2)
  try:
    summary = site.build_site(FLAGS.workdir, FLAGS.out, options)
  except (data.ExploreError, FileNotFoundError, config_lib.ConfigError,
          train.CheckpointError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"Wrote {summary['pages']} pages and {summary['images']} images "
        f"({summary['bytes'] / 1e6:.1f} MB) to {summary['out']} in "
        f"{summary['seconds']:.1f} s. Open {summary['out']}/index.html in a "
        "browser.", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
