"""The fashion_mnist_backgrounds testbed: generation, cache, source, config.

The full training split is built once per test session (about 10 s) into a
temporary cache; the other tests use the 10k test split.
"""
import importlib.util
import os
import pathlib
import pickle
import zlib

import jax
import numpy as np
import pytest

from bayesncl_jax import backgrounds
from bayesncl_jax import config_lib
from bayesncl_jax import datasets
from bayesncl_jax import input_pipeline
from bayesncl_jax import show_backgrounds

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEBIAN = datasets.FASHION_MNIST_DEBIAN_DIR
needs_fashion_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(DEBIAN, "train-images-idx3-ubyte.gz")),
    reason="apt-get install dataset-fashion-mnist")


def _config(cache_dir, arg=None, **overrides):
  return config_lib.load_file(
      ROOT / "configs" / "fashion_mnist_backgrounds.py", arg,
      {"dataset.cache_dir": str(cache_dir), **overrides})


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory):
  cache = tmp_path_factory.mktemp("bg_cache")
  config = _config(cache)
  return config, datasets.get_source(config.dataset, "train")


# ----------------------------------------------------------------------------
# Pure generation.
# ----------------------------------------------------------------------------


def test_composite_formula_on_a_hand_example():
  bg = np.zeros((1, 32, 32, 3), np.uint8)
  bg[..., :] = (0, 100, 200)
  obj = np.zeros((1, 28, 28), np.uint8)
  obj[0, 0, 0] = 255  # opaque white
  obj[0, 0, 1] = 128  # half: round(128 + b - 128 b / 255)
  out = backgrounds.composite(obj, bg)
  assert out.shape == (1, 32, 32, 3) and out.dtype == np.uint8
  # The object sits at rows/columns 2..29.
  np.testing.assert_array_equal(out[0, 2, 2], (255, 255, 255))
  # 128 + 0 - 0 = 128; 128 + 100 - 50.20 = 177.8; 128 + 200 - 100.39 = 227.6.
  np.testing.assert_array_equal(out[0, 2, 3], (128, 178, 228))
  # Transparent (o = 0) object pixels and the 2-pixel border: background.
  np.testing.assert_array_equal(out[0, 2, 4], (0, 100, 200))
  np.testing.assert_array_equal(out[0, :2], bg[0, :2])
  np.testing.assert_array_equal(out[0, :, 30:], bg[0, :, 30:])
  # Every pixel against the float formula alpha * 255 + (1 - alpha) * b.
  rng = np.random.default_rng(0)
  obj = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
  bg = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  alpha = obj[..., None] / 255.0
  expected = np.round(alpha * 255 + (1 - alpha) * bg[:, 2:30, 2:30])
  np.testing.assert_array_equal(backgrounds.composite(obj, bg)[:, 2:30, 2:30],
                                expected.astype(np.uint8))


def _summary_features(images):
  """Per image: mean and std of each channel, mean |d/dx| and |d/dy|."""
  x = images.astype(np.float64)
  return np.concatenate([
      x.mean(axis=(1, 2)), x.std(axis=(1, 2)),
      np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))[:, None],
      np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3))[:, None]], axis=1)


def test_backgrounds_are_colourful_and_told_apart_by_simple_statistics():
  rng = np.random.default_rng(0)
  rendered = [backgrounds.render_backgrounds(
      k, rng.integers(0, 64, (40, 2)), rng)
              for k in range(backgrounds.MAX_BACKGROUNDS)]
  for k, images in enumerate(rendered):
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
    # Colour, not grey: the channels differ somewhere.
    assert np.abs(np.diff(images.astype(int), axis=-1)).max() > 50, k
    # No background near white, where the white object would vanish.
    assert images.astype(int).sum(-1).max() < 3 * 230, k
  # Salient: a nearest-centroid rule on 8 colour/texture statistics names
  # the background of every image (centroids from the first 20 per kind).
  feats = [_summary_features(r) for r in rendered]
  scale = np.concatenate(feats).std(0)
  centroids = np.stack([f[:20].mean(0) for f in feats]) / scale
  for k, f in enumerate(feats):
    dist = np.linalg.norm(f[20:, None] / scale - centroids[None], axis=-1)
    assert (dist.argmin(1) == k).all(), k


