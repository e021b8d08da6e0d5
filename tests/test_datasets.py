"""Tests of the random-access sources and the ImageNet-100 converter.

Data: the real Debian Fashion-MNIST IDX files, `tfds.testing.mock_data` for
the TFDS datasets (it works with `tfds.data_source` without TensorFlow as long
as the examples are decoded), and tiny JPEGs made here for ImageNet-100 (b).
"""
import gzip
import io
import logging
import os
import struct
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from bayesncl_jax import config_lib
from bayesncl_jax import datasets
from bayesncl_jax import input_pipeline
from bayesncl_jax import prepare_imagenet100

DEBIAN = datasets.FASHION_MNIST_DEBIAN_DIR
needs_fashion_mnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(DEBIAN, "train-images-idx3-ubyte.gz")),
    reason="apt-get install dataset-fashion-mnist")


def _config(name, data_dir="", **dataset_overrides):
  config = config_lib.base_config()
  config.dataset.name = name
  config.dataset.data_dir = str(data_dir)
  for key, value in dataset_overrides.items():
    config.dataset[key] = value
  return config


# ----------------------------------------------------------------------------
# Fashion-MNIST.
# ----------------------------------------------------------------------------


@needs_fashion_mnist
def test_fashion_mnist_from_debian_idx_files():
  config = _config("fashion_mnist", max_train_examples=300)
  train = datasets.get_source(config.dataset, "train")
  assert len(train) == 300
  example = train[7]
  assert example["image"].shape == (28, 28, 1)
  assert example["image"].dtype == np.uint8
  assert isinstance(example["label"], int)
  labels = {train[i]["label"] for i in range(300)}
  assert labels == set(range(10))  # 300 examples hold every class.
  # max_train_examples limits the training split only.
  assert datasets.num_examples(config.dataset, "test") == 10000
  assert datasets.num_classes(config.dataset) == 10
  # Raw check against the IDX format: first training label of Fashion-MNIST
  # is 9 (ankle boot).
  assert train[0]["label"] == 9
  with pytest.raises(ValueError, match="splits"):
    datasets.get_source(config.dataset, "validation")


def _write_gz(path, payload: bytes):
  with gzip.open(path, "wb") as f:
    f.write(payload)


@needs_fashion_mnist
@pytest.mark.parametrize("corruption", ["magic", "truncated", "not_gzip",
                                        "dims"])
