r"""Does a view's background alone identify its own image? (docs/testbed.md)

For each background kind k and mode of `bayesncl_jax.backgrounds`, renders
n backgrounds of kind k (no object) as `build_split` would, makes two views
of each with the pre-training augmentations of a config (random resized crop
+ flip on the host, then the colour chain of `augment.augment_image`), and
asks, for every first view, which of the n second views is most similar:

* pixels: cosine similarity of the 8x8 average-pooled views, each channel
  standardised per view;
* aligned: an oracle that knows both crop boxes maps the views back to the
  32x32 background and correlates them (channels standardised per view)
  over the pixels both boxes cover (at least 16), i.e. what a model that
  matched the backgrounds' own pixels up to crop and colour jitter could do.

The retrieval rate is the fraction of first views whose best match is their
own second view; chance is 1/n. All n images of a batch have the same kind,
so a rate above chance means the background tells the instance, not only its
kind. A rate near 1 is a shortcut for instance discrimination.

  python bench/background_retrieval.py [--n=256] [--config=...] \
      [--config_overrides=aug.brightness=0.8,aug.hue=0.2]
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bayesncl_jax import augment  # noqa: E402
from bayesncl_jax import backgrounds  # noqa: E402
from bayesncl_jax import config_lib  # noqa: E402
from bayesncl_jax import input_pipeline  # noqa: E402

MIN_OVERLAP = 16


def render_kind(kind: int, n: int, mode: str,
                rng: np.random.Generator) -> np.ndarray:
  """n backgrounds of one kind, drawn as `build_split` draws them."""
  if mode == "shared":
    return np.repeat(backgrounds.shared_backgrounds(kind + 1)[kind:kind + 1],
                     n, axis=0)
  return backgrounds.render_backgrounds(kind, rng.integers(0, 64, (n, 2)),
                                        rng)


def two_views(images: np.ndarray, aug, rng: np.random.Generator, key):
  """Views (2, n, S, S, 3) float in [0, 1], boxes (2, n, 4), flips (2, n)."""
  size = images.shape[1]
  views, boxes, flips = [], [], []
  for _ in range(2):
    vs, bs, fs = [], [], []
    for image in images:
      box, flip = input_pipeline.draw_view_params(size, size, aug.crop_scale,
                                                  aug.hflip_prob, rng)
      view = input_pipeline.resize_bicubic(image, size, size, box)
      vs.append(view[:, ::-1] if flip else view)
      bs.append(box)
      fs.append(flip)
    key, sub = jax.random.split(key)
    views.append(np.asarray(augment.augment_batch(
        sub, np.stack(vs), aug, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))))
    boxes.append(bs)
    flips.append(fs)
  return np.stack(views), np.asarray(boxes), np.asarray(flips)


def _standardise(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Per image and channel, zero mean / unit std over the mask; 0 outside."""
  m = mask[..., None]
  count = np.maximum(m.sum(axis=(1, 2), keepdims=True), 1)
  mean = (x * m).sum(axis=(1, 2), keepdims=True) / count
  var = (((x - mean) * m) ** 2).sum(axis=(1, 2), keepdims=True) / count
  return (x - mean) / np.sqrt(var + 1e-6) * m


def pixel_retrieval(views: np.ndarray) -> float:
  n, s = views.shape[1], views.shape[2]
  pooled = views.reshape(2, n, 8, s // 8, 8, s // 8, 3).mean(axis=(3, 5))
  feats = [_standardise(p, np.ones(p.shape[:3])).reshape(n, -1)
           for p in pooled]
  feats = [f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-6)
           for f in feats]
  sim = feats[0] @ feats[1].T
  return float((sim.argmax(1) == np.arange(n)).mean())


def back_project(views: np.ndarray, boxes: np.ndarray, flips: np.ndarray):
  """Views mapped onto the background's grid (nearest pixel) and masks."""
  n, s = views.shape[0], views.shape[1]
  canvas = np.zeros_like(views)
  mask = np.zeros((n, s, s))
  grid = np.arange(s)
  for i, ((top, left, h, w), flip) in enumerate(zip(boxes, flips)):
    ys = np.floor((grid[top:top + h] - top + 0.5) * s / h).astype(int)
    xs = np.floor((grid[left:left + w] - left + 0.5) * s / w).astype(int)
    if flip:
      xs = s - 1 - xs
    canvas[i, top:top + h, left:left + w] = views[i][np.ix_(ys, xs)]
    mask[i, top:top + h, left:left + w] = 1
  return canvas, mask


def aligned_retrieval(views, boxes, flips) -> float:
  n = views.shape[1]
  (a, ma), (b, mb) = (back_project(views[v], boxes[v], flips[v])
                      for v in range(2))
  a, b = _standardise(a, ma), _standardise(b, mb)
  # Pairwise overlap-restricted correlations: sum over shared pixels of the
  # products, each view standardised over its own box.
  num = a.reshape(n, -1) @ b.reshape(n, -1).T
  overlap = ma.reshape(n, -1) @ mb.reshape(n, -1).T * 3
  score = np.where(overlap >= MIN_OVERLAP * 3, num / np.maximum(overlap, 1),
                   -np.inf)
  return float((score.argmax(1) == np.arange(n)).mean())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=256)
  parser.add_argument("--config", default=str(
      ROOT / "configs" / "fashion_mnist_backgrounds.py"))
  parser.add_argument("--config_overrides", default="",
                      help="comma-separated field=value (floats) over the "
                      "config, e.g. aug.brightness=0.8,aug.hue=0.2")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_color", action="store_true",
                      help="crops and flips only (no colour chain)")
  args = parser.parse_args()
  overrides = {}
  for item in filter(None, args.config_overrides.split(",")):
    field, _, value = item.partition("=")
    overrides[field] = float(value)
  config = config_lib.load_file(args.config, None, overrides)
  aug = config.aug
  if args.no_color:
    aug.color_jitter_prob = 0.0
    aug.grayscale_prob = 0.0
  print(f"n={args.n} per kind (chance {1 / args.n:.4f}); crop_scale "
        f"{tuple(aug.crop_scale)}, colour jitter p={aug.color_jitter_prob} "
        f"strengths {(aug.brightness, aug.contrast, aug.saturation, aug.hue)},"
        f" grayscale p={aug.grayscale_prob}")
  print(f"{'background':30s} {'mode':12s} {'pixels':>7s} {'aligned':>8s}")
  for mode in ("per_example", "shared"):
    for kind, name in enumerate(backgrounds.BACKGROUND_NAMES):
      rng = np.random.default_rng([args.seed, kind])
      images = render_kind(kind, args.n, mode, rng)
      views, boxes, flips = two_views(images, aug, rng,
                                      jax.random.key(args.seed * 100 + kind))
      print(f"{name:30s} {mode:12s} {pixel_retrieval(views):7.3f} "
            f"{aligned_retrieval(views, boxes, flips):8.3f}", flush=True)


if __name__ == "__main__":
  main()