def test_periodic_backgrounds_shift_with_the_phase():
  rng = np.random.default_rng(0)
  phases = np.asarray([[0, 0], [1, 1]])
  stripes = backgrounds.render_backgrounds(2, phases, rng)
  assert not np.array_equal(stripes[0], stripes[1])
  # Diagonal stripes of period 8: moving by one row shifts them by one.
  np.testing.assert_array_equal(stripes[1][:-1], stripes[0][1:])
  gradient = backgrounds.render_backgrounds(0, phases, rng)
  np.testing.assert_array_equal(gradient[0], gradient[1])


def test_build_split_is_deterministic_and_chunk_independent():
  rng = np.random.default_rng(1)
  objects = rng.integers(0, 256, (500, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 500)
  a = backgrounds.build_split(objects, labels, "test", 8)
  b = backgrounds.build_split(objects, labels, "test", 8, chunk=64)
  for x, y in zip(a, b):
    assert x.tobytes() == y.tobytes()
  other = backgrounds.build_split(objects, labels, "train", 8)
  assert not np.array_equal(a[1], other[1])  # splits use their own stream


def test_assignment_is_balanced_within_every_class():
  labels = np.repeat(np.arange(3), [7, 12, 5])
  got = backgrounds.assign_backgrounds(labels, 4, np.random.default_rng(0))
  for c in range(3):
    counts = np.bincount(got[labels == c], minlength=4)
    assert counts.max() - counts.min() <= 1
    assert counts.sum() == (labels == c).sum()


def test_bad_number_of_backgrounds_is_rejected_clearly():
  with pytest.raises(ValueError, match="num_backgrounds=9 must be in 1..8"):
    backgrounds.background_names(9)
  with pytest.raises(ValueError, match="num_backgrounds=0"):
    backgrounds.assign_backgrounds(np.zeros(3, int), 0,
                                   np.random.default_rng(0))


def _retrieval_bench():
  spec = importlib.util.spec_from_file_location(
      "background_retrieval", ROOT / "bench" / "background_retrieval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_per_example_mode_is_the_version_1_generator_byte_for_byte():
  # CRC-32s of build_split's images and background labels, computed with
  # the generator of commit de38927 (before modes existed) on this input.
  rng = np.random.default_rng(5)
  objects = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 300)
  pinned = {("train", 6): (1421496196, 3981981936),
            ("train", 8): (584502192, 1275537925),
            ("test", 6): (3484303274, 1268848115),
            ("test", 8): (197747835, 515547971)}
  for (split, b), (crc_images, crc_labels) in pinned.items():
    images, background = backgrounds.build_split(objects, labels, split, b,
                                                 mode="per_example")
    assert zlib.crc32(images.tobytes()) == crc_images, (split, b)
    assert zlib.crc32(background.astype(np.int32).tobytes()) == crc_labels
    # The shared mode draws the same background labels.
    _, shared_labels = backgrounds.build_split(objects, labels, split, b)
    np.testing.assert_array_equal(shared_labels, background)


def test_shared_mode_gives_every_example_of_a_kind_the_same_background():
  objects = np.zeros((200, 28, 28), np.uint8)  # fully transparent objects
  labels = np.arange(200) % 10
  shared = backgrounds.shared_backgrounds(8)
  assert shared.shape == (8, 32, 32, 3) and shared.dtype == np.uint8
  for split in ("train", "test"):
    images, background = backgrounds.build_split(objects, labels, split, 8)
    assert set(background.tolist()) == set(range(8))
    # Transparent objects: each image is exactly its kind's one background,
    # the same in both splits.
    np.testing.assert_array_equal(images, shared[background])
  # Kind k is the per-example renderer's pattern at phase (0, 0).
  zero = np.zeros((1, 2), np.int64)
  for k in (0, 2, 3, 5, 7):
    np.testing.assert_array_equal(
        shared[k], backgrounds.render_backgrounds(
            k, zero, np.random.default_rng(0))[0])
  # The noise is one fixed draw: blocks of 2x2 equal pixels, values in
  # [0, 0.8 * 255], not a flat colour.
  noise = shared[4].astype(int)
  np.testing.assert_array_equal(noise[::2, ::2], noise[1::2, 1::2])
  assert noise.max() <= round(0.8 * 255) and noise.std() > 30
  # Objects still composite over it as in the per-example mode.
  obj = np.full((1, 28, 28), 255, np.uint8)
  out, _ = backgrounds.build_split(obj, np.zeros(1, int), "test", 1)
  assert (out[0, 2:30, 2:30] == 255).all()
  np.testing.assert_array_equal(out[0, :2], shared[0, :2])


def test_background_alone_no_longer_identifies_the_instance():
  # The instance shortcut of the per-example testbed (docs/testbed.md): two
  # augmented crops of a fresh colour-noise background are matched to each
  # other among 64 such backgrounds by aligning their pixels; with one
  # shared noise image the match is at chance (1/64).
  bench = _retrieval_bench()
  config = _config("")
  n, kind = 64, 4
  rates = {}
  for mode in ("per_example", "shared"):
    rng = np.random.default_rng([0, kind])
    images = bench.render_kind(kind, n, mode, rng)
    views, boxes, flips = bench.two_views(images, config.aug, rng,
                                          jax.random.key(kind))
    rates[mode] = bench.aligned_retrieval(views, boxes, flips)
  assert rates["per_example"] >= 0.6, rates
  assert rates["shared"] <= 4 / n, rates


def test_bad_background_mode_is_rejected_clearly():
  with pytest.raises(ValueError, match="background_mode='sky' is not one of "
                     "shared, per_example"):
    backgrounds.build_split(np.zeros((1, 28, 28), np.uint8), np.zeros(1),
                            "test", 6, mode="sky")
  config = _config("", **{"dataset.background_mode": "sky"})
  with pytest.raises(config_lib.ConfigError,
                     match="config.dataset.background_mode='sky'"):
    config_lib.validate(config, num_devices=1)
  assert _config("").dataset.background_mode == "shared"


def test_config_defaults_are_the_issue_23_testbed():
  config = _config("")
  assert config.dataset.background_mode == "shared"
  # SimCLR's CIFAR-10 colour jitter strength s = 0.5 (docs/testbed.md).
  aug = config.aug
  assert (aug.brightness, aug.contrast, aug.saturation, aug.hue) == (
      0.4, 0.4, 0.4, 0.1)
  assert (aug.color_jitter_prob, aug.grayscale_prob) == (0.8, 0.2)


# ----------------------------------------------------------------------------
# The cached source.
# ----------------------------------------------------------------------------


@needs_fashion_mnist
def test_full_train_split_background_independent_of_class(train_cache):
  config, source = train_cache
  assert len(source) == 60000
  counts = np.zeros((10, 6), int)
  np.add.at(counts, (source.labels, source.backgrounds), 1)
  # Fashion-MNIST has 6000 training images per class: 1000 per background,
  # so the class x background table is exactly flat (chi-square = 0).
  assert (counts == 1000).all()
  expected = np.outer(counts.sum(1), counts.sum(0)) / counts.sum()
  assert ((counts - expected) ** 2 / expected).sum() == 0.0
  # Same count through the per-example interface.
  some = [source[i] for i in range(0, 60000, 997)]
  assert {ex["background"] for ex in some} == set(range(6))


@needs_fashion_mnist
def test_source_items_match_the_fashion_mnist_objects(train_cache):
  config, source = train_cache
  plain = datasets.load_fashion_mnist_idx(DEBIAN, "train")
  for i in (0, 1, 12345, 59999):
    ex = source[i]
    assert set(ex) == {"image", "label", "background"}
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert isinstance(ex["label"], int) and isinstance(ex["background"], int)
    assert ex["label"] == int(plain.labels[i])
    assert 0 <= ex["background"] < 6
    obj = plain.images[i, :, :, 0]
    window = ex["image"][2:30, 2:30]
    # Opaque object pixels are white whatever the background.
    assert (window[obj == 255] == 255).all()
    # Where the object is fully transparent, the background shows: on the
    # gradients it matches the border pixel of the same row / column.
    if ex["background"] == 0:  # vertical gradient: constant along rows.
      rows, _ = np.nonzero(obj == 0)
      np.testing.assert_array_equal(window[obj == 0], ex["image"][rows + 2, 0])
  assert datasets.num_classes(config.dataset) == 10
  assert datasets.num_examples(config.dataset, "test") == 10000


@needs_fashion_mnist
def test_config_mean_std_match_the_data(train_cache):
  config, source = train_cache
  images = source.images
  values = np.arange(256) / 255.0
  for c in range(3):
    # Exact moments from the histogram of the 61M uint8 values.
    hist = np.bincount(images[..., c].ravel(), minlength=256)
    mean = (hist * values).sum() / hist.sum()
    std = np.sqrt((hist * (values - mean) ** 2).sum() / hist.sum())
    assert mean == pytest.approx(config.dataset.mean[c], abs=1e-4)
    assert std == pytest.approx(config.dataset.std[c], abs=1e-4)


@pytest.mark.slow
@needs_fashion_mnist
def test_two_builds_are_byte_identical(tmp_path):
  paths = []
  for name in ("a", "b"):
    config = _config(tmp_path / name)
    datasets.build_backgrounds_cache(config.dataset, "test")
    paths.append(datasets.backgrounds_cache_paths(config.dataset, "test"))
  (images_a, meta_a), (images_b, meta_b) = paths
  assert pathlib.Path(images_a).read_bytes() == pathlib.Path(
      images_b).read_bytes()
  with np.load(meta_a) as a, np.load(meta_b) as b:
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@needs_fashion_mnist
@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "bad_meta",
                                    "missing_images"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, damage, caplog):
  config = _config(tmp_path)
  source = datasets.get_source(config.dataset, "test")
  original = np.array(source.images)
  images_path, meta_path = datasets.backgrounds_cache_paths(config.dataset,
                                                            "test")
  if damage == "flip_bytes":  # same size, same header: only the CRC sees it.
    with open(images_path, "r+b") as f:
      f.seek(1 << 20)
      f.write(b"\xff" * 1000)
    # Same size and mtime possible within the clock resolution: forget the
    # verification this process remembers so the check runs again.
    datasets._VERIFIED_CACHES.clear()
  elif damage == "truncate":
    with open(images_path, "r+b") as f:
      f.truncate(5000)
  elif damage == "bad_meta":
    pathlib.Path(meta_path).write_bytes(b"not a zip file")
  else:
    os.remove(images_path)
  if damage != "missing_images":
    assert datasets._check_backgrounds_cache(images_path, meta_path, 6,
                                             "test", "shared") is not None
  caplog.set_level("WARNING")
  rebuilt = datasets.get_source(config.dataset, "test")
  np.testing.assert_array_equal(np.asarray(rebuilt.images), original)
  assert datasets._check_backgrounds_cache(images_path, meta_path, 6,
                                           "test", "shared") is None
  if damage != "missing_images":
    assert "rebuilding" in caplog.text


