r"""Draws examples of the backgrounds testbed: one row per background, one
column per class.

  python -m bayesncl_jax.show_backgrounds \
      --config=configs/fashion_mnist_backgrounds.py \
      --out=docs/backgrounds_examples.png

Cell (k, c) is the first training example of class c on background k (the
dataset is built and cached first if needed). Every cell is filled: each
background occurs with every class equally often.
"""
from __future__ import annotations

from absl import app
from absl import flags
from matplotlib.figure import Figure
from ml_collections import config_flags
import numpy as np

from bayesncl_jax import cli
from bayesncl_jax import datasets
from bayesncl_jax.evaluators import base as evaluators_base


FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined only when it runs as a command, so that
  importing this module next to the other tools defines no flag twice."""
  config_flags.DEFINE_config_file("config", None, "Config file.")
  flags.DEFINE_string("out", "backgrounds_examples.png", "Output PNG path.")
  flags.DEFINE_string("split", "train", "Split to draw from.")


def example_grid(dataset_config, split: str = "train"):
  """Returns (images (B, 10, H, W, 3) uint8, background names, class names).

  images[k, c] is the first example of `split` with background k, class c.
  """
  source = datasets.get_source(dataset_config, split)
  names = datasets.nuisance_names(dataset_config)
  if names is None:
    raise ValueError(f"Dataset {dataset_config.name!r} has no backgrounds; "
                     "use configs/fashion_mnist_backgrounds.py.")
  classes = evaluators_base.CLASS_NAMES["fashion_mnist"]
  labels = np.asarray(source.labels)
  background = np.asarray(source.backgrounds)
  grid = np.zeros((len(names), len(classes)) + source[0]["image"].shape,
                  np.uint8)
  for k in range(len(names)):
    for c in range(len(classes)):
      hits = np.flatnonzero((background == k) & (labels == c))
      if not len(hits):
        raise ValueError(f"No example of class {c} on background {k}.")
      grid[k, c] = source[int(hits[0])]["image"]
  return grid, names, classes


def draw(grid: np.ndarray, background_names, class_names, path: str):
  rows, cols = grid.shape[:2]
  fig = Figure(figsize=(1.1 * cols + 1.6, 1.1 * rows + 0.6))
  axes = fig.subplots(rows, cols, squeeze=False)
  for k in range(rows):
    for c in range(cols):
      ax = axes[k, c]
      ax.imshow(grid[k, c], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if k == 0:
        ax.set_title(class_names[c], fontsize=7)
    axes[k, 0].set_ylabel(background_names[k], fontsize=7, rotation=0,
                          ha="right", va="center")
  fig.suptitle("fashion_mnist_backgrounds: rows = background, columns = "
               "class", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  del argv
  grid, names, classes = example_grid(FLAGS.config.dataset, FLAGS.split)
  draw(grid, names, classes, FLAGS.out)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  cli.run(main, config_flag="config")
