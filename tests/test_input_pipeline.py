"""Tests of the Grain pipelines: augmentation statistics, sharding,
determinism, checkpoint/restore and eval padding."""
import collections
import json
import math
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bayesncl_jax import config_lib
from bayesncl_jax import datasets
from bayesncl_jax import input_pipeline

needs_fashion_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(datasets.FASHION_MNIST_DEBIAN_DIR,
                                    "train-images-idx3-ubyte.gz")),
    reason="apt-get install dataset-fashion-mnist")


def _fmnist_config(n=64, batch_size=8, image_size=16, workers=0, seed=0):
  config = config_lib.base_config()
  config.seed = seed
  config.dataset.name = "fashion_mnist"
  config.dataset.image_size = image_size
  config.dataset.max_train_examples = n
  config.dataset.num_workers = workers
  config.optim.batch_size = batch_size
  return config


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ----------------------------------------------------------------------------
# Augmentations.
# ----------------------------------------------------------------------------


def test_crop_params_follow_scale_and_ratio():
  rng = np.random.default_rng(0)
  height, width, scale = 400, 500, (0.2, 0.6)
  fractions, ratios = [], []
  for _ in range(2000):
    top, left, h, w = input_pipeline.random_resized_crop_params(
        height, width, scale, input_pipeline.CROP_RATIO, rng)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    fractions.append(h * w / (height * width))
    ratios.append(w / h)
  fractions, ratios = np.array(fractions), np.array(ratios)
  # Integer rounding of w and h moves the area by well under 1 %.
  assert fractions.min() >= 0.2 * 0.99 and fractions.max() <= 0.6 * 1.01
  assert abs(fractions.mean() - 0.4) < 0.01  # area ~ U(scale)
  assert ratios.min() >= 0.75 * 0.98 and ratios.max() <= 4 / 3 * 1.02
  # log-ratio is uniform: as many crops wider than tall as taller than wide.
  assert abs(np.mean(ratios > 1) - 0.5) < 0.05


def test_crop_fallback_is_torchvision_centre_crop():
  rng = np.random.default_rng(0)
  # scale=(1, 1) on a 3:1 image: no try fits, fallback clamps ratio to 4/3.
  assert input_pipeline.random_resized_crop_params(
      100, 300, (1.0, 1.0), input_pipeline.CROP_RATIO, rng) == (0, 83, 100, 133)
  assert input_pipeline.random_resized_crop_params(
      300, 100, (1.0, 1.0), input_pipeline.CROP_RATIO, rng) == (83, 0, 133, 100)
  # Image ratio 31/30 below the range (1.2, 1.3): full width, height
  # round(31 / 1.2) = 26, centred.
  assert input_pipeline.random_resized_crop_params(
      30, 31, (1.0, 1.0), (1.2, 1.3), rng) == (2, 0, 26, 31)
  # Image ratio inside the range, no try fits (area > image): whole image.
  assert input_pipeline.random_resized_crop_params(
      30, 31, (1.0, 1.0), (0.5, 2.0), _AlwaysTooBig()) == (0, 0, 30, 31)


class _AlwaysTooBig:
  """Stand-in rng: every draw is the upper bound, so with scale (1, 1) and
  ratio up to 2 each try is a full-area crop 43 pixels wide, which never fits
  a 31-pixel-wide image."""

  def uniform(self, low, high):
    del low
    return high

  def integers(self, low, high):
    raise AssertionError("no try should fit")


@pytest.mark.parametrize("hflip_prob", [0.0, 0.3, 1.0])
def test_flip_frequency(hflip_prob):
  image = np.zeros((16, 16, 3), np.uint8)
  image[:, 8:] = 255  # dark left half, bright right half
  views = input_pipeline.TwoViews(image_size=16, crop_scale=(1.0, 1.0),
                                  hflip_prob=hflip_prob)
  flips = []
  for i in range(1000):
    out = views.random_map({"image": image, "label": 3},
                           np.random.default_rng(i))
    for key in ("view1", "view2"):
      left = out[key][:, :6].mean()
      right = out[key][:, 10:].mean()
      flips.append(left > right)
    assert out["label"] == 3 and out["label"].dtype == np.int32
  frequency = np.mean(flips)
  sigma = math.sqrt(max(hflip_prob * (1 - hflip_prob), 1e-9) / len(flips))
  assert abs(frequency - hflip_prob) <= 4 * sigma + 1e-9


