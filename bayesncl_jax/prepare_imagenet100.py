r"""Converts an ImageNet-100 folder into ArrayRecord shards, once.

Input: `SRC/train/<wnid>/*.JPEG` and `SRC/val/<wnid>/*.JPEG` with exactly the
100 wnids of `imagenet100_classes.txt`. Output, in OUT::

  train.array_record-00000-of-000NN ...  records: b"BNC1" + uint32 LE label
  val.array_record-00000-of-00001          + JPEG bytes (datasets.encode_record)
  imagenet100.json                       classes, counts, shard names

`imagenet100.json` is written last, so its presence means a finished
conversion; training then reads OUT with `--config.dataset.data_dir=OUT`.

OUT may be a bucket (`--out=gs://BUCKET/imagenet100`): ArrayRecord cannot
write to gs://, so each shard is written to a local staging folder
(`--staging_dir`, default a temporary folder), uploaded as soon as it is
complete and deleted locally; at most one shard (~1 GB) is on the local
disk at a time. Every TPU worker then reads the shards from the bucket.
SRC is a local folder.

Usage::

  python -m bayesncl_jax.prepare_imagenet100 --src=/data/imagenet100 \
      --out=/data/imagenet100_ar --resize_shorter=256

`--resize_shorter=N` (optional) shrinks images whose shorter side exceeds N
and re-encodes them. At N=256, on 500x375 JPEGs, the host pipeline's JPEG
decode gets 2.1x and its two random resized crops 1.8x cheaper (7.3 -> 4.1
CPU-ms per image; bench/RESULTS.md), at the price of a lower source
resolution for small crops. Without it the original JPEG bytes are stored
untouched. Files are stored in a fixed shuffled
order (`--seed`) so that `max_train_examples` smoke runs see all classes.
"""
from __future__ import annotations

import concurrent.futures
import io
import json
import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
from array_record.python.array_record_module import ArrayRecordWriter
import numpy as np
from PIL import Image

from bayesncl_jax import cli
from bayesncl_jax import datasets
from bayesncl_jax import paths

_IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val")


def list_split(src: str, split: str, classes: list[str]
               ) -> list[tuple[str, int]]:
  """(path, label) for every image of `src/split`, checking the class set."""
  split_dir = os.path.join(src, split)
  if not os.path.isdir(split_dir):
    raise ValueError(f"{split_dir} does not exist: expected {src}/train/<wnid>"
                     f"/*.JPEG and {src}/val/<wnid>/*.JPEG.")
  found = {d for d in os.listdir(split_dir)
           if os.path.isdir(os.path.join(split_dir, d))}
  missing = [c for c in classes if c not in found]
  extra = sorted(found - set(classes))
  if missing or extra:
    raise ValueError(
        f"{split_dir} must hold exactly the {len(classes)} class folders of "
        f"the class list; missing {len(missing)}: {' '.join(missing)}; "
        f"unexpected {len(extra)}: {' '.join(extra)}.")
  items = []
  for label, wnid in enumerate(classes):
    class_dir = os.path.join(split_dir, wnid)
    files = sorted(f for f in os.listdir(class_dir)
                   if f.lower().endswith(_IMAGE_EXTENSIONS))
    if not files:
      raise ValueError(f"{class_dir} holds no images ({_IMAGE_EXTENSIONS}).")
    items.extend((os.path.join(class_dir, f), label) for f in files)
  return items


def encode_image(path: str, resize_shorter: int, jpeg_quality: int) -> bytes:
  """The JPEG bytes to store for `path` (original bytes when possible)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      needs_resize = (resize_shorter > 0 and
                      min(image.size) > resize_shorter)
      # A few ImageNet "JPEG"s are PNG or CMYK: re-encode them, so the reader
      # only ever sees RGB/grey JPEG.
      if (not needs_resize and image.format == "JPEG"
          and image.mode in ("RGB", "L")):
        return data
      image = image.convert("RGB")
      if needs_resize:
        width, height = image.size
        factor = resize_shorter / min(width, height)
        size = (max(resize_shorter, round(width * factor)),
                max(resize_shorter, round(height * factor)))
        image = image.resize(size, Image.BICUBIC)
      out = io.BytesIO()
      image.save(out, format="JPEG", quality=jpeg_quality)
      return out.getvalue()
  except OSError as e:
    raise ValueError(f"Cannot decode image {path}: {e}") from e


def _encode_item(args: tuple[str, int, int, int]) -> bytes:
  path, label, resize_shorter, jpeg_quality = args
  return datasets.encode_record(
      label, encode_image(path, resize_shorter, jpeg_quality))


def _publish(stage: str, out: str, name: str) -> None:
  """Moves the finished shard `name` from the staging folder to gs:// OUT."""
  if stage == out:
    return
  paths.upload_dir(stage, out, [name])
  os.remove(os.path.join(stage, name))