@needs_fashion_mnist
def test_cache_is_keyed_by_the_background_mode(tmp_path):
  shared = _config(tmp_path)
  old = _config(tmp_path, **{"dataset.background_mode": "per_example"})
  paths = {mode: datasets.backgrounds_cache_paths(c.dataset, "test")
           for mode, c in (("shared", shared), ("per_example", old))}
  # per_example keeps the version-1 file names, so existing caches serve it.
  assert os.path.basename(paths["per_example"][0]) == "v1-b6-test.images.npy"
  assert os.path.basename(paths["shared"][0]) == (
      "shared-v1-b6-test.images.npy")
  a = datasets.get_source(old.dataset, "test")
  b = datasets.get_source(shared.dataset, "test")
  np.testing.assert_array_equal(a.labels, b.labels)
  np.testing.assert_array_equal(a.backgrounds, b.backgrounds)
  shared_images = np.array(b.images)  # a copy: b.images maps the file.
  assert not np.array_equal(np.asarray(a.images), shared_images)
  # A per_example cache put where the shared one belongs is not served: its
  # metadata names its mode, and the source rebuilds the shared images.
  for src, dst in zip(paths["per_example"], paths["shared"]):
    os.remove(dst)
    pathlib.Path(dst).write_bytes(pathlib.Path(src).read_bytes())
  datasets._VERIFIED_CACHES.clear()
  assert "background mode" in datasets._check_backgrounds_cache(
      *paths["shared"], 6, "test", "shared")
  rebuilt = datasets.get_source(shared.dataset, "test")
  np.testing.assert_array_equal(np.asarray(rebuilt.images), shared_images)
  # A version-1 cache (metadata without a mode) is a per_example one.
  meta_path = paths["per_example"][1]
  with np.load(meta_path) as meta:
    fields = {k: meta[k] for k in meta if k != "background_mode"}
  np.savez(meta_path, **fields)
  datasets._VERIFIED_CACHES.clear()
  assert datasets._check_backgrounds_cache(*paths["per_example"], 6, "test",
                                           "per_example") is None
  # A config saved before the field existed reads the version-1 testbed.
  del old.dataset["background_mode"]
  assert datasets.backgrounds_cache_paths(old.dataset, "test") == (
      paths["per_example"])


