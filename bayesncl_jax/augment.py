"""SimCLR photometric augmentations on the accelerator (docs/method.md §4).

The host decodes images and draws the random resized crop boxes and
horizontal flips. Where the pixels are cut and resized is a switch,
`config.aug.crop_on`:

* "host": the host also cuts and resizes (PIL bicubic) and sends two uint8
  views per image;
* "device": the host sends the decoded image once, on a fixed-size uint8
  canvas, with its true height/width, both boxes and flips; `crop_views`
  cuts and resizes both views here, inside the jitted step (antialiased
  bicubic, as PIL), which takes the most expensive host stage off the host.

Everything else — colour jitter, grayscale, Gaussian blur, solarisation and
normalisation — runs inside the jitted train step either way, one PRNG key
per example, vmapped over the batch.

Single-image functions take float32 images in [0, 1] of shape (H, W, C) and
return the same shape, clipped to [0, 1]. Their semantics follow torchvision's
functional transforms (`adjust_*`, `rgb_to_grayscale`, `gaussian_blur`,
`solarize`).

Channels: C == 3 is RGB. C == 1 (Fashion-MNIST) is already gray, so
brightness and contrast apply as usual while saturation, hue and grayscale are
exact identities (a one-channel image has no chroma to change). Any other C is
rejected by the colour ops.

Per-op probabilities of 0 (and jitter strengths of 0) are resolved statically
in Python: that op is not traced at all, so the output is exactly the input.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

# ITU-R 601-2 luma weights, as in PIL's convert("L") and torchvision.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Blur kernel side as a fraction of the image side (SimCLR: 23 px at 224).
BLUR_KERNEL_FRACTION = 0.1

Array = jax.Array


def _check_color_channels(img: Array, op: str) -> int:
  channels = img.shape[-1]
  if channels not in (1, 3):
    raise ValueError(f"{op} needs an image with 1 (gray) or 3 (RGB) "
                     f"channels, got shape {img.shape}")
  return channels


def _blend(img: Array, other: Array, factor) -> Array:
  """clip(factor · img + (1 − factor) · other, 0, 1), torchvision's `_blend`."""
  return jnp.clip(factor * img + (1.0 - factor) * other, 0.0, 1.0)


def to_grayscale(img: Array) -> Array:
  """ITU-R 601-2 luma Y = 0.299 R + 0.587 G + 0.114 B, replicated to C.

  img: (H, W, C) with C in {1, 3}; returns (H, W, C) with equal channels.
  A C == 1 image is returned unchanged.
  """
  if _check_color_channels(img, "to_grayscale") == 1:
    return img
  luma = img @ jnp.asarray(LUMA_WEIGHTS, img.dtype)
  return jnp.broadcast_to(luma[..., None], img.shape)


def adjust_brightness(img: Array, factor) -> Array:
  """clip(factor · img, 0, 1): a blend with a black image. factor ≥ 0."""
  return jnp.clip(factor * img, 0.0, 1.0)


def adjust_contrast(img: Array, factor) -> Array:
  """Blend with the mean gray level m = mean_{h,w}(Y(img)).

  clip(factor · img + (1 − factor) · m, 0, 1); factor 0 gives the constant
  image m in every channel. For C == 1, Y is the image itself.
  """
  mean = jnp.mean(to_grayscale(img)[..., 0])
  return _blend(img, mean, factor)


def adjust_saturation(img: Array, factor) -> Array:
  """Blend with the grayscale image: clip(f · img + (1 − f) · Y(img), 0, 1).

  factor 0 gives `to_grayscale(img)`. Identity for C == 1.
  """
  if _check_color_channels(img, "adjust_saturation") == 1:
    return img
  return _blend(img, to_grayscale(img), factor)


def _wrap(x: Array, period: float) -> Array:
  """x mod period for x in (−period, 2·period): one conditional shift.

  Equal to `jnp.mod(x, period)` bit for bit on that open range (x − period
  and x + period are exact there; −0.0 stays −0.0), without the
  floating-point remainder, a libm call per element on XLA:CPU. (At
  x = −period, mod gives −0.0 and this +0.0; the callers never get there.)
  """
  return jnp.where(x < 0, x + period, jnp.where(x >= period, x - period, x))


