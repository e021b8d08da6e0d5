"""Augmentations against hand values, colorsys, and batch statistics."""
import colorsys
import functools
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesncl_jax import augment
from bayesncl_jax import config_lib

RED = jnp.array([[[1.0, 0.0, 0.0]]])
# Jitted once here: eager op-by-op dispatch of the HSV round trip is slow.
adjust_hue = jax.jit(augment.adjust_hue)


def random_image(seed, shape=(4, 5, 3), lo=0.0, hi=1.0):
  return jnp.asarray(
      np.random.default_rng(seed).uniform(lo, hi, shape), jnp.float32)


def random_uint8(seed, shape):
  return jnp.asarray(
      np.random.default_rng(seed).integers(0, 256, shape), jnp.uint8)


def aug_config(**overrides):
  """config.aug with every random op off, then `overrides`."""
  c = config_lib.base_config().aug
  c.color_jitter_prob = 0.0
  c.grayscale_prob = 0.0
  c.blur_prob = 0.0
  c.solarize_prob = 0.0
  c.update(overrides)
  return c


def luma(img):
  img = np.asarray(img, np.float64)
  return 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]


# ---------------------------------------------------------------- single ops


def test_brightness_identity_halves_and_clips():
  img = random_image(0)
  np.testing.assert_array_equal(augment.adjust_brightness(img, 1.0), img)
  np.testing.assert_allclose(augment.adjust_brightness(img, 0.5), img / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(augment.adjust_brightness(img, 3.0),
                             np.minimum(3 * np.asarray(img), 1.0), rtol=1e-6)


def test_contrast_blends_with_mean_gray_level():
  img = random_image(1)
  m = luma(img).mean()
  np.testing.assert_allclose(augment.adjust_contrast(img, 0.0),
                             np.full(img.shape, m), rtol=1e-6)
  np.testing.assert_array_equal(augment.adjust_contrast(img, 1.0), img)
  np.testing.assert_allclose(augment.adjust_contrast(img, 1.5),
                             np.clip(1.5 * np.asarray(img) - 0.5 * m, 0, 1),
                             atol=1e-6)


def test_saturation_zero_is_grayscale_and_one_is_identity():
  img = random_image(2)
  gray = np.repeat(luma(img)[..., None], 3, axis=-1)
  np.testing.assert_allclose(augment.adjust_saturation(img, 0.0), gray,
                             rtol=1e-6)
  np.testing.assert_array_equal(augment.adjust_saturation(img, 1.0), img)
  np.testing.assert_allclose(augment.adjust_saturation(img, 2.0),
                             np.clip(2 * np.asarray(img) - gray, 0, 1),
                             atol=1e-6)


def test_grayscale_equal_channels_with_601_luma():
  img = jnp.array([[[0.2, 0.4, 0.6], [1.0, 0.0, 0.0]]])
  out = np.asarray(augment.to_grayscale(img))
  np.testing.assert_allclose(out[0, 0], [0.363] * 3, rtol=1e-6)  # .0598+.2348+.0684
  np.testing.assert_allclose(out[0, 1], [0.299] * 3, rtol=1e-6)
  img = random_image(3)
  out = np.asarray(augment.to_grayscale(img))
  assert out.shape == img.shape
  np.testing.assert_allclose(out, np.repeat(luma(img)[..., None], 3, -1),
                             rtol=1e-6)


def test_hue_hand_values():
  np.testing.assert_allclose(adjust_hue(RED, 0.5), [[[0, 1, 1]]],
                             atol=1e-6)  # cyan
  np.testing.assert_allclose(adjust_hue(RED, 1 / 3), [[[0, 1, 0]]],
                             atol=1e-6)  # green
  np.testing.assert_allclose(adjust_hue(RED, -1 / 3), [[[0, 0, 1]]],
                             atol=1e-6)  # blue
  img = random_image(4)
  np.testing.assert_allclose(adjust_hue(img, 0.0), img, atol=1e-6)


@pytest.mark.parametrize("delta", [-0.5, -0.2, 0.13, 0.37])
def test_hue_matches_colorsys(delta):
  img = np.array(random_image(5, (3, 4, 3)))
  # Include grays, black and a tie of the two largest channels.
  img[0, 0] = [0.5, 0.5, 0.5]
  img[0, 1] = [0.0, 0.0, 0.0]
  img[0, 2] = [0.8, 0.8, 0.1]
  expected = np.empty_like(img, dtype=np.float64)
  for i in range(img.shape[0]):
    for j in range(img.shape[1]):
      h, s, v = colorsys.rgb_to_hsv(*img[i, j].astype(np.float64))
      expected[i, j] = colorsys.hsv_to_rgb((h + delta) % 1.0, s, v)
  np.testing.assert_allclose(adjust_hue(jnp.asarray(img), delta),
                             expected, atol=2e-6)


def test_gaussian_kernel_formula_and_sum():
  w = np.asarray(augment.gaussian_kernel1d(1.3, 7))
  x = np.arange(7) - 3.0
  g = np.exp(-x**2 / (2 * 1.3**2))
  np.testing.assert_allclose(w, g / g.sum(), rtol=1e-6)
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)