def write_split(items: list[tuple[str, int]], out: str, split: str, *,
                resize_shorter: int, jpeg_quality: int,
                examples_per_shard: int, num_workers: int,
                stage: str | None = None) -> list[str]:
  """Writes `items` as ArrayRecord shards; returns the shard file names.

  Shards are written in `stage` (default: `out`, which must then be local)
  and moved to `out` one by one.
  """
  stage = stage or out
  num_shards = max(1, -(-len(items) // examples_per_shard))
  names = [f"{split}.array_record-{k:05d}-of-{num_shards:05d}"
           for k in range(num_shards)]
  jobs = [(path, label, resize_shorter, jpeg_quality)
          for path, label in items]
  executor = (concurrent.futures.ProcessPoolExecutor(num_workers)
              if num_workers > 1 else None)
  try:
    records = (executor.map(_encode_item, jobs, chunksize=64) if executor
               else map(_encode_item, jobs))
    start = time.time()
    writer = None
    for i, record in enumerate(records):
      if i % examples_per_shard == 0:
        if writer is not None:
          writer.close()
          _publish(stage, out, names[i // examples_per_shard - 1])
        # group_size:1 = one record per chunk: fastest random access.
        writer = ArrayRecordWriter(
            os.path.join(stage, names[i // examples_per_shard]),
            "group_size:1")
      writer.write(record)
      if (i + 1) % 10000 == 0:
        logging.info("%s: %d / %d images (%.0f/s)", split, i + 1, len(items),
                     (i + 1) / (time.time() - start))
    if writer is not None:
      writer.close()
      _publish(stage, out, names[-1])
  finally:
    if executor is not None:
      executor.shutdown()
  return names


def convert(src: str, out: str, *, classes: list[str] | None = None,
            resize_shorter: int = 0, jpeg_quality: int = 95,
            examples_per_shard: int = 10000, num_workers: int = 1,
            seed: int = 0, staging_dir: str | None = None) -> dict:
  """Converts `src` into ArrayRecord shards + metadata in `out` (local or
  gs://; see the module docstring for `staging_dir`).

  Returns:
    The metadata dict written to `out/imagenet100.json`.
  """
  if paths.is_remote(src):
    raise ValueError(f"--src={src}: the source folder must be local (ArrayRecord"
                     " conversion reads ~130k files). Copy it first, e.g. "
                     f"gcloud storage cp -r {src} /data/, or mount it.")
  classes = list(classes or datasets.imagenet100_classes())
  # Validate both splits before writing anything.
  split_items = {split: list_split(src, split, classes) for split in SPLITS}
  out = paths.ensure_dir(out)
  meta_path = paths.join(out, datasets.IMAGENET100_METADATA)
  if paths.exists(meta_path):
    # A stale metadata file would make a half-rewritten folder look complete.
    paths.as_path(meta_path).unlink()
  if paths.is_remote(out):
    if staging_dir:
      os.makedirs(staging_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging_dir or None,
                                     prefix="imagenet100_") as stage:
      return _convert_splits(src, out, stage, classes, split_items,
                             meta_path, resize_shorter=resize_shorter,
                             jpeg_quality=jpeg_quality,
                             examples_per_shard=examples_per_shard,
                             num_workers=num_workers, seed=seed)
  return _convert_splits(src, out, out, classes, split_items, meta_path,
                         resize_shorter=resize_shorter,
                         jpeg_quality=jpeg_quality,
                         examples_per_shard=examples_per_shard,
                         num_workers=num_workers, seed=seed)


def _convert_splits(src, out, stage, classes, split_items, meta_path, *,
                    resize_shorter, jpeg_quality, examples_per_shard,
                    num_workers, seed) -> dict:
  meta = {"format": datasets.IMAGENET100_FORMAT, "classes": classes,
          "resize_shorter": int(resize_shorter), "source": os.path.abspath(src),
          "record": "b'BNC1' + uint32 little-endian label + JPEG bytes",
          "splits": {}}
  for split, items in split_items.items():
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(
        len(items))
    items = [items[i] for i in order]
    logging.info("%s: %d images of %d classes.", split, len(items),
                 len(classes))
    files = write_split(items, out, split, resize_shorter=resize_shorter,
                        jpeg_quality=jpeg_quality,
                        examples_per_shard=examples_per_shard,
                        num_workers=num_workers, stage=stage)
    counts = np.bincount([label for _, label in items],
                         minlength=len(classes))
    meta["splits"][split] = {"num_examples": len(items), "files": files,
                             "per_class": counts.tolist()}
  paths.write_json(meta_path, meta, indent=1)
  logging.info("Wrote %s. Train with --config.dataset.data_dir=%s", meta_path,
               out)
  return meta


def _define_flags() -> None:
  """Defines the flags; only when run as a script, so that importing this
  module (tests do) adds nothing to the process-wide FLAGS."""
  flags.DEFINE_string("src", None, "ImageNet-100 folder with train/ and val/ "
                      "sub-folders of <wnid>/ image folders.")
  flags.DEFINE_string("out", None, "Output folder, local or gs://BUCKET/DIR "
                      "(becomes config.dataset.data_dir).")
  flags.DEFINE_string("staging_dir", "", "With a gs:// --out: local folder "
                      "for the shard being written (default: a temporary "
                      "folder); needs ~1 GB free.")
  flags.DEFINE_integer("resize_shorter", 0, "If > 0, shrink images whose "
                       "shorter side is larger to this size (bicubic) and "
                       "re-encode them as JPEG.")
  flags.DEFINE_integer("jpeg_quality", 95, "Quality of re-encoded JPEGs.")
  flags.DEFINE_string("classes_file", "", "Whitespace-separated wnids in "
                      "label order; default: the packaged "
                      "imagenet100_classes.txt (tests use a small list).")
  flags.DEFINE_integer("examples_per_shard", 10000,
                       "Records per ArrayRecord shard.")
  flags.DEFINE_integer("num_workers", os.cpu_count() or 1,
                       "Processes that read and re-encode images.")
  flags.DEFINE_integer("seed", 0, "Seed of the stored (shuffled) order.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  classes = datasets.imagenet100_classes(f.classes_file or None)
  meta = convert(f.src, f.out, classes=classes,
                 resize_shorter=f.resize_shorter,
                 jpeg_quality=f.jpeg_quality,
                 examples_per_shard=f.examples_per_shard,
                 num_workers=f.num_workers, seed=f.seed,
                 staging_dir=f.staging_dir or None)
  print(json.dumps({k: v["num_examples"] for k, v in meta["splits"].items()}))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["src", "out"])
  cli.run(main)