def rgb_to_hsv(img: Array) -> Array:
  """(…, 3) RGB in [0, 1] → (…, 3) HSV, all in [0, 1] (hue in turns).

  v = max, s = (max − min) / max (0 for black), and the hue is the hexcone
  angle / 6: ((g − b)/Δ mod 6, (b − r)/Δ + 2, (r − g)/Δ + 4) when the max is
  r, g, b respectively (r wins ties, then g, as in colorsys); 0 for grays.
  """
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  maxc = jnp.max(img, axis=-1)
  minc = jnp.min(img, axis=-1)
  delta = maxc - minc
  # Safe denominators: the guarded branches are discarded by the `where`s,
  # but must not produce inf/NaN that could leak into gradients.
  safe_max = jnp.where(maxc > 0, maxc, 1.0)
  safe_delta = jnp.where(delta > 0, delta, 1.0)
  s = jnp.where(maxc > 0, delta / safe_max, 0.0)
  # (g − b)/Δ is in [−1, 1] and h/6 in [0, 1]: the `mod`s reduce to one
  # conditional add, exactly (`_wrap`).
  hue_r = _wrap((g - b) / safe_delta, 6.0)
  hue_g = (b - r) / safe_delta + 2.0
  hue_b = (r - g) / safe_delta + 4.0
  h = jnp.where(maxc == r, hue_r, jnp.where(maxc == g, hue_g, hue_b))
  h = jnp.where(delta > 0, _wrap(h / 6.0, 1.0), 0.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv: Array) -> Array:
  """(…, 3) HSV in [0, 1] → (…, 3) RGB, by the closed form of the hexcone.

  Channel n ∈ {R: 5, G: 3, B: 1}: k = (n + 6h) mod 6 and
  c_n = v − v · s · clip(min(k, 4 − k), 0, 1).
  """
  h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
  n = jnp.asarray([5.0, 3.0, 1.0], hsv.dtype)
  k = _wrap(n + 6.0 * h, 6.0)  # n + 6h in [1, 11].
  return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_hue(img: Array, delta) -> Array:
  """Rotates the hue: HSV(img) with h ← (h + delta) mod 1, back to RGB.

  delta in [−0.5, 0.5] turns: 1/3 maps red to green, 0.5 red to cyan.
  Identity for C == 1.
  """
  if _check_color_channels(img, "adjust_hue") == 1:
    return img
  hsv = rgb_to_hsv(img)
  # A concatenation, not `hsv.at[..., 0].set(...)`: that is a scatter, a
  # per-element loop on XLA:CPU (the same values either way).
  hue = _wrap(hsv[..., 0:1] + delta, 1.0)  # in [−0.5, 1.5).
  hsv = jnp.concatenate([hue, hsv[..., 1:]], axis=-1)
  return jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)


def blur_kernel_size(side: int) -> int:
  """Odd integer nearest to 10% of `side`, at least 3 (224 → 23, 32 → 3)."""
  return max(3, 2 * math.floor((BLUR_KERNEL_FRACTION * side - 1) / 2 + 0.5)
             + 1)


def gaussian_kernel1d(sigma, kernel_size: int) -> Array:
  """w_i = exp(−x_i² / (2σ²)) / Σ_j exp(−x_j² / (2σ²)), x_i = i − (k − 1)/2.

  Returns the (kernel_size,) normalised kernel; sigma may be traced.
  """
  x = jnp.arange(kernel_size, dtype=jnp.float32) - (kernel_size - 1) / 2
  w = jnp.exp(-0.5 * jnp.square(x / sigma))
  return w / jnp.sum(w)


def gaussian_blur(img: Array, sigma, kernel_size: int) -> Array:
  """Separable Gaussian blur with reflect padding (torchvision's choice).

  out = K_W * (K_H * img) with the 1-D kernel of `gaussian_kernel1d`; the
  borders are padded by kernel_size // 2 pixels mirrored about the edge pixel
  (numpy "reflect": x[1], x[0] | x[0], x[1], …), so a constant image is left
  unchanged. Needs kernel_size // 2 < min(H, W). img: (H, W, C).
  """
  if kernel_size % 2 != 1 or kernel_size < 1:
    raise ValueError(f"gaussian_blur needs an odd kernel_size, got "
                     f"{kernel_size}")
  height, width = img.shape[0], img.shape[1]
  pad = kernel_size // 2
  if pad >= min(height, width):
    raise ValueError(f"kernel_size={kernel_size} is too large for reflect "
                     f"padding of an image of shape {img.shape}")
  w = gaussian_kernel1d(sigma, kernel_size).astype(img.dtype)
  # A sum of k shifted slices: exact float32 (no TF32 matmul on GPUs) and
  # k multiply-adds per pixel instead of a dense (H, H) Toeplitz product.
  padded = jnp.pad(img, ((pad, pad), (0, 0), (0, 0)), mode="reflect")
  out = sum(w[i] * padded[i:i + height] for i in range(kernel_size))
  padded = jnp.pad(out, ((0, 0), (pad, pad), (0, 0)), mode="reflect")
  out = sum(w[i] * padded[:, i:i + width] for i in range(kernel_size))
  return jnp.clip(out, 0.0, 1.0)


