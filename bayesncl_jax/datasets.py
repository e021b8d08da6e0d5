"""Random-access image sources: `source[i] -> {"image": uint8, "label": int}`.

Every source returned by `get_source` implements Grain's
`RandomAccessDataSource` protocol (`__len__` + `__getitem__`), is picklable
(Grain worker processes receive a copy) and is deterministic: the same index
always gives the same example.

Where the data comes from, per `config.dataset.name`:

* `fashion_mnist`: the IDX `.gz` files (Debian package `dataset-fashion-mnist`
  installs them in `/usr/share/datasets/fashion-mnist`) or, if absent, the
  TFDS `fashion_mnist` build. Images 28x28x1.
* `fashion_mnist_backgrounds`: Fashion-MNIST objects composited onto B
  shared procedural backgrounds (`backgrounds.py`), generated once from the
  same files and cached (`dataset.cache_dir`, default `$BAYESNCL_CACHE_DIR`
  or `~/.cache/bayesncl_jax`). Images 32x32x3; examples also carry
  `"background"` (int), named by `nuisance_names`.
* `cifar10`, `cifar100`: TFDS builds in ArrayRecord format. Images 32x32x3.
* `imagenet100`: the 100 classes of `imagenet100_classes.txt`, either
  (a) filtered out of the TFDS `imagenet2012` build (the kept indices are
      cached on disk after the first scan of the labels), or
  (b) an ImageNet-100 folder converted once by `prepare_imagenet100`
      (ArrayRecord shards of JPEG bytes + label, and `imagenet100.json`).
  (b) is used when `<data_dir>/imagenet100.json` exists, (a) otherwise.

TFDS is imported lazily: the Fashion-MNIST IDX and the ImageNet-100 ArrayRecord
paths never import it, which keeps Grain worker start-up fast.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import io
import os
import struct
import zlib
from typing import Any, Sequence

from absl import logging
import grain
import numpy as np
from PIL import Image

from bayesncl_jax import atomic
from bayesncl_jax import backgrounds
from bayesncl_jax import paths

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}
# IDX magic numbers: 0x0000, then the element type (0x08 = uint8), then the
# number of dimensions.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801

_NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100,
                "imagenet100": 100, "fashion_mnist_backgrounds": 10}

# Format (b): written by `prepare_imagenet100`, read by
# `ImageNet100ArrayRecordSource`.
IMAGENET100_METADATA = "imagenet100.json"
IMAGENET100_FORMAT = "bayesncl_jax.imagenet100.v1"
# Each record: 4-byte magic, uint32 little-endian label, then the JPEG bytes.
_RECORD_MAGIC = b"BNC1"
_RECORD_HEADER = struct.Struct("<4sI")
# Only "train" and the 50-per-class validation set exist; ImageNet's test
# labels are not public, so "test" is an alias of the validation set.
_IMAGENET_EVAL_SPLITS = ("val", "validation", "test")

_PREPARE_CMD = ("python -m bayesncl_jax.prepare_imagenet100 "
                "--src=/path/to/imagenet100 --out=DATA_DIR "
                "[--resize_shorter=256]")
_TFDS_IMAGENET_CMD = ("pip install tensorflow-cpu  # build time only\n"
                      "    tfds build imagenet2012 --data_dir=DATA_DIR "
                      "--manual_dir=DIR_WITH_ILSVRC2012_img_{train,val}.tar "
                      "--file_format=array_record")


class DatasetNotFoundError(FileNotFoundError):
  """The requested dataset is not on disk; the message says how to get it."""


# ----------------------------------------------------------------------------
# Public helpers.
# ----------------------------------------------------------------------------


def get_source(dataset_config,
               split: str) -> grain.sources.RandomAccessDataSource:
  """Returns the random-access source of `split` of `dataset_config.name`.

  Args:
    dataset_config: `config.dataset` (reads `name`, `data_dir`, `train_split`,
      `max_train_examples`).
    split: split name ("train", "test", ...; ImageNet-100: "train" and
      "val"/"validation"/"test", all three meaning the validation set).

  Returns:
    A picklable source with `len()` and `source[i] -> {"image": uint8
    (H, W, C), "label": int}`. When `split == dataset_config.train_split` and
    `max_train_examples > 0`, only the first `max_train_examples` examples.

  Raises:
    DatasetNotFoundError: the data is not on disk; the message gives the
      command that gets it.
    ValueError: unknown dataset or split, or corrupt files.
  """
  name = dataset_config.name
  data_dir = dataset_config.data_dir or ""
  if name == "fashion_mnist":
    source = _fashion_mnist_source(split, data_dir)
  elif name == "fashion_mnist_backgrounds":
    source = _backgrounds_source(dataset_config, split)
  elif name in ("cifar10", "cifar100"):
    source = TfdsImageSource(_tfds_data_source(
        name, split, data_dir,
        how_to_get=(f"Build it once (needs tensorflow-cpu at build time only):"
                    f"\n    tfds build {name} --data_dir=DATA_DIR "
                    "--file_format=array_record\nthen pass "
                    "--config.dataset.data_dir=DATA_DIR.")))
  elif name == "imagenet100":
    source = _imagenet100_source(split, data_dir)
  else:
    raise ValueError(f"Unknown dataset {name!r}; supported: "
                     f"{', '.join(sorted(_NUM_CLASSES))}.")
  limit = dataset_config.max_train_examples
  if split == dataset_config.train_split and limit is not None and limit > 0:
    source = _prefix(source, limit)
  return source


def num_classes(dataset_config) -> int:
  """Number of classes of `dataset_config.name` (ImageNet-100 format (b): as
  converted, which is 100 unless a custom class file was used)."""
  name = dataset_config.name
  if name not in _NUM_CLASSES:
    raise ValueError(f"Unknown dataset {name!r}; supported: "
                     f"{', '.join(sorted(_NUM_CLASSES))}.")
  if name == "imagenet100" and dataset_config.data_dir:
    meta_path = paths.join(dataset_config.data_dir, IMAGENET100_METADATA)
    if paths.exists(meta_path):
      return len(_read_imagenet100_metadata(dataset_config.data_dir)["classes"])
  return _NUM_CLASSES[name]


def nuisance_names(dataset_config) -> tuple[str, ...] | None:
  """Names of the nuisance labels (`example["background"]`), or None.

  For `fashion_mnist_backgrounds`: the names of backgrounds 0..B-1; every
  example of its sources carries `"background"`: int in [0, B). None for
  datasets without a nuisance label.
  """
  if dataset_config.name == "fashion_mnist_backgrounds":
    return backgrounds.background_names(_num_backgrounds(dataset_config))
  return None


def nuisance_labels(dataset_config) -> dict[str, tuple[str, ...]]:
  """{label key in the examples: names of its values}; {} without one.

  The nuisance labels a dataset's examples carry besides "label" (today only
  `"background"` of fashion_mnist_backgrounds), for the `mechanism`
  evaluator and the explorer.
  """
  names = nuisance_names(dataset_config)
  return {} if names is None else {"background": names}


def num_examples(dataset_config, split: str) -> int:
  """Number of examples `get_source(dataset_config, split)` holds."""
  return len(get_source(dataset_config, split))


def imagenet100_classes(classes_file: str | None = None) -> list[str]:
  """The ImageNet-100 WordNet ids, in label order (label i = i-th wnid)."""
  if classes_file:
    text = paths.read_text(classes_file)
  else:
    text = (importlib.resources.files("bayesncl_jax")
            .joinpath("imagenet100_classes.txt").read_text())
  classes = text.split()
  if len(set(classes)) != len(classes):
    raise ValueError(f"Duplicate wnids in the class file {classes_file or ''}.")
  return classes


def encode_record(label: int, jpeg_bytes: bytes) -> bytes:
  """Serialises one ImageNet-100 ArrayRecord record (format (b))."""
  return _RECORD_HEADER.pack(_RECORD_MAGIC, int(label)) + jpeg_bytes


def decode_record(record: bytes) -> tuple[int, bytes]:
  """Inverse of `encode_record`: returns (label, JPEG bytes)."""
  magic, label = _RECORD_HEADER.unpack_from(record, 0)
  if magic != _RECORD_MAGIC:
    raise ValueError(f"Not a bayesncl_jax ImageNet-100 record (magic "
                     f"{magic!r}, expected {_RECORD_MAGIC!r}).")
  return label, bytes(record[_RECORD_HEADER.size:])


def decode_image(data: bytes) -> np.ndarray:
  """Decodes JPEG/PNG bytes to uint8 (H, W, 3) RGB (grey/CMYK converted)."""
  with Image.open(io.BytesIO(data)) as image:
    if image.mode != "RGB":  # convert() would copy even an RGB image.
      image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


# ----------------------------------------------------------------------------
# Generic sources.
# ----------------------------------------------------------------------------


class ArrayImageSource:
  """In-memory images (N, H, W, C) uint8 and labels (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"ArrayImageSource(n={len(self)}, shape={self.images.shape[1:]})"


class TfdsImageSource:
  """A TFDS data source with the `{"image", "label"}` contract enforced."""

  def __init__(self, tfds_source):
    self._source = tfds_source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    return {"image": np.asarray(example["image"], dtype=np.uint8),
            "label": int(example["label"])}

  def __repr__(self) -> str:
    return f"TfdsImageSource({self._source!r})"


class PrefixSource:
  """The first `n` examples of another source."""

  def __init__(self, source, n: int):
    self._source = source
    self._n = min(int(n), len(source))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -self._n <= index < self._n:
      raise IndexError(f"index {index} out of range for {self._n} examples.")
    return self._source[index % self._n]

  def __repr__(self) -> str:
    return f"PrefixSource({self._source!r}, n={self._n})"


def _prefix(source, n: int):
  if isinstance(source, ArrayImageSource):
    # Slicing the arrays keeps what is pickled to Grain workers small.
    return ArrayImageSource(source.images[:n], source.labels[:n])
  if isinstance(source, BackgroundsSource):
    return BackgroundsSource(source.images_path, source.labels[:n],
                             source.backgrounds[:n])
  return PrefixSource(source, n)


def _tfds_data_source(name: str, split: str, data_dir: str, how_to_get: str):
  """`tfds.data_source` without download, with a helpful error if absent."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    # download=False: tfds would otherwise try to fetch (and, without
    # TensorFlow, fail to build) the dataset from inside a training run.
    return tfds.data_source(name, split=split, data_dir=data_dir or None,
                            download=False)
  except (NotImplementedError, OSError, AssertionError, ValueError,
          KeyError) as e:
    # A missing TFDS build surfaces as assorted errors (no dataset_info.json
    # makes tfds assume TFRECORD, "not supported for random access", ...).
    where = data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
    built = paths.join(data_dir or os.path.expanduser("~/tensorflow_datasets"),
                       name)
    if not paths.exists(built):
      # No build at all: TFDS's own words (about formats, "already
      # prepared") would only mislead.
      raise DatasetNotFoundError(
          f"TFDS dataset {name!r} (split {split!r}) is not in {where} (no "
          f"{built}).\n{how_to_get}") from e
    raise DatasetNotFoundError(
        f"TFDS dataset {name!r} (split {split!r}) is not available in "
        f"ArrayRecord format in {where}.\n{how_to_get}\n"
        "(A build in TFRECORD format can be converted with `tfds "
        "convert_format --dataset_version_dir=... --out_file_format="
        f"array_record`.)\nTFDS said: {type(e).__name__}: {e}") from e


# ----------------------------------------------------------------------------
# Fashion-MNIST.
# ----------------------------------------------------------------------------


def _read_idx(path: str, magic: int, item_shape: tuple[int, ...],
              expected_count: int) -> np.ndarray:
  """Reads a gzipped IDX file of uint8, validating magic, dims and size."""
  try:
    data = gzip.decompress(paths.read_bytes(path))
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError.
    raise ValueError(f"Corrupt IDX file {path}: cannot decompress ({e}). "
                     "Reinstall it (apt-get install --reinstall "
                     "dataset-fashion-mnist).") from e
  ndim = 1 + len(item_shape)
  header_size = 4 + 4 * ndim
  if len(data) < header_size:
    raise ValueError(f"Corrupt IDX file {path}: {len(data)} bytes, shorter "
                     "than its header.")
  (file_magic,) = struct.unpack(">I", data[:4])
  if file_magic != magic:
    raise ValueError(f"Corrupt IDX file {path}: magic number "
                     f"0x{file_magic:08x}, expected 0x{magic:08x}.")
  dims = struct.unpack(f">{ndim}I", data[4:header_size])
  if tuple(dims[1:]) != item_shape or dims[0] != expected_count:
    raise ValueError(f"Corrupt IDX file {path}: dimensions {dims}, expected "
                     f"{(expected_count,) + item_shape}.")
  payload = len(data) - header_size
  if payload != int(np.prod(dims)):
    raise ValueError(f"Corrupt IDX file {path}: {payload} data bytes, "
                     f"expected {int(np.prod(dims))} for dimensions {dims}.")
  return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def load_fashion_mnist_idx(directory: str, split: str) -> ArrayImageSource:
  """Loads one Fashion-MNIST split from the IDX `.gz` files in `directory`."""
  images_name, labels_name = _FASHION_MNIST_FILES[split]
  count = _FASHION_MNIST_SIZES[split]
  images = _read_idx(paths.join(directory, images_name), _IDX_IMAGES_MAGIC,
                     (28, 28), count)
  labels_path = paths.join(directory, labels_name)
  labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, (), count)
  if labels.max() >= 10:
    raise ValueError(f"Corrupt IDX file {labels_path}: label {labels.max()} "
                     "outside 0..9.")
  return ArrayImageSource(images[..., None], labels.astype(np.int32))


def _fashion_mnist_source(split: str, data_dir: str):
  if split not in _FASHION_MNIST_FILES:
    raise ValueError(f"Fashion-MNIST has splits {sorted(_FASHION_MNIST_FILES)}"
                     f", not {split!r}.")
  # An explicit data_dir is searched alone: silently reading other data than
  # the one asked for would be worse than an error.
  idx_dir = data_dir or FASHION_MNIST_DEBIAN_DIR
  files = [paths.join(idx_dir, f) for f in _FASHION_MNIST_FILES[split]]
  present = [paths.exists(p) for p in files]
  if all(present):
    logging.info("Fashion-MNIST %s: IDX files in %s.", split, idx_dir)
    return load_fashion_mnist_idx(idx_dir, split)
  others = [paths.join(idx_dir, f) for s, files in
            _FASHION_MNIST_FILES.items() if s != split for f in files]
  if any(present) or any(paths.exists(p) for p in others):
    # A folder of IDX files that lacks this split's: not a TFDS dir.
    missing = [p for p, ok in zip(files, present) if not ok]
    raise DatasetNotFoundError(
        f"Fashion-MNIST {split} split: IDX file(s) missing: "
        f"{', '.join(missing)}. {idx_dir} holds other Fashion-MNIST files; "
        "put all four *-ubyte.gz files there (`apt-get install "
        f"dataset-fashion-mnist` installs them in {FASHION_MNIST_DEBIAN_DIR}"
        "), or point --config.dataset.data_dir at a folder that has them.")
  return TfdsImageSource(_tfds_data_source(
      "fashion_mnist", split, data_dir,
      how_to_get=(
          "Fashion-MNIST not found: no IDX files in "
          f"{idx_dir} and no TFDS build. Get it with either\n"
          "    apt-get install dataset-fashion-mnist   (IDX files in "
          f"{FASHION_MNIST_DEBIAN_DIR}; leave --config.dataset.data_dir "
          "empty, or point it at a folder holding the four "
          "*-ubyte.gz files)\nor\n    tfds build fashion_mnist "
          "--data_dir=DATA_DIR --file_format=array_record   (needs "
          "tensorflow-cpu at build time only), then "
          "--config.dataset.data_dir=DATA_DIR.")))


# ----------------------------------------------------------------------------
# Fashion-MNIST on shared backgrounds.
# ----------------------------------------------------------------------------

_BACKGROUNDS_CACHE_SUBDIR = "fashion_mnist_backgrounds"


def _num_backgrounds(dataset_config) -> int:
  return int(dataset_config.get("num_backgrounds",
                                backgrounds.DEFAULT_NUM_BACKGROUNDS))


def _background_mode(dataset_config) -> str:
  """`dataset.background_mode`; a config without it (saved before the field
  existed) meant the version-1 testbed, "per_example"."""
  return backgrounds.check_background_mode(
      str(dataset_config.get("background_mode", "per_example")))


def backgrounds_cache_paths(dataset_config, split: str) -> tuple[str, str]:
  """(images .npy, metadata .npz) cache files of one split.

  The folder is `dataset_config.cache_dir` if set, else `$BAYESNCL_CACHE_DIR`
  or `~/.cache/bayesncl_jax`, then `fashion_mnist_backgrounds/`; the names
  hold the background mode, its generator version and B
  (`backgrounds.cache_stem`), so other settings never read them.
  """
  root = dataset_config.get("cache_dir", "") or _default_cache_dir()
  stem = os.path.join(
      root, _BACKGROUNDS_CACHE_SUBDIR,
      backgrounds.cache_stem(_background_mode(dataset_config),
                             _num_backgrounds(dataset_config)) + f"-{split}")
  return stem + ".images.npy", stem + ".meta.npz"


def _crc32(array: np.ndarray) -> int:
  view = memoryview(np.ascontiguousarray(array)).cast("B")
  crc = 0
  for start in range(0, len(view), 1 << 26):  # 64 MiB at a time
    crc = zlib.crc32(view[start:start + (1 << 26)], crc)
  return crc


def _check_backgrounds_cache(images_path: str, meta_path: str,
                             num_backgrounds: int, split: str,
                             mode: str) -> str | None:
  """None if the cache files of a split are complete and intact, else why.

  A check that passed is remembered for the process (keyed by the files'
  size and modification time), since `num_examples` and every iterator
  open the source again.
  """
  if not (os.path.exists(images_path) and os.path.exists(meta_path)):
    return "missing"
  stats = tuple((st.st_size, st.st_mtime_ns) for st in
                (os.stat(images_path), os.stat(meta_path)))
  key = (images_path, meta_path, num_backgrounds, split, mode, stats)
  if key in _VERIFIED_CACHES:
    return None
  problem = _find_cache_problem(images_path, meta_path, num_backgrounds, split,
                                mode)
  if problem is None:
    _VERIFIED_CACHES.add(key)
  return problem


_VERIFIED_CACHES = set()


def _find_cache_problem(images_path: str, meta_path: str,
                        num_backgrounds: int, split: str,
                        mode: str) -> str | None:
  try:
    with np.load(meta_path) as meta:
      fields = {k: meta[k] for k in ("labels", "backgrounds", "crc32",
                                     "version", "num_backgrounds")}
      # Caches written before modes existed are per_example ones.
      fields["mode"] = (str(meta["background_mode"])
                        if "background_mode" in meta else "per_example")
    images = np.load(images_path, mmap_mode="r")
  except (OSError, ValueError, KeyError, EOFError) as e:
    # np.load checks the .npz members' CRC-32 (zipfile) and the .npy header.
    return f"unreadable ({type(e).__name__}: {e})"
  n = _FASHION_MNIST_SIZES[split]
  expected = (n, backgrounds.IMAGE_SIZE, backgrounds.IMAGE_SIZE, 3)
  if (fields["mode"] != mode
      or int(fields["version"]) != backgrounds.GENERATOR_VERSIONS[mode]
      or int(fields["num_backgrounds"]) != num_backgrounds):
    return "written by another background mode, generator version or B"
  if images.shape != expected or images.dtype != np.uint8:
    return f"images {images.shape} {images.dtype}, expected {expected} uint8"
  if fields["labels"].shape != (n,) or fields["backgrounds"].shape != (n,):
    return "labels or backgrounds of the wrong length"
  if _crc32(images) != int(fields["crc32"]):
    return "images checksum mismatch"
  return None


def _write_atomically(path: str, write) -> None:
  """Writes through `write(file)` to a temporary name, then renames
  (`atomic.writing`: fsync'ed, the temporary file removed on failure)."""
  with atomic.writing(path) as f:
    write(f)


def build_backgrounds_cache(dataset_config, split: str) -> tuple[str, str]:
  """Generates one split from the Fashion-MNIST files and writes the cache.

  Returns the (images, metadata) paths. Files are written under temporary
  names and renamed, so readers never see half-written data; concurrent
  builders write identical bytes.
  """
  b = _num_backgrounds(dataset_config)
  mode = _background_mode(dataset_config)
  objects = _fashion_mnist_source(split, dataset_config.data_dir or "")
  if isinstance(objects, ArrayImageSource):
    images, labels = objects.images, objects.labels
  else:  # TFDS fall-back: materialise once.
    images = np.stack([objects[i]["image"] for i in range(len(objects))])
    labels = np.asarray([objects[i]["label"] for i in range(len(objects))])
  composited, background = backgrounds.build_split(images, labels, split, b,
                                                   mode=mode)
  images_path, meta_path = backgrounds_cache_paths(dataset_config, split)
  try:
    os.makedirs(os.path.dirname(images_path), exist_ok=True)
    _write_atomically(images_path, lambda f: np.save(f, composited))
    _write_atomically(meta_path, lambda f: np.savez(
        f, labels=labels.astype(np.int32), backgrounds=background,
        crc32=np.uint32(_crc32(composited)),
        version=np.int32(backgrounds.GENERATOR_VERSIONS[mode]),
        background_mode=np.asarray(mode),
        num_backgrounds=np.int32(b),
        background_names=np.asarray(backgrounds.background_names(b))))
  except OSError as e:
    raise OSError(
        f"Cannot write the fashion_mnist_backgrounds cache {images_path}: {e}."
        " Point --config.dataset.cache_dir (or $BAYESNCL_CACHE_DIR) at a "
        "writable folder.") from e
  logging.info("fashion_mnist_backgrounds %s: %d examples on %d %s "
               "backgrounds written to %s.", split, len(labels), b, mode,
               images_path)
  return images_path, meta_path


class BackgroundsSource:
  """Cached `fashion_mnist_backgrounds` split: image, label, background.

  The images are memory-mapped (read-only) and opened lazily, so pickling
  the source to Grain workers copies only the small label arrays.
  """

  def __init__(self, images_path: str, labels: np.ndarray,
               background: np.ndarray):
    self.images_path = images_path
    self.labels = labels
    self.backgrounds = background
    self._images = None

  @property
  def images(self) -> np.ndarray:
    if self._images is None:
      self._images = np.load(self.images_path, mmap_mode="r")
    return self._images

  def __getstate__(self):
    return {**self.__dict__, "_images": None}

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": np.asarray(self.images[index]),
            "label": int(self.labels[index]),
            "background": int(self.backgrounds[index])}

  def __repr__(self) -> str:
    return f"BackgroundsSource(n={len(self)}, {self.images_path})"


def _backgrounds_source(dataset_config, split: str) -> BackgroundsSource:
  if split not in _FASHION_MNIST_FILES:
    raise ValueError(f"fashion_mnist_backgrounds has splits "
                     f"{sorted(_FASHION_MNIST_FILES)}, not {split!r}.")
  b = _num_backgrounds(dataset_config)
  backgrounds.background_names(b)  # validates B with a clear message.
  mode = _background_mode(dataset_config)  # validates the mode likewise.
  images_path, meta_path = backgrounds_cache_paths(dataset_config, split)
  problem = _check_backgrounds_cache(images_path, meta_path, b, split, mode)
  if problem is not None:
    if problem != "missing":
      logging.warning("fashion_mnist_backgrounds cache %s is %s; rebuilding "
                      "it.", images_path, problem)
    build_backgrounds_cache(dataset_config, split)
    problem = _check_backgrounds_cache(images_path, meta_path, b, split,
                                       mode)
    if problem is not None:
      raise ValueError(f"The freshly built cache {images_path} is {problem}; "
                       "check the disk holding it.")
  with np.load(meta_path) as meta:
    return BackgroundsSource(images_path, meta["labels"], meta["backgrounds"])


# ----------------------------------------------------------------------------
# ImageNet-100.
# ----------------------------------------------------------------------------


def _imagenet100_missing_message(data_dir: str) -> str:
  return (
      f"ImageNet-100 not found in {data_dir or 'the default TFDS data dir'}."
      " Either\n(b) convert an ImageNet-100 folder (train/<wnid>/*.JPEG, "
      "val/<wnid>/*.JPEG) once:\n    " + _PREPARE_CMD + "\nor\n(a) build "
      "the full ImageNet-1k with TFDS from the manual download (the 100 "
      "classes are filtered at load time):\n    " + _TFDS_IMAGENET_CMD +
      "\nthen pass --config.dataset.data_dir=DATA_DIR.")


def _imagenet100_source(split: str, data_dir: str):
  if split != "train" and split not in _IMAGENET_EVAL_SPLITS:
    raise ValueError(f"ImageNet-100 has splits 'train' and 'val' (aliases "
                     f"'validation', 'test'), not {split!r}.")
  if data_dir and paths.exists(paths.join(data_dir, IMAGENET100_METADATA)):
    return ImageNet100ArrayRecordSource(data_dir, split)
  if data_dir and not paths.isdir(data_dir):
    raise DatasetNotFoundError(_imagenet100_missing_message(data_dir))
  return ImageNet100TfdsSource(data_dir, split)


def _read_imagenet100_metadata(data_dir: str) -> dict[str, Any]:
  path = paths.join(data_dir, IMAGENET100_METADATA)
  meta = paths.read_json(path)
  if meta.get("format") != IMAGENET100_FORMAT:
    raise ValueError(f"{path} has format {meta.get('format')!r}, expected "
                     f"{IMAGENET100_FORMAT!r}; re-run prepare_imagenet100.")
  return meta


class ImageNet100ArrayRecordSource:
  """Format (b): ArrayRecord shards written by `prepare_imagenet100`."""

  def __init__(self, data_dir: str, split: str):
    meta = _read_imagenet100_metadata(data_dir)
    key = "train" if split == "train" else "val"
    info = meta["splits"][key]
    self.classes = list(meta["classes"])
    if self.classes != imagenet100_classes():
      logging.warning("%s was converted with a custom class list of %d "
                      "classes, not the ImageNet-100 list.",
                      paths.join(data_dir, IMAGENET100_METADATA),
                      len(self.classes))
    # ArrayRecord reads gs:// shards itself (its own GCS client).
    files = [paths.join(data_dir, name) for name in info["files"]]
    missing = [p for p in files if not paths.exists(p)]
    if missing:
      raise DatasetNotFoundError(
          f"ImageNet-100 shards listed in {IMAGENET100_METADATA} are missing: "
          f"{', '.join(missing[:5])}. Re-run: {_PREPARE_CMD}")
    self._records = grain.sources.ArrayRecordDataSource(files)
    if len(self._records) != info["num_examples"]:
      raise ValueError(f"ImageNet-100 {key}: {len(self._records)} records in "
                       f"the shards but {info['num_examples']} in the "
                       "metadata; the conversion was interrupted, re-run it.")
    logging.info("ImageNet-100 %s: %d examples from ArrayRecord in %s.", key,
                 len(self._records), data_dir)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    label, data = decode_record(self._records[index])
    return {"image": decode_image(data), "label": label}

  def __repr__(self) -> str:
    return f"ImageNet100ArrayRecordSource({self._records!r})"


def _default_cache_dir() -> str:
  return paths.user_cache_dir()


def _scan_labels(tfds_source, name: str, split: str, data_dir: str,
                 chunk: int = 1024) -> np.ndarray:
  """All labels of a TFDS split, without decoding the images if possible."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from tensorflow_datasets.proto import tf_example_pb2
  n = len(tfds_source)
  labels = np.empty((n,), np.int64)
  # Raw records + a protobuf parse of the label only: decoding 1.28M JPEGs
  # just to read their labels would take hours.
  raw = tfds.data_source(
      name, split=split, data_dir=data_dir or None, download=False,
      deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  for start in range(0, n, chunk):
    keys = list(range(start, min(n, start + chunk)))
    try:
      # Batched reads: ArrayRecord fetches them in parallel.
      records = raw.__getitems__(keys)
    except (ImportError, TypeError):
      if start:
        raise
      # Only `tfds.testing.mock_data` gets here: without TensorFlow its fake
      # records cannot be serialised, and its `__getitems__` is unbound.
      # Real ArrayRecord builds never need TensorFlow for raw reads.
      logging.warning("Raw TFDS records unavailable (mocked TFDS?); scanning "
                      "the %s labels by decoding every example (slow).", name)
      for i in range(n):
        labels[i] = int(tfds_source[i]["label"])
      return labels
    for i, record in zip(keys, records):
      labels[i] = parse_example_label(record, tf_example_pb2)
  return labels


def parse_example_label(record: bytes, example_pb2=None) -> int:
  """The int64 `label` feature of a serialised `tf.train.Example`."""
  if example_pb2 is None:
    # pylint: disable-next=g-import-not-at-top
    from tensorflow_datasets.proto import tf_example_pb2 as example_pb2
  example = example_pb2.Example.FromString(record)
  values = example.features.feature["label"].int64_list.value
  if len(values) != 1:
    raise ValueError(f"Expected one int64 'label' in the record, got "
                     f"{list(values)}.")
  return int(values[0])


class ImageNet100TfdsSource:
  """Format (a): TFDS `imagenet2012` filtered to the ImageNet-100 classes.

  Labels are remapped to 0..99 in the order of `imagenet100_classes.txt`. The
  kept indices (and new labels) are computed once by scanning all labels of
  the split and cached in `<data_dir>/bayesncl_cache/` (or
  `$BAYESNCL_CACHE_DIR`, default `~/.cache/bayesncl_jax`, when data_dir is
  unset or read-only).
  """

  def __init__(self, data_dir: str, split: str,
               classes: Sequence[str] | None = None):
    tfds_split = "train" if split == "train" else "validation"
    try:
      self._source = _tfds_data_source("imagenet2012", tfds_split, data_dir,
                                       how_to_get="")
    except DatasetNotFoundError as e:
      raise DatasetNotFoundError(
          _imagenet100_missing_message(data_dir) + f"\n({e})") from e
    self.classes = list(classes or imagenet100_classes())
    info = self._source.dataset_info
    names = list(info.features["label"].names)
    missing = sorted(set(self.classes) - set(names))
    if missing:
      raise ValueError(f"imagenet2012 labels lack the wnids {missing[:10]}.")
    self._indices, self._labels = self._kept_indices(
        info, tfds_split, data_dir, names)

  def _kept_indices(self, info, tfds_split, data_dir, names):
    n = len(self._source)
    digest = hashlib.sha1(" ".join(self.classes).encode()).hexdigest()[:12]
    filename = (f"imagenet100_from_imagenet2012-{info.version}-{tfds_split}-"
                f"n{n}-{digest}.npz")
    cache_dirs = ([paths.join(data_dir, "bayesncl_cache")] if data_dir
                  else []) + [_default_cache_dir()]
    for cache_dir in cache_dirs:
      path = paths.join(cache_dir, filename)
      if paths.exists(path):
        with np.load(io.BytesIO(paths.read_bytes(path))) as cached:
          logging.info("ImageNet-100 %s: %d kept indices loaded from the "
                       "cache %s.", tfds_split, len(cached["indices"]), path)
          return cached["indices"], cached["labels"]

    logging.info("ImageNet-100 %s: scanning the %d labels of imagenet2012 "
                 "once to find the 100 classes...", tfds_split, n)
    all_labels = _scan_labels(self._source, "imagenet2012", tfds_split,
                              data_dir)
    # -1 marks the 900 ImageNet-1k classes that are not kept.
    remap = np.full((len(names),), -1, np.int32)
    for new_label, wnid in enumerate(self.classes):
      remap[names.index(wnid)] = new_label
    new_labels = remap[all_labels]
    indices = np.flatnonzero(new_labels >= 0).astype(np.int64)
    labels = new_labels[indices].astype(np.int32)

    for cache_dir in cache_dirs:
      path = paths.join(cache_dir, filename)
      try:
        paths.ensure_dir(cache_dir)
        # Written at once (local: a renamed temporary file; gs://: one
        # upload): concurrent hosts never read a half-written file.
        paths.save_npz(path, indices=indices, labels=labels)
      except (OSError, paths.PathError) as e:
        logging.warning("Cannot write the ImageNet-100 index cache in %s: %s",
                        cache_dir, e)
        continue
      logging.info("ImageNet-100 %s: kept %d of %d examples; indices cached "
                   "in %s (delete it to rescan).", tfds_split, len(indices), n,
                   path)
      break
    return indices, labels

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[int(self._indices[index])]
    image = np.asarray(example["image"], dtype=np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    # The label comes from the scan, so it is consistent with the selection.
    return {"image": image, "label": int(self._labels[index])}

  def __repr__(self) -> str:
    return f"ImageNet100TfdsSource(n={len(self)}, {self._source!r})"
