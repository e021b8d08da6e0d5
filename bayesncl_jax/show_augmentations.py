r"""Draws a grid of the two augmented views the training step sees.

  python -m bayesncl_jax.show_augmentations --config=configs/fashion_mnist.py \
      --out=docs/augmentations.png [--num_images=8]

Each column is one training image; the two rows are its view 1 and view 2
exactly as the jitted train step makes them (crops + flips from the Grain
pipeline, cut on the host or the device as `config.aug.crop_on` says, then
the on-device colour jitter / grayscale / blur / solarisation),
de-normalised.
"""
from __future__ import annotations

from absl import app
from absl import flags
import jax
from matplotlib.figure import Figure
import numpy as np
from ml_collections import config_flags

from bayesncl_jax import cli
from bayesncl_jax import augment
from bayesncl_jax import input_pipeline
from bayesncl_jax import paths


FLAGS = flags.FLAGS


def define_flags():
  """The command's flags; defined only when it runs as a command, so that
  importing this module next to the other tools defines no flag twice."""
  config_flags.DEFINE_config_file("config", None, "Config file.")
  flags.DEFINE_string("out", "augmentations.png", "Output PNG path.")
  flags.DEFINE_integer("num_images", 8, "Images (columns) to show.")


def augmented_views(config, num_images: int, seed: int = 0):
  """Returns (view1, view2), each (num_images, S, S, C) floats in [0, 1]."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.optim.batch_size = num_images
    config.dataset.num_workers = 0
  it = input_pipeline.create_pretrain_iterator(config, process_index=0,
                                               process_count=1)
  batch = next(it)
  it.close()
  mean = np.asarray(config.dataset.mean, np.float32)
  std = np.asarray(config.dataset.std, np.float32)
  rng1, rng2 = jax.random.split(jax.random.key(seed))
  # Host crops: the views themselves; device crops: cut here, as the step.
  crops = augment.views_of_batch(batch, config.dataset.image_size)
  views = []
  for rng, crop in zip((rng1, rng2), crops):
    x = jax.jit(lambda r, v: augment.augment_batch(
        r, v, config.aug, tuple(mean), tuple(std)))(rng, crop)
    views.append(np.clip(np.asarray(x) * std + mean, 0, 1))
  return views[0], views[1]


def draw(view1, view2, path: str):
  n = len(view1)
  fig = Figure(figsize=(1.4 * n, 3.2))     # no pyplot, no backend switch
  axes = fig.subplots(2, n, squeeze=False)
  rows = (("view 1", view1), ("view 2", view2))
  for r, (title, images) in enumerate(rows):
    for c in range(n):
      ax = axes[r, c]
      img = images[c]
      ax.imshow(img[..., 0] if img.shape[-1] == 1 else img,
                cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
      ax.set_xticks([])
      ax.set_yticks([])
    axes[r, 0].set_ylabel(title, fontsize=8)
  fig.suptitle("Two augmented views per image (pairs in the same column)",
               fontsize=9)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=120)


def main(argv):
  del argv
  v1, v2 = augmented_views(FLAGS.config, FLAGS.num_images)
  draw(v1, v2, FLAGS.out)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config"])
  cli.run(main, config_flag="config")