def solarize(img: Array, threshold: float = 0.5) -> Array:
  """Inverts the pixels at or above the threshold: where(x ≥ t, 1 − x, x)."""
  return jnp.clip(jnp.where(img >= threshold, 1.0 - img, img), 0.0, 1.0)


def _check_jitter_strengths(brightness, contrast, saturation, hue):
  for name, value in (("brightness", brightness), ("contrast", contrast),
                      ("saturation", saturation)):
    if value < 0:
      raise ValueError(f"color jitter {name}={value} must be >= 0")
  if not 0.0 <= hue <= 0.5:
    raise ValueError(f"color jitter hue={hue} must be in [0, 0.5]")


def sample_color_jitter(rng: Array, brightness: float, contrast: float,
                        saturation: float, hue: float):
  """Draws torchvision ColorJitter's random parameters for one image.

  Returns (order, factors): order is a uniformly random permutation of
  (0 brightness, 1 contrast, 2 saturation, 3 hue), shape (4,) int32; factors
  is (4,) float32 with b ~ U[max(0, 1 − brightness), 1 + brightness] (same
  for contrast and saturation) and the hue shift ~ U[−hue, hue].
  """
  _check_jitter_strengths(brightness, contrast, saturation, hue)
  order_key, factor_key = jax.random.split(rng)
  order = jax.random.permutation(order_key, 4).astype(jnp.int32)
  lo = jnp.asarray([max(0.0, 1.0 - brightness), max(0.0, 1.0 - contrast),
                    max(0.0, 1.0 - saturation), -hue], jnp.float32)
  hi = jnp.asarray([1.0 + brightness, 1.0 + contrast, 1.0 + saturation, hue],
                   jnp.float32)
  factors = jax.random.uniform(factor_key, (4,), minval=lo, maxval=hi)
  return order, factors


def apply_color_jitter(img: Array, order: Array, factors: Array, *,
                       enabled: Sequence[bool] = (True,) * 4) -> Array:
  """Applies the four jitter ops in `order` with `factors` (see `sample_…`).

  Step t applies op order[t] (0 brightness, 1 contrast, 2 saturation, 3 hue)
  through `lax.switch` in a `fori_loop`, so the random order needs no Python
  control flow on traced values. `enabled[j] = False` (a static strength of 0)
  makes op j the exact identity; for hue this also skips the HSV round trip,
  which is only identity up to float rounding.

  Under `vmap` (a per-image order) a switch evaluates every branch and
  selects, so a loop over the four steps would run the HSV round trip, by
  far the costliest op, four times per image. Instead the steps before the
  hue step run with the three cheap ops only (a step at or after it is the
  identity), then hue once, then the steps after it: the same ops on the
  same values in the same order, hence the same output bit for bit.
  """
  ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)

  def branch(j):
    if not enabled[j]:
      return lambda x: x
    return lambda x: ops[j](x, factors[j])

  if not enabled[3]:
    branches = [branch(j) for j in range(4)]
    return jax.lax.fori_loop(
        0, 4, lambda t, x: jax.lax.switch(order[t], branches, x), img)
  # Index 3 of the cheap branches is the identity (the hue slot).
  cheap = [branch(j) for j in range(3)] + [lambda x: x]
  hue_step = jnp.argmax(order == 3)

  def before(t, x):
    return jax.lax.switch(jnp.where(t < hue_step, order[t], 3), cheap, x)

  def after(t, x):
    return jax.lax.switch(jnp.where(t > hue_step, order[t], 3), cheap, x)

  x = jax.lax.fori_loop(0, 3, before, img)
  x = branch(3)(x)
  return jax.lax.fori_loop(1, 4, after, x)