def test_corrupt_idx_file_names_the_file(tmp_path, corruption):
  images = tmp_path / "train-images-idx3-ubyte.gz"
  labels = tmp_path / "train-labels-idx1-ubyte.gz"
  labels.write_bytes(
      open(os.path.join(DEBIAN, "train-labels-idx1-ubyte.gz"), "rb").read())
  if corruption == "magic":
    _write_gz(images, struct.pack(">IIII", 0x0803 + 1, 60000, 28, 28)
              + bytes(100))
  elif corruption == "truncated":
    _write_gz(images, struct.pack(">IIII", 0x0803, 60000, 28, 28)
              + bytes(100))
  elif corruption == "dims":
    _write_gz(images, struct.pack(">IIII", 0x0803, 2, 32, 32)
              + bytes(2 * 32 * 32))
  else:
    images.write_bytes(b"this is not gzip")
  config = _config("fashion_mnist", tmp_path)
  with pytest.raises(ValueError, match="Corrupt IDX file .*"
                     "train-images-idx3-ubyte.gz"):
    datasets.get_source(config.dataset, "train")


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
  config = _config("fashion_mnist", tmp_path)
  with pytest.raises(datasets.DatasetNotFoundError) as e:
    datasets.get_source(config.dataset, "train")
  message = str(e.value)
  assert "apt-get install dataset-fashion-mnist" in message
  assert "tfds build fashion_mnist" in message
  # Half of a split present: the missing file is named.
  (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
  with pytest.raises(datasets.DatasetNotFoundError,
                     match="t10k-labels-idx1-ubyte.gz"):
    datasets.get_source(config.dataset, "test")


def test_fashion_mnist_falls_back_to_tfds(tmp_path):
  config = _config("fashion_mnist", tmp_path)  # No IDX files there.
  with tfds.testing.mock_data(num_examples=6):
    source = datasets.get_source(config.dataset, "train")
    assert isinstance(source, datasets.TfdsImageSource)
    assert len(source) == 6
    assert source[0]["image"].shape == (28, 28, 1)
    assert 0 <= source[5]["label"] < 10


# ----------------------------------------------------------------------------
# CIFAR.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_from_tfds_mock(tmp_path, name, classes):
  config = _config(name, tmp_path, max_train_examples=5)
  with tfds.testing.mock_data(num_examples=12):
    train = datasets.get_source(config.dataset, "train")
    test = datasets.get_source(config.dataset, "test")
    assert len(train) == 5 and len(test) == 12
    example = test[11]
    assert example["image"].shape == (32, 32, 3)
    assert example["image"].dtype == np.uint8
    assert isinstance(example["label"], int) and 0 <= example["label"] < classes
    np.testing.assert_array_equal(train[3]["image"], test[3]["image"])
    with pytest.raises(IndexError):
      train[5]  # pylint: disable=pointless-statement
  assert datasets.num_classes(config.dataset) == classes


def test_cifar_missing_names_the_build_command(tmp_path):
  config = _config("cifar10", tmp_path)
  with pytest.raises(datasets.DatasetNotFoundError,
                     match="tfds build cifar10 .*array_record"):
    datasets.get_source(config.dataset, "train")


# ----------------------------------------------------------------------------
# ImageNet-100 (a): TFDS imagenet2012 filtered to the 100 classes.
# ----------------------------------------------------------------------------


def test_imagenet100_from_tfds_imagenet2012_mock(tmp_path, caplog,
                                                 monkeypatch):
  caplog.set_level(logging.INFO)
  classes = datasets.imagenet100_classes()
  assert len(classes) == 100
  config = _config("imagenet100", tmp_path)
  with tfds.testing.mock_data(num_examples=300):
    full = tfds.data_source("imagenet2012", split="train", download=False)
    names = full.dataset_info.features["label"].names
    # The mock draws labels uniformly from the 1000 classes: compute what the
    # filter must keep instead of assuming a count.
    expected = [(i, classes.index(names[full[i]["label"]]))
                for i in range(len(full))
                if names[full[i]["label"]] in classes]
    assert expected, "the mock should hit some of the 100 classes"
    source = datasets.get_source(config.dataset, "train")
    assert len(source) == len(expected)
    for k in (0, len(expected) - 1):
      example = source[k]
      assert example["label"] == expected[k][1]
      np.testing.assert_array_equal(example["image"],
                                    full[expected[k][0]]["image"])
      assert example["image"].dtype == np.uint8
      assert example["image"].shape[-1] == 3
    assert "indices cached in" in caplog.text
    cache_files = os.listdir(tmp_path / "bayesncl_cache")
    assert len(cache_files) == 1 and "train" in cache_files[0]

    # Second time: read from the cache, no scan.
    def no_scan(*args, **kwargs):
      raise AssertionError("labels rescanned despite the cache")
    monkeypatch.setattr(datasets, "_scan_labels", no_scan)
    again = datasets.get_source(config.dataset, "train")
    assert len(again) == len(expected)
    assert again[0]["label"] == expected[0][1]
    assert "loaded from the cache" in caplog.text


def test_label_scan_reads_raw_records_in_chunks(monkeypatch):
  # pylint: disable-next=g-import-not-at-top
  from tensorflow_datasets.proto import tf_example_pb2
  labels = [5, 0, 999, 3, 3, 17, 42]

  def serialized(label):
    example = tf_example_pb2.Example()
    example.features.feature["label"].int64_list.value.append(label)
    example.features.feature["image"].bytes_list.value.append(b"\xff\xd8jpeg")
    return example.SerializeToString()

  calls = []

  class RawRecords:

    def __len__(self):
      return len(labels)

    def __getitems__(self, keys):
      calls.append(list(keys))
      return [serialized(labels[k]) for k in keys]

  def fake_data_source(name, **kwargs):
    assert name == "imagenet2012"
    assert kwargs["deserialize_method"] == (
        tfds.decode.DeserializeMethod.RAW_BYTES)
    assert kwargs["download"] is False
    return RawRecords()

  monkeypatch.setattr(tfds, "data_source", fake_data_source)
  scanned = datasets._scan_labels(RawRecords(), "imagenet2012", "train", "",
                                  chunk=3)
  np.testing.assert_array_equal(scanned, labels)
  assert calls == [[0, 1, 2], [3, 4, 5], [6]]
  assert datasets.parse_example_label(serialized(123)) == 123


def test_imagenet100_missing_gives_both_commands(tmp_path):
  config = _config("imagenet100", tmp_path)
  with pytest.raises(datasets.DatasetNotFoundError) as e:
    datasets.get_source(config.dataset, "train")
  assert "python -m bayesncl_jax.prepare_imagenet100" in str(e.value)
  assert "tfds build imagenet2012" in str(e.value)


# ----------------------------------------------------------------------------
# ImageNet-100 (b): folder converted to ArrayRecord.
# ----------------------------------------------------------------------------

# Class 0 images are red, class 1 blue: the label can be read off a pixel.
_COLOURS = ((220, 20, 20), (20, 20, 220))
_WNIDS = ("n01558993", "n01692333")


def _make_folder(root, train_per_class=6, val_per_class=2):
  """A tiny ImageNet-style folder with 2 classes and assorted file types."""
  for split, per_class in (("train", train_per_class), ("val", val_per_class)):
    for label, wnid in enumerate(_WNIDS):
      os.makedirs(root / split / wnid)
      for k in range(per_class):
        size = (40, 24) if k % 2 else (20, 30)  # (width, height)
        image = Image.new("RGB", size, _COLOURS[label])
        path = root / split / wnid / f"{wnid}_{k}.JPEG"
        if k == 1:
          image.convert("L").save(path, format="JPEG")  # grey JPEG
        elif k == 2:
          image.save(path, format="PNG")  # PNG named .JPEG, as in ImageNet
        else:
          image.save(path, format="JPEG", quality=95)
  classes_file = root / "classes.txt"
  classes_file.write_text(" ".join(_WNIDS) + "\n")
  return classes_file


def _colour_label(image):
  red, _, blue = image[image.shape[0] // 2, image.shape[1] // 2].astype(int)
  if abs(red - blue) < 10:  # The grey JPEGs: red is ~80 in grey, blue ~43.
    return 0 if red > 60 else 1
  return 0 if red > blue else 1


def test_prepare_imagenet100_and_read_back(tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  _make_folder(src)
  meta = prepare_imagenet100.convert(
      str(src), str(out), classes=list(_WNIDS), examples_per_shard=5)
  assert meta["splits"]["train"]["num_examples"] == 12
  assert meta["splits"]["val"]["num_examples"] == 4
  assert len(meta["splits"]["train"]["files"]) == 3  # 5 + 5 + 2 records.
  assert meta["splits"]["train"]["per_class"] == [6, 6]

  config = _config("imagenet100", out)
  assert datasets.num_classes(config.dataset) == 2
  train = datasets.get_source(config.dataset, "train")
  assert isinstance(train, datasets.ImageNet100ArrayRecordSource)
  assert len(train) == 12
  labels = []
  for i in range(len(train)):
    example = train[i]
    assert example["image"].dtype == np.uint8
    assert example["image"].ndim == 3 and example["image"].shape[-1] == 3
    assert isinstance(example["label"], int)
    assert _colour_label(example["image"]) == example["label"]
    labels.append(example["label"])
  assert sorted(labels) == [0] * 6 + [1] * 6
  # The stored order is shuffled, so a prefix (max_train_examples) is not
  # a single class.
  assert len(set(labels[:4])) == 2
  for split in ("val", "validation", "test"):
    assert len(datasets.get_source(config.dataset, split)) == 4

  # Without --resize_shorter, RGB JPEG files are stored byte for byte.
  original = (src / "train" / _WNIDS[0] / f"{_WNIDS[0]}_0.JPEG").read_bytes()
  stored = [datasets.decode_record(train._records[i])[1]
            for i in range(len(train))]
  assert original in stored


def test_prepare_imagenet100_resize_shorter(tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  _make_folder(src, train_per_class=2, val_per_class=1)
  prepare_imagenet100.convert(str(src), str(out), classes=list(_WNIDS),
                              resize_shorter=16)
  train = datasets.get_source(_config("imagenet100", out).dataset, "train")
  shapes = {train[i]["image"].shape for i in range(len(train))}
  # (w, h) = (20, 30) -> (16, 24); (40, 24) -> (27, 16). Arrays are (h, w, c).
  assert shapes == {(24, 16, 3), (16, 27, 3)}


@pytest.mark.slow
def test_prepare_imagenet100_reports_missing_classes(tmp_path):
  src = tmp_path / "src"
  classes_file = _make_folder(src, train_per_class=1, val_per_class=1)
  with pytest.raises(ValueError, match="missing 98: .*n02869837"):
    prepare_imagenet100.convert(str(src), str(tmp_path / "out"))
  with pytest.raises(ValueError, match="unexpected 1: n01692333"):
    prepare_imagenet100.convert(str(src), str(tmp_path / "out"),
                                classes=[_WNIDS[0]])
  assert not (tmp_path / "out").exists()  # Nothing written on failure.

  # The command line, end to end.
  out = tmp_path / "cli_out"
  command = [sys.executable, "-m", "bayesncl_jax.prepare_imagenet100",
             f"--src={src}", f"--out={out}", "--num_workers=1"]
  failed = subprocess.run(command, capture_output=True, text=True,
                          timeout=120, check=False)
  assert failed.returncode != 0
  assert "missing 98" in failed.stderr
  done = subprocess.run(command + [f"--classes_file={classes_file}"],
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert done.returncode == 0, done.stderr
  assert '{"train": 2, "val": 2}' in done.stdout
  assert (out / datasets.IMAGENET100_METADATA).exists()


def test_imagenet100_arrayrecord_through_the_pipelines(tmp_path):
  src, out = tmp_path / "src", tmp_path / "out"
  _make_folder(src)
  prepare_imagenet100.convert(str(src), str(out), classes=list(_WNIDS))
  config = _config("imagenet100", out, image_size=16)
  config.optim.batch_size = 4
  it = input_pipeline.create_pretrain_iterator(config, process_index=0,
                                               process_count=1)
  try:
    batch = next(it)
  finally:
    it.close()
  assert batch["view1"].shape == (4, 16, 16, 3)
  assert batch["view2"].dtype == np.uint8
  for view, label in zip(batch["view1"], batch["label"]):
    assert _colour_label(view) == label

  eval_it = input_pipeline.create_eval_iterator(
      config, "val", 3, process_index=0, process_count=1)
  batches = list(eval_it)
  eval_it.close()
  assert len(batches) == 2 == input_pipeline.num_eval_batches(
      config, "val", 3, process_count=1)
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 0, 0])
  assert batches[0]["image"].shape == (3, 16, 16, 3)


def test_record_format_roundtrip_and_validation():
  record = datasets.encode_record(42, b"\xff\xd8payload")
  assert datasets.decode_record(record) == (42, b"\xff\xd8payload")
  with pytest.raises(ValueError, match="magic"):
    datasets.decode_record(b"XXXX" + record[4:])
  buffer = io.BytesIO()
  Image.new("CMYK", (5, 4)).save(buffer, format="JPEG")
  assert datasets.decode_image(buffer.getvalue()).shape == (4, 5, 3)