def test_blur_constant_unchanged_and_impulse_gives_gaussian():
  const = jnp.full((6, 7, 3), 0.37)
  np.testing.assert_allclose(augment.gaussian_blur(const, 1.7, 5), const,
                             rtol=1e-6)
  impulse = np.zeros((9, 9, 1), np.float32)
  impulse[4, 4] = 1.0
  out = np.asarray(augment.gaussian_blur(jnp.asarray(impulse), 1.0, 5))
  x = np.arange(5) - 2.0
  g = np.exp(-x**2 / 2)
  g /= g.sum()
  expected = np.zeros((9, 9))
  expected[2:7, 2:7] = np.outer(g, g)
  np.testing.assert_allclose(out[..., 0], expected, atol=1e-7)


def test_blur_pads_by_reflection():
  # Impulse in the corner: "reflect" mirrors about the edge pixel, so the
  # padded ring holds img[1] = 0 and out[0, 0] = w_centre². Edge padding
  # would give (w_centre + w_side)².
  img = np.zeros((4, 4, 1), np.float32)
  img[0, 0] = 1.0
  w = np.asarray(augment.gaussian_kernel1d(0.8, 3))
  out = augment.gaussian_blur(jnp.asarray(img), 0.8, 3)
  np.testing.assert_allclose(out[0, 0, 0], w[1]**2, rtol=1e-6)
  np.testing.assert_allclose(out[1, 1, 0], w[0]**2, rtol=1e-6)


def test_blur_kernel_size_rule():
  assert augment.blur_kernel_size(224) == 23
  assert augment.blur_kernel_size(96) == 9
  assert augment.blur_kernel_size(32) == 3
  assert augment.blur_kernel_size(4) == 3


def test_solarize_threshold():
  img = jnp.array([[[0.2, 0.5, 0.9]]])
  np.testing.assert_allclose(augment.solarize(img), [[[0.2, 0.5, 0.1]]],
                             rtol=1e-6)
  np.testing.assert_allclose(augment.solarize(img, 0.95), img)