def color_jitter(rng: Array, img: Array, brightness: float, contrast: float,
                 saturation: float, hue: float) -> Array:
  """torchvision ColorJitter on one (H, W, C) image in [0, 1].

  Factors drawn as in `sample_color_jitter`, the four ops applied in a random
  order. A strength of 0 leaves that op out exactly.
  """
  order, factors = sample_color_jitter(rng, brightness, contrast, saturation,
                                       hue)
  enabled = (brightness > 0, contrast > 0, saturation > 0, hue > 0)
  return apply_color_jitter(img, order, factors, enabled=enabled)


def _mean_std(mean, std, channels: int):
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  if mean.shape != (channels,) or std.shape != (channels,):
    raise ValueError(f"mean {mean.shape} and std {std.shape} must have one "
                     f"entry per image channel ({channels})")
  return mean, std


def normalize(images_uint8: Array, mean, std, dtype=jnp.float32) -> Array:
  """(x / 255 − mean) / std per channel, cast to `dtype`; no augmentation.

  images_uint8: (…, C) uint8; mean, std: (C,) in [0, 1] units.
  """
  mean, std = _mean_std(mean, std, images_uint8.shape[-1])
  x = images_uint8.astype(jnp.float32) / 255.0
  return ((x - mean) / std).astype(dtype)


def augment_image(rng: Array, img_uint8: Array,
                  aug_config: ml_collections.ConfigDict, mean, std) -> Array:
  """The SimCLR photometric chain on one cropped (H, W, C) uint8 image.

  x = img / 255, then in turn, each with its own Bernoulli draw:
  colour jitter (p = color_jitter_prob), grayscale (grayscale_prob),
  Gaussian blur (blur_prob; σ ~ U[blur_sigma], kernel `blur_kernel_size` of
  min(H, W)), solarisation at 0.5 (solarize_prob); finally (x − mean) / std.
  Returns float32 (H, W, C). Ops are selected with `jnp.where`, so one trace
  serves every draw; an op with probability 0 is not traced at all.
  `aug_config.crop_scale` / `hflip_prob` belong to the host pipeline.
  """
  c = aug_config
  x = img_uint8.astype(jnp.float32) / 255.0
  keys = jax.random.split(rng, 6)

  def maybe(key, prob, op, x):
    if prob <= 0:
      return x
    return jnp.where(jax.random.bernoulli(key, prob), op(x), x)

  x = maybe(keys[0], c.color_jitter_prob,
            lambda x: color_jitter(keys[1], x, c.brightness, c.contrast,
                                   c.saturation, c.hue), x)
  x = maybe(keys[2], c.grayscale_prob, to_grayscale, x)
  if c.blur_prob > 0:
    lo, hi = c.blur_sigma
    sigma = jax.random.uniform(keys[4], (), minval=lo, maxval=hi)
    kernel_size = blur_kernel_size(min(x.shape[0], x.shape[1]))
    x = maybe(keys[3], c.blur_prob,
              lambda x: gaussian_blur(x, sigma, kernel_size), x)
  x = maybe(keys[5], c.solarize_prob, solarize, x)
  mean, std = _mean_std(mean, std, x.shape[-1])
  return (x - mean) / std


def augment_batch(rng: Array, images_uint8: Array,
                  aug_config: ml_collections.ConfigDict, mean, std,
                  dtype=jnp.float32) -> Array:
  """`augment_image` on every image of a (B, H, W, C) uint8 batch.

  Example b uses key jax.random.split(rng, B)[b]; with JAX's partitionable
  threefry these keys, and hence the output, do not depend on how the batch
  is sharded. Returns (B, H, W, C) normalised images in `dtype`.
  """
  keys = jax.random.split(rng, images_uint8.shape[0])
  # The config and statistics are static Python values: closed over, not
  # vmapped.
  out = jax.vmap(lambda key, img: augment_image(key, img, aug_config, mean,
                                                std))(keys, images_uint8)
  return out.astype(dtype)


# ----------------------------------------------------------------------------
# Random resized crops on the device (config.aug.crop_on = "device").
# ----------------------------------------------------------------------------

# Keys' cubic convolution parameter of PIL's (and torchvision's) bicubic.
BICUBIC_A = -0.5