@needs_fashion_mnist
def test_source_pickles_small_and_nuisance_names(tmp_path):
  config = _config(tmp_path, **{"dataset.num_backgrounds": 4})
  source = datasets.get_source(config.dataset, "test")
  data = pickle.dumps(source)
  assert len(data) < 200_000  # labels only; images stay memory-mapped
  copy = pickle.loads(data)
  for i in (0, 9999):
    np.testing.assert_array_equal(copy[i]["image"], source[i]["image"])
  assert datasets.nuisance_names(config.dataset) == (
      "sunset gradient", "ocean gradient", "red diagonal stripes",
      "green checks")
  assert set(source.backgrounds.tolist()) == {0, 1, 2, 3}
  # The evaluators' view: one nuisance label, keyed as in the examples.
  labels = datasets.nuisance_labels(config.dataset)
  assert list(labels) == ["background"] and "background" in source[0]
  assert labels["background"] == datasets.nuisance_names(config.dataset)
  plain = config_lib.base_config()
  for name in ("fashion_mnist", "cifar10", "imagenet100"):
    plain.dataset.name = name
    assert datasets.nuisance_names(plain.dataset) is None
    assert datasets.nuisance_labels(plain.dataset) == {}
  with pytest.raises(ValueError, match="splits"):
    datasets.get_source(config.dataset, "validation")