def test_single_channel_ops():
  img = random_image(6, (4, 5, 1))
  for out in (augment.adjust_saturation(img, 0.0),
              augment.adjust_hue(img, 0.3), augment.to_grayscale(img)):
    np.testing.assert_array_equal(out, img)
  np.testing.assert_allclose(augment.adjust_brightness(img, 0.5), img / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(augment.adjust_contrast(img, 0.0),
                             np.full(img.shape, np.mean(img)), rtol=1e-6)


# ------------------------------------------------------------- colour jitter


def test_jitter_applies_ops_in_the_given_order():
  img = random_image(7)
  factors = jnp.array([1.4, 0.6, 1.7, 0.2])
  b = lambda x: augment.adjust_brightness(x, factors[0])
  c = lambda x: augment.adjust_contrast(x, factors[1])
  s = lambda x: augment.adjust_saturation(x, factors[2])
  h = lambda x: augment.adjust_hue(x, factors[3])
  apply = jax.jit(augment.apply_color_jitter)
  forward = apply(img, jnp.array([0, 1, 2, 3]), factors)
  backward = apply(img, jnp.array([3, 2, 1, 0]), factors)
  np.testing.assert_allclose(forward, h(s(c(b(img)))), atol=1e-6)
  np.testing.assert_allclose(backward, b(c(s(h(img)))), atol=1e-6)
  assert np.abs(np.asarray(forward) - np.asarray(backward)).max() > 1e-2


def test_jitter_every_order_per_image_equals_the_sequential_ops():
  # vmapped, each image with its own order (all 24): the hue-once schedule
  # must apply exactly the ops a plain loop over the order applies.
  orders = np.array(list(itertools.permutations(range(4))), np.int32)
  imgs = jnp.stack([random_image(i, (5, 6, 3)) for i in range(len(orders))])
  factors = jnp.array([1.4, 0.6, 1.7, 0.2])
  got = jax.jit(jax.vmap(lambda x, o: augment.apply_color_jitter(
      x, o, factors)))(imgs, orders)
  ops = (augment.adjust_brightness, augment.adjust_contrast,
         augment.adjust_saturation, augment.adjust_hue)
  for img, order, out in zip(imgs, orders, got):
    want = img
    for j in order:
      want = ops[j](want, factors[j])
    np.testing.assert_allclose(out, want, atol=1e-6, err_msg=str(order))


def test_jitter_lowers_without_scatter_or_float_remainder():
  # XLA:CPU runs a scatter as a per-element loop and a float remainder as a
  # libm call: the vmapped jitter (where every switch branch runs) had both.
  fn = jax.vmap(lambda k, x: augment.color_jitter(k, x, 0.8, 0.8, 0.8, 0.2))
  keys = jax.random.split(jax.random.key(0), 4)
  hlo = jax.jit(fn).lower(keys, jnp.zeros((4, 8, 8, 3))).as_text()
  assert "scatter" not in hlo
  assert "stablehlo.remainder" not in hlo


def test_wrap_equals_mod_on_its_range():
  for period in (1.0, 6.0):
    lo, hi = np.float32(-period), np.float32(2 * period)
    x = np.concatenate([np.linspace(lo, hi, 10_001, dtype=np.float32)[1:-1],
                        np.float32([-0.0, 0.0, period,
                                    np.nextafter(np.float32(period), 0)]),
                        np.nextafter(lo, 0)[None], np.nextafter(hi, 0)[None]])
    got = np.asarray(jax.jit(augment._wrap, static_argnums=1)(x, period))
    want = np.asarray(jnp.mod(x, period))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))


def test_jitter_parameter_distribution():
  keys = jax.random.split(jax.random.key(0), 4000)
  order, factors = jax.jit(jax.vmap(
      lambda k: augment.sample_color_jitter(k, 0.8, 0.3, 1.5, 0.2)))(keys)
  order, factors = np.asarray(order), np.asarray(factors)
  np.testing.assert_array_equal(np.sort(order, axis=1),
                                np.tile(np.arange(4), (4000, 1)))
  # Each op comes first a quarter of the time: sigma = sqrt(3/16 / 4000).
  np.testing.assert_allclose(np.bincount(order[:, 0], minlength=4) / 4000,
                             0.25, atol=0.035)
  lo = np.array([0.2, 0.7, 0.0, -0.2])
  hi = np.array([1.8, 1.3, 2.5, 0.2])
  assert (factors >= lo).all() and (factors <= hi).all()
  # Uniform on [lo, hi]: the extremes are reached and the mean is central.
  width = hi - lo
  assert np.all(np.abs(factors.min(0) - lo) < 0.01 * width)
  assert np.all(np.abs(factors.max(0) - hi) < 0.01 * width)
  assert np.all(np.abs(factors.mean(0) - (lo + hi) / 2) < 0.03 * width)


# ------------------------------------------------------------- batch pipeline

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
N_STATS = 2000


def _augment_stats_batch(config, seed=0):
  images = random_uint8(seed, (N_STATS, 4, 4, 3))
  fn = jax.jit(functools.partial(augment.augment_batch, aug_config=config,
                                 mean=MEAN, std=STD))
  out = fn(jax.random.key(seed), images)
  return images, np.asarray(out)


