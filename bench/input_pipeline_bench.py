r"""Host throughput of the ImageNet-100 pre-training input pipeline.

Makes --num_images ImageNet-size JPEGs (default 500x375, smooth random
content so that file sizes are photo-like, not noise-like), converts them with
`python -m bayesncl_jax.prepare_imagenet100` and a small classes file, then
times `input_pipeline.create_pretrain_iterator` — JPEG decode + two random
resized crops + flips at --image_size — for each --workers count. It also
times the on-device half of the augmentation (`augment.augment_batch`:
colour jitter, grayscale, blur, normalisation) per image on the default
device, and prints how many host cores one accelerator needs to be fed at
--step_images_per_sec.

Host cost is measured as CPU seconds (this process and its Grain worker
processes, from psutil) per image as well as wall time: on a shared 2-core
machine wall time is bounded by the cores, CPU time per image is what scales.

`--resize_shorter=0,256` compares full-resolution records with records
pre-resized by `prepare_imagenet100 --resize_shorter=256`; a per-stage line
splits the host cost into JPEG decode and the two crops.

  python bench/input_pipeline_bench.py --num_images=256 --workers=0,1,2 \
      --resize_shorter=0,256 --step_images_per_sec=3000
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--num_images", type=int, default=256)
  p.add_argument("--num_classes", type=int, default=4)
  p.add_argument("--jpeg_size", default="500x375", help="WxH of the JPEGs.")
  p.add_argument("--image_size", type=int, default=224, help="Crop size.")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--batches", type=int, default=16,
                 help="Timed batches per worker count (after one untimed).")
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--resize_shorter", default="0",
                 help="Comma-separated prepare_imagenet100 --resize_shorter "
                 "values to compare (0 = full resolution).")
  p.add_argument("--stage_images", type=int, default=64,
                 help="Images of the per-stage (decode / two crops) timing.")
  p.add_argument("--aug_batch", type=int, default=32,
                 help="Batch of the on-device augmentation timing.")
  p.add_argument("--aug_steps", type=int, default=5)
  p.add_argument("--step_images_per_sec", type=float, default=3000.0,
                 help="Images/s one accelerator's train step consumes.")
  p.add_argument("--data_dir", default="",
                 help="Reuse a converted folder instead of making one.")
  return p.parse_args(argv)


def make_jpegs(root: str, num_images: int, num_classes: int, size: str
               ) -> tuple[str, float]:
  """Writes SRC/{train,val}/<wnid>/*.JPEG; returns (classes file, mean KB)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  w, h = (int(x) for x in size.split("x"))
  rng = np.random.default_rng(0)
  wnids = [f"n{i:08d}" for i in range(num_classes)]
  sizes = []
  for split, count in (("train", num_images), ("val", num_classes)):
    for i in range(count):
      d = os.path.join(root, "src", split, wnids[i % num_classes])
      os.makedirs(d, exist_ok=True)
      # Upsampled low-resolution noise + mild pixel noise: smooth regions and
      # edges like a photo, so JPEG size and decode cost are realistic
      # (pure noise would be ~4x larger than an ImageNet JPEG).
      small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
      img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC),
                       dtype=np.int16)
      img = np.clip(img + rng.integers(-8, 9, img.shape), 0, 255)
      path = os.path.join(d, f"img{i:05d}.JPEG")
      Image.fromarray(img.astype(np.uint8)).save(path, quality=90)
      if split == "train":
        sizes.append(os.path.getsize(path))
  classes_file = os.path.join(root, "classes.txt")
  with open(classes_file, "w") as f:
    f.write("\n".join(wnids) + "\n")
  return classes_file, sum(sizes) / len(sizes) / 1024


def convert(root: str, classes_file: str, resize_shorter: int) -> str:
  out = os.path.join(root, f"ar_{resize_shorter}")
  subprocess.run(
      [sys.executable, "-m", "bayesncl_jax.prepare_imagenet100",
       f"--src={os.path.join(root, 'src')}", f"--out={out}",
       f"--classes_file={classes_file}", "--num_workers=1",
       f"--resize_shorter={resize_shorter}"],
      check=True, capture_output=True, text=True)
  return out


def _imagenet100_config(data_dir: str, workers: int, args):
  from bayesncl_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.dataset.name = "imagenet100"
  c.dataset.data_dir = data_dir
  c.dataset.image_size = args.image_size
  c.dataset.num_workers = workers
  c.optim.batch_size = args.batch_size
  return c


def bench_stages(data_dir: str, args) -> dict:
  """Single-thread CPU ms per image of each host stage, in this process.

  decode: record read + JPEG decode to an RGB array (the source's
  __getitem__); crops: the two random resized crops + flips of one decoded
  image (`input_pipeline.TwoViews`).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import datasets, input_pipeline  # pylint: disable=g-import-not-at-top
  c = _imagenet100_config(data_dir, 0, args)
  source = datasets.get_source(c.dataset, c.dataset.train_split)
  n = min(args.stage_images, len(source))
  t0 = time.process_time()
  examples = [source[i] for i in range(n)]
  decode = time.process_time() - t0
  views = input_pipeline.TwoViews(args.image_size, tuple(c.aug.crop_scale),
                                  c.aug.hflip_prob)
  rng = np.random.default_rng(0)
  t0 = time.process_time()
  for example in examples:
    views.random_map(example, rng)
  crops = time.process_time() - t0
  shape = examples[0]["image"].shape
  return {"bench": "host_stages", "images": n,
          "stored_hw": [int(shape[0]), int(shape[1])],
          "decode_ms_per_image": 1e3 * decode / n,
          "two_crops_ms_per_image": 1e3 * crops / n}


def _cpu_seconds(proc) -> float:
  """User + system CPU time of `proc` and its live children (workers).

  Without psutil (a benchmark-only dependency) only this process is counted,
  which under-counts runs with workers.
  """
  if proc is None:
    return time.process_time()
  total = 0.0
  for p in [proc] + proc.children(recursive=True):
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except Exception:  # pylint: disable=broad-except  # a child just exited.
      pass
  return total


def bench_pipeline(data_dir: str, workers: int, args) -> dict:
  from bayesncl_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  c = _imagenet100_config(data_dir, workers, args)
  it = input_pipeline.create_pretrain_iterator(c, process_index=0,
                                               process_count=1)
  try:
    import psutil  # pylint: disable=g-import-not-at-top
    proc = psutil.Process()
  except ImportError:
    proc = None
  try:
    next(it)  # Starts workers and fills buffers: not timed.
    cpu0, t0 = _cpu_seconds(proc), time.perf_counter()
    for _ in range(args.batches):
      batch = next(it)
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds(proc) - cpu0
  finally:
    it.close()
  assert batch["view1"].shape == (args.batch_size, args.image_size,
                                  args.image_size, 3)
  n = args.batches * args.batch_size
  per_core = n / cpu if cpu > 0 else None
  return {
      "bench": "host_pipeline", "workers": workers,
      "image_size": args.image_size, "batch_size": args.batch_size,
      "images": n, "wall_s": wall, "images_per_sec": n / wall,
      "cpu_s": cpu, "cpu_ms_per_image": 1e3 * cpu / n,
      "cpu_includes_workers": proc is not None,
      "images_per_sec_per_core": per_core,
      "step_images_per_sec": args.step_images_per_sec,
      "host_cores_per_accelerator": (args.step_images_per_sec / per_core
                                     if per_core else None)}


def bench_device_augment(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import augment, config_lib  # pylint: disable=g-import-not-at-top
  aug = config_lib.base_config().aug
  aug.blur_prob = 0.5  # configs/imagenet100.py
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  fn = jax.jit(lambda k, x: augment.augment_batch(k, x, aug, mean, std))
  x = jax.device_put(np.random.default_rng(0).integers(
      0, 256, (args.aug_batch, args.image_size, args.image_size, 3),
      dtype=np.uint8))
  key = jax.random.key(0)
  t0 = time.perf_counter()
  fn(key, x).block_until_ready()
  compile_s = time.perf_counter() - t0
  timing = common.time_calls(lambda: fn(key, x), warmup=1,
                             steps=args.aug_steps,
                             sync=lambda y: y.block_until_ready())
  return {"bench": "device_augment", "image_size": args.image_size,
          "batch_size": args.aug_batch, "compile_s": compile_s, **timing,
          "ms_per_image": timing["median_ms"] / args.aug_batch,
          "device_kind": jax.devices()[0].device_kind}


def main(argv=None):
  args = parse_args(argv)
  from absl import flags  # pylint: disable=g-import-not-at-top
  # Grain's worker processes read absl flags; outside an absl app they are
  # unparsed, so mark them parsed (their defaults) as bayesncl_jax.main would.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  import jax  # pylint: disable=g-import-not-at-top,unused-import
  with tempfile.TemporaryDirectory() as root:
    mean_kb = None
    if args.data_dir:
      data_dirs = {None: args.data_dir}
    else:
      t0 = time.perf_counter()
      classes_file, mean_kb = make_jpegs(root, args.num_images,
                                         args.num_classes, args.jpeg_size)
      data_dirs = {int(r): convert(root, classes_file, int(r))
                   for r in args.resize_shorter.split(",")}
      print(f"Made and converted {args.num_images} {args.jpeg_size} JPEGs "
            f"(mean {mean_kb:.0f} KiB) in {time.perf_counter() - t0:.1f} s",
            flush=True)
    for resize, data_dir in data_dirs.items():
      stored = "stored as given" if resize is None else (
          "full resolution" if resize == 0 else f"shorter side {resize}")
      r = bench_stages(data_dir, args)
      r.update(jpeg_size=args.jpeg_size, resize_shorter=resize)
      common.emit(r, (
          f"host stages ({stored}, {r['stored_hw'][1]}x{r['stored_hw'][0]}): "
          f"decode {r['decode_ms_per_image']:.2f} ms/img, two crops "
          f"{r['two_crops_ms_per_image']:.2f} ms/img (one thread)"))
      for w in (int(x) for x in args.workers.split(",")):
        r = bench_pipeline(data_dir, w, args)
        r.update(jpeg_size=args.jpeg_size, mean_jpeg_kib=mean_kb,
                 resize_shorter=resize)
        common.emit(r, (
            f"host pipeline {args.image_size}px ({stored}) workers={w}: "
            f"{r['images_per_sec']:.1f} img/s wall, "
            f"{r['cpu_ms_per_image']:.2f} CPU-ms/img "
            f"({r['images_per_sec_per_core']:.1f} img/s/core) -> "
            f"{r['host_cores_per_accelerator']:.1f} host cores per "
            f"accelerator at {args.step_images_per_sec:.0f} img/s"))
  r = bench_device_augment(args)
  common.emit(r, (f"device augment {args.image_size}px on "
                  f"{r['device_kind']}: {r['ms_per_image']:.2f} ms/image "
                  f"(batch {args.aug_batch}, {r['median_ms']:.1f} ms)"))


if __name__ == "__main__":
  main()
