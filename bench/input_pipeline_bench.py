r"""Host throughput of the pre-training input pipeline, host vs device crops.

Makes --num_images ImageNet-size JPEGs (default 500x375, smooth random
content so that file sizes are photo-like, not noise-like), converts them with
`python -m bayesncl_jax.prepare_imagenet100` and a small classes file, then
times `input_pipeline.create_pretrain_iterator` for each --crop_on and
--workers: with host crops, JPEG decode + two random resized crops + flips at
--image_size; with device crops, JPEG decode + the image on a
--canvas_size canvas + the two boxes and flips (the cutting and resizing
then happen in the train step). The same for real Fashion-MNIST (28 px, the
small path) when its Debian files are installed. It also measures the
device side: the crop + resize of both views (`augment.crop_views`, XLA
cost-analysis FLOPs and time per image) and the rest of the on-device
augmentation (`augment.augment_batch`: colour jitter, grayscale, blur,
normalisation) on the default device, and prints how many host cores one
accelerator needs to be fed at --step_images_per_sec.

Host cost is measured as CPU seconds (this process and its Grain worker
processes, from psutil) per image as well as wall time: on a shared 2-core
machine wall time is bounded by the cores, CPU time per image is what scales.

`--resize_shorter=0,256` compares full-resolution records with records
pre-resized by `prepare_imagenet100 --resize_shorter=256`; a per-stage line
splits the host cost into JPEG decode and the two crops.

  python bench/input_pipeline_bench.py --num_images=256 --workers=0,2 \
      --resize_shorter=0,256 --crop_on=host,device --step_images_per_sec=3000
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
  p.add_argument("--crop_on", default="host,device",
                 help="Comma-separated config.aug.crop_on values to compare.")
  p.add_argument("--canvas_size", default="512",
                 help="Comma-separated device-crop canvas sides "
                 "(config.aug.canvas_size) to compare.")
  p.add_argument("--fashion_mnist", type=int, default=1,
                 help="1: also time the Fashion-MNIST (28 px) pipeline, if "
                 "its Debian files are installed.")
  p.add_argument("--fashion_mnist_batch", type=int, default=256)
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


def _imagenet100_config(data_dir: str, workers: int, args,
                        crop_on: str = "host", canvas: int = 0):
  from bayesncl_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.dataset.name = "imagenet100"
  c.dataset.data_dir = data_dir
  c.dataset.image_size = args.image_size
  c.dataset.num_workers = workers
  c.aug.crop_on = crop_on
  c.aug.canvas_size = canvas
  c.optim.batch_size = args.batch_size
  return c


def _fashion_mnist_config(workers: int, args, crop_on: str):
  from bayesncl_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_file(os.path.join(os.path.dirname(_HERE), "configs",
                                        "fashion_mnist.py"))
  c.dataset.num_workers = workers
  c.aug.crop_on = crop_on
  c.optim.batch_size = args.fashion_mnist_batch
  return c


def bench_stages(data_dir: str, args) -> dict:
  """Single-thread CPU ms per image of each host stage, in this process.

  decode: record read + JPEG decode to an RGB array (the source's
  __getitem__); crops: the two random resized crops + flips of one decoded
  image (`input_pipeline.TwoViews`, host crops); boxes: two boxes and flips
  (`input_pipeline.TwoBoxes`, device crops; the canvas copy is in the
  pipeline's batching).
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
  canvas = max(int(k) for k in args.canvas_size.split(","))
  boxes = input_pipeline.TwoBoxes(canvas, tuple(c.aug.crop_scale),
                                  c.aug.hflip_prob)
  t0 = time.process_time()
  for example in examples:
    boxes.random_map(example, rng)
  box_s = time.process_time() - t0
  shape = examples[0]["image"].shape
  return {"bench": "host_stages", "images": n,
          "stored_hw": [int(shape[0]), int(shape[1])],
          "decode_ms_per_image": 1e3 * decode / n,
          "two_crops_ms_per_image": 1e3 * crops / n,
          "boxes_ms_per_image": 1e3 * box_s / n}


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


def bench_pipeline(config, args) -> dict:
  """Host CPU time and wall time per image of the configured pipeline."""
  from bayesncl_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  c = config
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
  b, size = c.optim.batch_size, c.dataset.image_size
  if c.aug.crop_on == "device":
    k = input_pipeline.canvas_size(c)
    assert batch["canvas"].shape[:3] == (b, k, k), batch["canvas"].shape
    assert batch["boxes"].shape == (b, 2, 4)
  else:
    assert batch["view1"].shape[:3] == (b, size, size), batch["view1"].shape
  n = args.batches * b
  per_core = n / cpu if cpu > 0 else None
  return {
      "bench": "host_pipeline", "dataset": c.dataset.name,
      "crop_on": c.aug.crop_on, "workers": c.dataset.num_workers,
      "canvas_size": (input_pipeline.canvas_size(c)
                      if c.aug.crop_on == "device" else None),
      "image_size": size, "batch_size": b,
      "images": n, "wall_s": wall, "images_per_sec": n / wall,
      "cpu_s": cpu, "cpu_ms_per_image": 1e3 * cpu / n,
      "cpu_includes_workers": proc is not None,
      "images_per_sec_per_core": per_core,
      "step_images_per_sec": args.step_images_per_sec,
      "host_cores_per_accelerator": (args.step_images_per_sec / per_core
                                     if per_core else None)}


def bench_device_crop(args, image_size=None, canvas_size=None,
                      channels=3) -> dict:
  """The device half of device crops: both views' cut + resize, per image.

  `augment.crop_views` on a batch of --aug_batch canvases with boxes drawn
  as the host draws them (on a 4:3 image filling the canvas width): XLA's
  cost-analysis FLOPs and bytes of the compiled program, and its time on
  the default device.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import augment, input_pipeline  # pylint: disable=g-import-not-at-top
  size = image_size or args.image_size
  k = canvas_size
  b = args.aug_batch
  rng = np.random.default_rng(0)
  h, w = k * 3 // 4, k
  boxes, flips = [], []
  for _ in range(b):
    pair = [input_pipeline.draw_view_params(h, w, (0.08, 1.0), 0.5, rng)
            for _ in range(2)]
    boxes.append([box for box, _ in pair])
    flips.append([flip for _, flip in pair])
  batch = jax.device_put({
      "canvas": rng.integers(0, 256, (b, k, k, channels), dtype=np.uint8),
      "hw": np.tile(np.asarray([[h, w]], np.int32), (b, 1)),
      "boxes": np.asarray(boxes, np.int32),
      "flips": np.asarray(flips, np.bool_)})
  fn = jax.jit(augment.crop_views, static_argnums=1)
  t0 = time.perf_counter()
  compiled = fn.lower(batch, size).compile()
  compile_s = time.perf_counter() - t0
  cost = common.xla_cost(compiled)
  timing = common.time_calls(lambda: compiled(batch), warmup=1,
                             steps=args.aug_steps,
                             sync=lambda y: y[0].block_until_ready())
  flops = cost["flops"]
  return {"bench": "device_crop", "image_size": size, "canvas_size": k,
          "channels": channels, "batch_size": b, "compile_s": compile_s,
          **timing, "ms_per_image": timing["median_ms"] / b,
          "flops_per_image": flops / b if flops else None,
          "bytes_accessed_per_image": (cost["bytes_accessed"] / b
                                       if cost["bytes_accessed"] else None),
          "canvas_bytes_per_image": k * k * channels,
          "device_kind": jax.devices()[0].device_kind}


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
    crop_ons = args.crop_on.split(",")
    canvases = [int(k) for k in args.canvas_size.split(",")]
    workers = [int(x) for x in args.workers.split(",")]
    for resize, data_dir in data_dirs.items():
      stored = "stored as given" if resize is None else (
          "full resolution" if resize == 0 else f"shorter side {resize}")
      r = bench_stages(data_dir, args)
      r.update(jpeg_size=args.jpeg_size, resize_shorter=resize)
      common.emit(r, (
          f"host stages ({stored}, {r['stored_hw'][1]}x{r['stored_hw'][0]}): "
          f"decode {r['decode_ms_per_image']:.2f} ms/img, two crops "
          f"{r['two_crops_ms_per_image']:.2f} ms/img, boxes only "
          f"{r['boxes_ms_per_image']:.2f} ms/img (one thread)"))
      variants = [(crop_on, k) for crop_on in crop_ons
                  for k in (canvases if crop_on == "device" else [0])]
      for crop_on, k in variants:
        for w in workers:
          r = bench_pipeline(
              _imagenet100_config(data_dir, w, args, crop_on, k), args)
          r.update(jpeg_size=args.jpeg_size, mean_jpeg_kib=mean_kb,
                   resize_shorter=resize)
          _emit_pipeline(r, stored, args)
  fmnist = os.path.join("/usr/share/datasets/fashion-mnist",
                        "train-images-idx3-ubyte.gz")
  if args.fashion_mnist and os.path.exists(fmnist):
    for crop_on in crop_ons:
      for w in workers:
        r = bench_pipeline(_fashion_mnist_config(w, args, crop_on), args)
        _emit_pipeline(r, "Fashion-MNIST 28x28", args)
  for k in (int(k) for k in args.canvas_size.split(",")):
    r = bench_device_crop(args, canvas_size=k)
    common.emit(r, (
        f"device crop {k}->{args.image_size}px, two views, on "
        f"{r['device_kind']}: {r['ms_per_image']:.2f} ms/image, "
        f"{(r['flops_per_image'] or 0) / 1e6:.0f} MFLOP/image (XLA), "
        f"{r['canvas_bytes_per_image'] / 1024:.0f} KiB canvas/image"))
  r = bench_device_augment(args)
  common.emit(r, (f"device augment {args.image_size}px on "
                  f"{r['device_kind']}: {r['ms_per_image']:.2f} ms/image "
                  f"(batch {args.aug_batch}, {r['median_ms']:.1f} ms)"))


def _emit_pipeline(r: dict, stored: str, args) -> None:
  crops = (f"device crops, canvas {r['canvas_size']}"
           if r["crop_on"] == "device" else "host crops")
  if r["images_per_sec_per_core"]:
    cores = (f"({r['images_per_sec_per_core']:.1f} img/s/core) -> "
             f"{r['host_cores_per_accelerator']:.1f} host cores per "
             f"accelerator at {args.step_images_per_sec:.0f} img/s")
  else:  # too short to register CPU time: raise --batches.
    cores = "(CPU time below the clock's resolution)"
  common.emit(r, (
      f"host pipeline {r['dataset']} {r['image_size']}px ({stored}, "
      f"{crops}) workers={r['workers']}: {r['images_per_sec']:.1f} img/s "
      f"wall, {r['cpu_ms_per_image']:.2f} CPU-ms/img {cores}"))


if __name__ == "__main__":
  main()