def keys_cubic(x: Array, a: float = BICUBIC_A) -> Array:
  """Keys' cubic kernel: (a+2)|x|³ − (a+3)|x|² + 1 on |x| < 1,
  a(|x|³ − 5|x|² + 8|x| − 4) on 1 ≤ |x| < 2, else 0 (PIL's bicubic)."""
  x = jnp.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def resize_weights(out_size: int, in_size: int, valid, start, length,
                   flip=False) -> Array:
  """(out_size, in_size) antialiased bicubic weights along one axis.

  Output pixel i of a crop [start, start + length) of an axis with `valid`
  real pixels (the rest of the `in_size` canvas is padding) is
  Σ_j W[i, j] x[j] with, as PIL's resampling:
    centre c_i = start + (i + 0.5) · length / out_size,
    s = max(length / out_size, 1) (the kernel widens when shrinking:
      antialiasing),
    W[i, j] ∝ keys_cubic((j + 0.5 − c_i) / s) for j < valid, 0 beyond,
  each row normalised to sum 1 over the valid pixels only, so the padding
  never leaks in and the image edge is handled as PIL does. flip (traced
  bool) reverses the output order: a horizontal flip of the resized crop.
  `valid`, `start`, `length` may be traced scalars.

  (`jax.image.scale_and_translate` computes the same kernel but normalises
  over the whole canvas, so the zero padding would darken crops that touch
  the image's bottom or right edge; hence explicit weights.)
  """
  scale = jnp.asarray(length, jnp.float32) / out_size
  centre = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale + start
  support = jnp.maximum(scale, 1.0)
  j = jnp.arange(in_size, dtype=jnp.float32)
  w = keys_cubic((j[None, :] + 0.5 - centre[:, None]) / support)
  w = jnp.where(j[None, :] < valid, w, 0.0)
  total = jnp.sum(w, axis=1, keepdims=True)
  w = w / jnp.where(total != 0, total, 1.0)
  return jnp.where(flip, w[::-1], w)


def crop_resize(canvas: Array, hw: Array, box: Array, flip, out_size: int
                ) -> Array:
  """One view: the `box` of the image on `canvas`, resized, maybe flipped.

  canvas: (Hc, Wc, C) uint8 with the image in its top-left (h, w) = hw;
  box: (4,) int (top, left, height, width) inside the image; flip: bool.
  Returns (out_size, out_size, C) uint8, what PIL's
  `image.resize((S, S), BICUBIC, box=...)` (then a mirror if flip) gives,
  up to PIL's fixed-point rounding. Two matmuls with the weights of
  `resize_weights` (columns, then rows), at Precision.HIGH: TF32 on GPUs,
  bf16×3 on TPUs, float32 on CPUs.
  """
  hc, wc = canvas.shape[0], canvas.shape[1]
  top, left, height, width = (box[i].astype(jnp.float32) for i in range(4))
  rows = resize_weights(out_size, hc, hw[0], top, height)
  cols = resize_weights(out_size, wc, hw[1], left, width, flip)
  x = canvas.astype(jnp.float32)
  precision = jax.lax.Precision.HIGH
  # Columns first, rounded and clipped to 0..255 in between, as PIL's two
  # 8-bit passes (horizontal, then vertical): the clipping of the cubic's
  # overshoot in between is what PIL's views have.
  x = jnp.einsum("tw,hwc->htc", cols, x, precision=precision)
  x = jnp.clip(jnp.round(x), 0.0, 255.0)
  x = jnp.einsum("sh,htc->stc", rows, x, precision=precision)
  return jnp.clip(jnp.round(x), 0.0, 255.0).astype(jnp.uint8)


def crop_views(batch, out_size: int) -> tuple[Array, Array]:
  """Both views of every example of a device-crop batch.

  batch: {"canvas": uint8 (B, Hc, Wc, C), "hw": int (B, 2), "boxes": int
  (B, 2, 4), "flips": bool (B, 2), ...} as made by the device-crop
  pipeline (`input_pipeline.TwoBoxes` + `CanvasBatch`). Returns (view1,
  view2), uint8 (B, S, S, C). Device memory: two (S, K) float32 weight
  matrices and one (K, S, C) float32 intermediate per view.
  """
  def one(canvas, hw, boxes, flips):
    return tuple(crop_resize(canvas, hw, boxes[v], flips[v], out_size)
                 for v in range(2))
  return jax.vmap(one)(batch["canvas"], batch["hw"], batch["boxes"],
                       batch["flips"])


def views_of_batch(batch, out_size: int) -> tuple[Array, Array]:
  """(view1, view2) uint8 of a pre-training batch, whichever side cropped.

  Host crops: the batch holds "view1"/"view2"; device crops: it holds the
  canvas and the boxes, cut here with `crop_views`.
  """
  if "canvas" in batch:
    return crop_views(batch, out_size)
  return batch["view1"], batch["view2"]
