"""Fashion-MNIST objects on shared backgrounds: a testbed with a nuisance label.

Each 28x28 Fashion-MNIST image becomes a 32x32 RGB image: the garment, in
white, composited onto one of B procedural backgrounds with its grey level as
alpha (o = object pixel in 0..255, b = background pixel, per channel)::

    out = round((o * 255 + (255 - o) * b) / 255)      (integer arithmetic)

i.e. out = alpha * white + (1 - alpha) * background with alpha = o / 255.
The object is centred (rows and columns 2..29); the random-resized crops of
pre-training move it around, so a random placement here would add nothing.

Backgrounds are salient colour/texture patterns shared by every class
(`BACKGROUND_NAMES`, the first B are used): smooth colour gradients, stripes,
checks, colour noise, dots. How the examples of one background differ is the
`mode` (`BACKGROUND_MODES`, config `dataset.background_mode`):

* "shared" (the default): every example of background k has the very same
  background pixels (phase 0, one noise image per kind drawn from a fixed
  seed, the same in both splits): the paper's shared "blue sky". The
  background tells which of B kinds an image has and nothing about which
  image it is.
* "per_example" (generator version 1, the testbed until issue 23): the
  periodic patterns get a random phase per example and the noise a fresh
  draw per example. Under any crop the fresh noise (and, less so, the phase)
  identifies the instance from its background alone — a shortcut for
  instance discrimination (docs/testbed.md measures it).

The background of every
example is drawn independently of its class and balanced within each class:
among the examples of class c, background k occurs floor(n_c / B) or
ceil(n_c / B) times, in a random order. Background therefore carries no
information about the class (the class x background table is as flat as
integers allow), while being, by construction, the dominant shared feature
that a contrastive model can latch on to.

Everything is a pure function of the source images, labels, B and the split
(`build_split`): the same inputs give byte-identical outputs.
`datasets.get_source` builds the arrays once and caches them on disk.
"""
from __future__ import annotations

import numpy as np

IMAGE_SIZE = 32
OBJECT_SIZE = 28
OBJECT_OFFSET = (IMAGE_SIZE - OBJECT_SIZE) // 2  # centred: 2 pixels each side.
# Version of the generator of each mode: bump it whenever that mode's output
# bytes change, so that stale cache files are rebuilt.
GENERATOR_VERSIONS = {"shared": 1, "per_example": 1}
BACKGROUND_MODES = tuple(GENERATOR_VERSIONS)
DEFAULT_BACKGROUND_MODE = "shared"
_SEED = 19_2026
_SPLIT_CODES = {"train": 1, "test": 2}

BACKGROUND_NAMES = ("sunset gradient", "ocean gradient", "red diagonal stripes",
                    "green checks", "colour noise", "blue-orange stripes",
                    "pink-green diagonal gradient", "cyan dots")
MAX_BACKGROUNDS = len(BACKGROUND_NAMES)
DEFAULT_NUM_BACKGROUNDS = 6

# Colours in [0, 1] RGB. Kept away from white so the white object stays
# visible on every background.
_SUNSET = ((0.95, 0.55, 0.10), (0.40, 0.05, 0.50))  # top -> bottom
_OCEAN = ((0.00, 0.60, 0.60), (0.05, 0.10, 0.50))  # left -> right
_RED_STRIPES = ((0.85, 0.10, 0.10), (0.20, 0.05, 0.05))
_GREEN_CHECKS = ((0.10, 0.65, 0.20), (0.02, 0.25, 0.05))
_BLUE_ORANGE = ((0.10, 0.25, 0.85), (0.70, 0.40, 0.05))
_PINK_GREEN = ((0.90, 0.30, 0.60), (0.05, 0.30, 0.15))  # top-left -> b-right
_DOTS = ((0.00, 0.80, 0.85), (0.35, 0.35, 0.35))  # dot, ground
_NOISE_MAX = 0.8  # noise channels ~ U[0, 0.8]
_STRIPE_PERIOD = 8  # diagonal stripes, pixels
_CHECK_SIZE = 4  # checks, pixels per square
_HSTRIPE_PERIOD = 6  # blue-orange horizontal stripes
_DOT_SPACING, _DOT_RADIUS = 8, 2.0
_NOISE_BLOCK = 2  # noise drawn on 16x16 blocks of 2x2 pixels


def _check_num_backgrounds(num_backgrounds: int) -> int:
  if not 1 <= int(num_backgrounds) <= MAX_BACKGROUNDS:
    raise ValueError(
        f"num_backgrounds={num_backgrounds} must be in 1..{MAX_BACKGROUNDS} "
        f"(the procedural backgrounds are {', '.join(BACKGROUND_NAMES)}); set "
        "--config.dataset.num_backgrounds=6 for example.")
  return int(num_backgrounds)