def test_views_have_the_configured_crop_area():
  # A 64x64 image whose pixel value encodes its column: the width of the crop
  # that was resized is recovered from the value range of the view.
  columns = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
  image = np.stack([columns] * 3, axis=-1)
  views = input_pipeline.TwoViews(image_size=32, crop_scale=(0.25, 0.25),
                                  hflip_prob=0.0)
  for i in range(50):
    view = views.random_map({"image": image, "label": 0},
                            np.random.default_rng(i))["view1"]
    assert view.shape == (32, 32, 3)
    crop_width = (int(view[0, -1, 0]) - int(view[0, 0, 0])) / 4 + 1
    # area 1/4 and ratio in [3/4, 4/3] -> width in 64 * [0.433, 0.577].
    assert 0.43 * 64 - 2 <= crop_width <= 0.58 * 64 + 2


def test_centre_crop_resize():
  image = np.zeros((40, 60, 3), np.uint8)
  image[:, 20:40] = 200  # a bright centre band, one third of the width
  out = input_pipeline.center_crop_resize(image, 16)
  assert out.shape == (16, 16, 3)
  # Shorter side -> round(16 / 0.875) = 18, so width 27; the centre 16 of 27
  # columns contain the 9 bright ones in the middle.
  bright = (out[8] > 100).sum(axis=-1) == 3
  assert 7 <= bright.sum() <= 11 and bright[7:9].all()


# ----------------------------------------------------------------------------
# Pre-training iterator.
# ----------------------------------------------------------------------------


@needs_fashion_mnist
def test_pretrain_batches_format_and_determinism():
  config = _fmnist_config()
  it = input_pipeline.create_pretrain_iterator(config, process_index=0,
                                               process_count=1)
  first = _take(it, 3)
  it.close()
  batch = first[0]
  assert set(batch) == {"view1", "view2", "label"}
  assert batch["view1"].shape == batch["view2"].shape == (8, 16, 16, 1)
  assert batch["view1"].dtype == batch["view2"].dtype == np.uint8
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert batch["label"].min() >= 0 and batch["label"].max() < 10
  # Two views of the same image differ (independent crops and flips).
  differ = [not np.array_equal(a, b)
            for b_ in first for a, b in zip(b_["view1"], b_["view2"])]
  assert np.mean(differ) > 0.9

  again = input_pipeline.create_pretrain_iterator(config, process_index=0,
                                                  process_count=1)
  _assert_same_batches(first, _take(again, 3))
  again.close()

  other = input_pipeline.create_pretrain_iterator(
      _fmnist_config(seed=1), process_index=0, process_count=1)
  other_batches = _take(other, 3)
  other.close()
  assert not np.array_equal(first[0]["view1"], other_batches[0]["view1"])


def _constant_source(n, size=8):
  """Example i is a constant image of value i: crops keep the value."""
  images = np.repeat(np.arange(n, dtype=np.uint8), size * size).reshape(
      n, size, size, 1)
  return datasets.ArrayImageSource(images, np.arange(n) % 10)


def test_process_rows_are_disjoint_covering_and_reshuffled(monkeypatch):
  n = 24
  monkeypatch.setattr(datasets, "get_source",
                      lambda dataset_config, split: _constant_source(n))
  config = _fmnist_config(n=-1, batch_size=8, image_size=8)
  ids = {}
  for process_index in range(2):
    it = input_pipeline.create_pretrain_iterator(
        config, process_index=process_index, process_count=2)
    batches = _take(it, 6)  # 3 global batches of 8 per epoch: two epochs.
    it.close()
    ids[process_index] = []
    for batch in batches:
      assert batch["view1"].shape == (4, 8, 8, 1)
      # Constant images: every pixel of the view is the example id.
      assert (batch["view1"] == batch["view1"][:, :1, :1]).all()
      assert (batch["view1"][:, 0, 0, 0] == batch["view2"][:, 0, 0, 0]).all()
      ids[process_index].append(batch["view1"][:, 0, 0, 0].tolist())
      np.testing.assert_array_equal(batch["label"],
                                    batch["view1"][:, 0, 0, 0] % 10)
  # Global batch k = process 0's rows, then process 1's.
  stream = [i for k in range(6) for i in ids[0][k] + ids[1][k]]
  first, second = stream[:n], stream[n:]
  # Each epoch visits every example once, in a new order.
  assert sorted(first) == sorted(second) == list(range(n))
  assert first != second

  with pytest.raises(ValueError, match="divisible"):
    input_pipeline.create_pretrain_iterator(config, process_index=0,
                                            process_count=3)
  with pytest.raises(ValueError, match="fewer than one batch"):
    input_pipeline.create_pretrain_iterator(
        _fmnist_config(n=-1, batch_size=32, image_size=8), process_index=0,
        process_count=1)