def test_normalize_hand_value_and_dtype():
  img = jnp.array([[[[0, 255, 51]]]], jnp.uint8)
  expected = [(0 - 0.4914) / 0.2470, (1 - 0.4822) / 0.2435,
              (0.2 - 0.4465) / 0.2616]
  np.testing.assert_allclose(augment.normalize(img, MEAN, STD)[0, 0, 0],
                             expected, rtol=1e-6)
  out = augment.normalize(img, MEAN, STD, dtype=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16


def test_all_probabilities_zero_is_normalize():
  images, out = _augment_stats_batch(aug_config())
  # Bit-exact against `normalize` compiled the same way (XLA may turn the
  # division by 255 into a multiply, eagerly or not).
  np.testing.assert_array_equal(
      out, jax.jit(augment.normalize, static_argnums=(1, 2))(images, MEAN,
                                                             STD))


def test_grayscale_fraction():
  _, out = _augment_stats_batch(aug_config(grayscale_prob=0.2))
  x = out * np.array(STD) + np.array(MEAN)  # back to [0, 1].
  equal = np.all(np.abs(x - x[..., :1]) < 1e-5, axis=(1, 2, 3))
  # Binomial(2000, 0.2): sigma ≈ 0.009.
  np.testing.assert_allclose(equal.mean(), 0.2, atol=0.04)


@pytest.mark.parametrize("overrides, prob", [
    (dict(color_jitter_prob=0.3, brightness=0.5, contrast=0.0,
          saturation=0.0, hue=0.0), 0.3),
    (dict(blur_prob=0.5), 0.5),
    (dict(solarize_prob=0.7), 0.7),
])
def test_op_fraction(overrides, prob):
  images, out = _augment_stats_batch(aug_config(**overrides), seed=1)
  changed = np.any(
      np.abs(out - augment.normalize(images, MEAN, STD)) > 1e-4,
      axis=(1, 2, 3))
  np.testing.assert_allclose(changed.mean(), prob, atol=0.05)


def test_brightness_only_jitter_scales_each_image_uniformly():
  # Pixels <= 127/255 with factors <= 1.8 never clip: out = factor * in.
  images = jnp.asarray(
      np.random.default_rng(2).integers(10, 128, (N_STATS, 2, 2, 3)),
      jnp.uint8)
  config = aug_config(color_jitter_prob=1.0, brightness=0.8, contrast=0.0,
                      saturation=0.0, hue=0.0)
  out = jax.jit(functools.partial(
      augment.augment_batch, aug_config=config, mean=(0.0,) * 3,
      std=(1.0,) * 3))(jax.random.key(3), images)
  ratio = np.asarray(out) / (np.asarray(images) / 255.0)
  np.testing.assert_allclose(ratio, ratio[:, :1, :1, :1] * np.ones_like(ratio),
                             rtol=1e-5)
  factor = ratio[:, 0, 0, 0]
  assert factor.min() >= 0.2 - 1e-6 and factor.max() <= 1.8 + 1e-6
  np.testing.assert_allclose(factor.mean(), 1.0, atol=0.05)
  np.testing.assert_allclose(factor.var(), 1.6**2 / 12, rtol=0.1)


def test_single_channel_batch():
  config = config_lib.base_config().aug
  config.blur_prob = 0.5
  images = random_uint8(4, (64, 6, 6, 1))
  out = jax.jit(functools.partial(
      augment.augment_batch, aug_config=config, mean=(0.286,),
      std=(0.353,)))(jax.random.key(0), images)
  chex.assert_shape(out, (64, 6, 6, 1))
  chex.assert_tree_all_finite(out)
  x = np.asarray(out) * 0.353 + 0.286
  assert x.min() >= -1e-6 and x.max() <= 1 + 1e-6


def test_jit_compiles_once():
  config = config_lib.base_config().aug
  config.blur_prob = 0.5
  config.solarize_prob = 0.2

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(rng, images):
    return augment.augment_batch(rng, images, config, MEAN, STD,
                                 dtype=jnp.bfloat16)

  for seed in range(3):
    out = step(jax.random.key(seed), random_uint8(seed, (8, 8, 8, 3)))
    assert out.dtype == jnp.bfloat16


def test_sharded_equals_unsharded():
  assert jax.device_count() == 8
  config = config_lib.base_config().aug
  config.blur_prob = 0.5
  config.solarize_prob = 0.3
  fn = functools.partial(augment.augment_batch, aug_config=config, mean=MEAN,
                         std=STD)
  images = random_uint8(5, (16, 8, 8, 3))
  rng = jax.random.key(11)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  batch_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.jit(fn, in_shardings=(replicated, batch_sharding),
                    out_shardings=batch_sharding)(
                        rng, jax.device_put(images, batch_sharding))
  assert len(sharded.sharding.device_set) == 8
  single = jax.jit(fn)(rng, jax.device_put(images, jax.devices()[0]))
  np.testing.assert_allclose(sharded, single, atol=1e-6)
  # The views really are augmented (not all identity).
  assert np.abs(np.asarray(single) -
                augment.normalize(images, MEAN, STD)).max() > 0.1


def test_rejects_mismatched_statistics():
  with pytest.raises(ValueError, match="one entry per image channel"):
    augment.normalize(random_uint8(0, (2, 4, 4, 3)), (0.5,), (0.5,))