def check_background_mode(mode: str) -> str:
  if mode not in BACKGROUND_MODES:
    raise ValueError(
        f"background_mode={mode!r} is not one of {', '.join(BACKGROUND_MODES)}"
        " (shared: one background image per kind; per_example: the version-1 "
        "testbed, fresh noise and phases per example); set "
        "--config.dataset.background_mode=shared for example.")
  return mode


def cache_stem(mode: str, num_backgrounds: int) -> str:
  """Name stem of a mode's cache files, e.g. `shared-v1-b6`.

  The per_example stem is that of generator version 1 (`v1-b6`), so caches
  written before modes existed stay valid for it.
  """
  version = GENERATOR_VERSIONS[check_background_mode(mode)]
  b = _check_num_backgrounds(num_backgrounds)
  prefix = "" if mode == "per_example" else f"{mode}-"
  return f"{prefix}v{version}-b{b}"


def background_names(num_backgrounds: int) -> tuple[str, ...]:
  """Names of backgrounds 0..B-1 (the `background` label of an example)."""
  return BACKGROUND_NAMES[:_check_num_backgrounds(num_backgrounds)]


def _lerp(t: np.ndarray, colours) -> np.ndarray:
  """(..., H, W) weights in [0, 1] -> (..., H, W, 3): (1 - t) c0 + t c1."""
  c0, c1 = (np.asarray(c, np.float32) for c in colours)
  return (1.0 - t[..., None]) * c0 + t[..., None] * c1


def render_backgrounds(kind: int, phases: np.ndarray,
                       rng: np.random.Generator) -> np.ndarray:
  """Backgrounds of one kind: (n, 32, 32, 3) uint8.

  Args:
    kind: background index into `BACKGROUND_NAMES`.
    phases: (n, 2) int, per-example (row, column) shift of the periodic
      patterns (ignored by gradients and noise).
    rng: source of the colour noise (kind 4 only; not touched otherwise).
  """
  n = len(phases)
  s = IMAGE_SIZE
  rows = np.arange(s, dtype=np.float32)[:, None]  # (S, 1)
  cols = np.arange(s, dtype=np.float32)[None, :]  # (1, S)
  dy = phases[:, 0].astype(np.float32)[:, None, None]  # (n, 1, 1)
  dx = phases[:, 1].astype(np.float32)[:, None, None]
  ones = np.ones((n, s, s), np.float32)
  if kind == 0:
    out = _lerp(ones * rows / (s - 1), _SUNSET)
  elif kind == 1:
    out = _lerp(ones * cols / (s - 1), _OCEAN)
  elif kind == 2:
    band = np.floor((rows + cols + dy) / (_STRIPE_PERIOD / 2)) % 2
    out = _lerp(band, _RED_STRIPES)
  elif kind == 3:
    square = (np.floor((rows + dy) / _CHECK_SIZE)
              + np.floor((cols + dx) / _CHECK_SIZE)) % 2
    out = _lerp(square, _GREEN_CHECKS)
  elif kind == 4:
    blocks = s // _NOISE_BLOCK
    noise = rng.uniform(0.0, _NOISE_MAX, (n, blocks, blocks, 3))
    out = np.repeat(np.repeat(noise.astype(np.float32), _NOISE_BLOCK, axis=1),
                    _NOISE_BLOCK, axis=2)
  elif kind == 5:
    band = np.floor((ones * rows + dy) / (_HSTRIPE_PERIOD / 2)) % 2
    out = _lerp(band, _BLUE_ORANGE)
  elif kind == 6:
    out = _lerp(ones * (rows + cols) / (2 * (s - 1)), _PINK_GREEN)
  elif kind == 7:
    half = _DOT_SPACING / 2
    ry = (rows + dy) % _DOT_SPACING - half
    rx = (cols + dx) % _DOT_SPACING - half
    dot = (ry * ry + rx * rx <= _DOT_RADIUS ** 2).astype(np.float32)
    out = _lerp(dot, _DOTS[::-1])
  else:
    raise ValueError(f"Unknown background kind {kind}.")
  out = np.broadcast_to(out, (n, s, s, 3))
  return np.round(out * 255.0).astype(np.uint8)