@pytest.mark.slow
@needs_fashion_mnist
def test_checkpoint_restore_resumes_identically_with_0_and_2_workers(
    tmp_path):
  config0 = _fmnist_config(workers=0)
  it = input_pipeline.create_pretrain_iterator(config0, process_index=0,
                                               process_count=1)
  reference = _take(it, 6)
  it.close()

  # 0 workers: save after 3 batches, restore into a fresh iterator.
  it = input_pipeline.create_pretrain_iterator(config0, process_index=0,
                                               process_count=1)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  assert state["next_batch"] == 3
  expected = _take(it, 2)
  it.close()
  _assert_same_batches(expected, reference[3:5])
  restored = input_pipeline.create_pretrain_iterator(config0, process_index=0,
                                                     process_count=1)
  restored.set_state(state)
  _assert_same_batches(_take(restored, 2), expected)
  restored.close()

  # 2 workers: the same stream (independent of the worker count), and the
  # 0-worker state restores into it.
  config2 = _fmnist_config(workers=2)
  it = input_pipeline.create_pretrain_iterator(config2, process_index=0,
                                               process_count=1)
  try:
    _assert_same_batches(_take(it, 4), reference[:4])
    state2 = json.loads(json.dumps(it.get_state()))
    assert state2 == {**state, "next_batch": 4}
    it.set_state(state)  # rewinds to batch 3 and restarts the workers
    _assert_same_batches(_take(it, 3), reference[3:6])
  finally:
    it.close()


def test_cifar10_mock_pretrain_and_eval(tmp_path):
  config = config_lib.base_config()
  config.dataset.data_dir = str(tmp_path)
  config.optim.batch_size = 8
  with tfds.testing.mock_data(num_examples=20):
    it = input_pipeline.create_pretrain_iterator(config, process_index=0,
                                                 process_count=1)
    batch = next(it)
    it.close()
    assert batch["view1"].shape == (8, 32, 32, 3)
    eval_it = input_pipeline.create_eval_iterator(
        config, "test", 8, process_index=0, process_count=1)
    masks = [b["mask"] for b in eval_it]
    eval_it.close()
  assert len(masks) == 3 and int(np.concatenate(masks).sum()) == 20


# ----------------------------------------------------------------------------
# Eval iterator.
# ----------------------------------------------------------------------------


@needs_fashion_mnist
@pytest.mark.parametrize("image_size", [28, 32])
def test_eval_covers_every_example_once_with_mask(image_size):
  # The training split truncated to 101 examples, evaluated by 2 processes
  # with a global batch of 20 (10 per process).
  config = _fmnist_config(n=101, image_size=image_size)
  split = config.dataset.train_split
  source = datasets.get_source(config.dataset, split)
  n_batches = input_pipeline.num_eval_batches(config, split, 20,
                                              process_count=2)
  assert n_batches == 6  # ceil(ceil(101 / 2) / 10)
  seen = collections.Counter()
  real = []
  for process_index in range(2):
    it = input_pipeline.create_eval_iterator(
        config, split, 20, process_index=process_index, process_count=2)
    batches = list(it)
    it.close()
    assert len(batches) == n_batches
    for batch in batches:
      assert batch["image"].shape == (10, image_size, image_size, 1)
      assert batch["image"].dtype == np.uint8
      assert batch["label"].dtype == np.int32
      assert batch["mask"].dtype == np.bool_
      for image, label, mask in zip(batch["image"], batch["label"],
                                    batch["mask"]):
        if mask:
          seen[(image.tobytes(), int(label))] += 1
        else:
          assert not image.any() and label == 0
    mask = np.concatenate([b["mask"] for b in batches])
    real.append(int(mask.sum()))
    # Padding only at the end.
    assert mask[:real[-1]].all() and not mask[real[-1]:].any()
  assert real == [51, 50]
  if image_size == 28:  # as is: exactly the source's examples
    expected = collections.Counter(
        (source[i]["image"].tobytes(), source[i]["label"])
        for i in range(len(source)))
    assert seen == expected
  else:
    assert sum(seen.values()) == 101