# ----------------------------------------------------------------------------
# Config, pipeline, picture.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", config_lib.METHODS)
def test_config_passes_the_argument_through(method):
  config = _config("", f"method={method}")
  config_lib.validate(config, num_devices=8)
  assert config.method == method
  assert config.dataset.name == "fashion_mnist_backgrounds"
  assert (config.dataset.image_size, len(config.dataset.mean)) == (32, 3)
  # The model and recipe are the Fashion-MNIST demo's.
  demo = config_lib.load_file(ROOT / "configs" / "fashion_mnist.py",
                              f"method={method}")
  assert config.model == demo.model and config.optim == demo.optim
  with pytest.raises(config_lib.ConfigError, match="Unknown config argument"):
    _config("", "methd=ncl")


@needs_fashion_mnist
def test_pretrain_batches_and_example_grid(tmp_path):
  config = _config(tmp_path, **{"dataset.max_train_examples": 64,
                                "optim.batch_size": 16})
  it = input_pipeline.create_pretrain_iterator(config, process_index=0,
                                               process_count=1)
  batch = next(it)
  it.close()
  assert batch["view1"].shape == batch["view2"].shape == (16, 32, 32, 3)
  assert batch["view1"].dtype == np.uint8
  grid, names, classes = show_backgrounds.example_grid(config.dataset, "test")
  assert grid.shape == (6, 10, 32, 32, 3) and len(names) == 6
  assert len(classes) == 10
  out = tmp_path / "grid.png"
  show_backgrounds.draw(grid, names, classes, str(out))
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