def composite(objects: np.ndarray, backgrounds: np.ndarray) -> np.ndarray:
  """White objects over backgrounds, object grey level as alpha.

  objects: (n, 28, 28) uint8; backgrounds: (n, 32, 32, 3) uint8. Returns
  (n, 32, 32, 3) uint8: the background, and inside the centred 28x28 window
  round((o * 255 + (255 - o) * b) / 255), computed exactly in integers.
  """
  out = backgrounds.copy()
  o = objects.astype(np.int32)[..., None]
  lo, hi = OBJECT_OFFSET, OBJECT_OFFSET + OBJECT_SIZE
  b = backgrounds[:, lo:hi, lo:hi].astype(np.int32)
  out[:, lo:hi, lo:hi] = ((o * 255 + (255 - o) * b + 127) // 255).astype(
      np.uint8)
  return out


def assign_backgrounds(labels: np.ndarray, num_backgrounds: int,
                       rng: np.random.Generator) -> np.ndarray:
  """Background index per example, balanced within every class.

  For each class c (in increasing order), its n_c examples get the multiset
  {0, 1, ..., B-1, 0, 1, ...} (n_c entries) in a uniformly random order. So
  P(background | class) is uniform up to one example per cell, and the draw
  uses no other property of the example.
  """
  b = _check_num_backgrounds(num_backgrounds)
  out = np.empty(len(labels), np.int32)
  for c in np.unique(labels):
    where = np.flatnonzero(labels == c)
    out[where] = rng.permutation(np.arange(len(where)) % b)
  return out


def shared_backgrounds(num_backgrounds: int) -> np.ndarray:
  """The B backgrounds of mode "shared": (B, 32, 32, 3) uint8.

  Kind k is rendered once at phase (0, 0), its noise (kind 4) drawn from a
  generator seeded by (seed, k) alone: the same pixels in every split.
  """
  b = _check_num_backgrounds(num_backgrounds)
  return np.concatenate([
      render_backgrounds(k, np.zeros((1, 2), np.int64),
                         np.random.default_rng([_SEED, 0, k]))
      for k in range(b)])


def build_split(objects: np.ndarray, labels: np.ndarray, split: str,
                num_backgrounds: int = DEFAULT_NUM_BACKGROUNDS,
                chunk: int = 8192,
                mode: str = DEFAULT_BACKGROUND_MODE
                ) -> tuple[np.ndarray, np.ndarray]:
  """The composited images of one split and their background labels.

  Args:
    objects: (n, 28, 28) or (n, 28, 28, 1) uint8 Fashion-MNIST images.
    labels: (n,) int class labels.
    split: "train" or "test" (selects the random stream).
    num_backgrounds: B in 1..8: backgrounds 0..B-1 of `BACKGROUND_NAMES`.
    chunk: examples rendered at a time (bounds the memory use).
    mode: "shared" or "per_example" (module docstring). The background
      labels do not depend on it.

  Returns:
    images (n, 32, 32, 3) uint8 and backgrounds (n,) int32; a pure function
    of the arguments (except `chunk`, which does not change the result).
  """
  if split not in _SPLIT_CODES:
    raise ValueError(f"Unknown split {split!r}; expected one of "
                     f"{sorted(_SPLIT_CODES)}.")
  if objects.ndim == 4 and objects.shape[-1] == 1:
    objects = objects[..., 0]
  if objects.shape[1:] != (OBJECT_SIZE, OBJECT_SIZE) or objects.dtype != np.uint8:
    raise ValueError(f"Expected (n, 28, 28) uint8 objects, got "
                     f"{objects.shape} {objects.dtype}.")
  n = len(objects)
  labels = np.asarray(labels)
  if labels.shape != (n,):
    raise ValueError(f"{n} objects but labels of shape {labels.shape}.")
  check_background_mode(mode)
  rng = np.random.default_rng([_SEED, _SPLIT_CODES[split], num_backgrounds])
  background = assign_backgrounds(labels, num_backgrounds, rng)
  images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  if mode == "shared":
    shared = shared_backgrounds(num_backgrounds)
    for start in range(0, n, chunk):
      stop = min(n, start + chunk)
      images[start:stop] = composite(objects[start:stop],
                                     shared[background[start:stop]])
    return images, background
  phases = rng.integers(0, 64, (n, 2))
  # One noise stream per kind, drawn in example order, so that `chunk` does
  # not change the result.
  noise_rng = np.random.default_rng(
      [_SEED, _SPLIT_CODES[split], num_backgrounds, 4])
  for start in range(0, n, chunk):
    stop = min(n, start + chunk)
    bg = np.empty((stop - start, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    kinds = background[start:stop]
    for kind in np.unique(kinds):
      where = np.flatnonzero(kinds == kind)
      bg[where] = render_backgrounds(int(kind), phases[start:stop][where],
                                     noise_rng)
    images[start:stop] = composite(objects[start:stop], bg)
  return images, background
