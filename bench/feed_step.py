r"""The real input pipeline (device crops) feeding the real step, and a smoke.

Makes --num_images synthetic ImageNet-format JPEGs (as
`input_pipeline_bench.py`), converts them with `prepare_imagenet100
--resize_shorter`, and builds `configs/imagenet100.py` with device crops
(`aug.crop_on=device`) and the model overrides given. Then, in one process:

1. step alone: the compiled train step on one batch already on the device,
   --steps times (images/s of the step itself);
2. fed: the same step fed by `input_pipeline.create_pretrain_iterator`
   (Grain, --workers processes) + `sharding.make_global_batch`, --steps
   steps after --warmup, dispatched asynchronously as `train.py` does
   (images/s end to end; fed ÷ alone < 1 means the host cannot keep up);
3. smoke: training continues on that pipeline for --smoke_seconds (or
   --smoke_steps): every loss must be finite, and the loss should fall (mean
   of the last 10% of steps below the mean of the first 10%).

Each prints one `JSON {...}` record. Exit status 1 if a loss is NaN/inf.

  python bench/feed_step.py --dtype=bfloat16 --batch_size=256 --workers=8 \
      --smoke_seconds=180
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--num_images", type=int, default=1024)
  p.add_argument("--num_classes", type=int, default=4)
  p.add_argument("--jpeg_size", default="500x375")
  p.add_argument("--resize_shorter", type=int, default=256)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--canvas_size", type=int, default=384)
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--method", default="bayesncl")
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--stage_sizes", default="")
  p.add_argument("--proj_hidden", type=int, default=16384)
  p.add_argument("--proj_out", type=int, default=2048)
  p.add_argument("--workers", type=int, default=-1,
                 help="Grain worker processes; -1 = CPU count - 1.")
  p.add_argument("--steps", type=int, default=30,
                 help="Timed steps of 'alone' and 'fed'.")
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--smoke_seconds", type=float, default=180.0)
  p.add_argument("--smoke_steps", type=int, default=0,
                 help="> 0: a fixed number of smoke steps instead.")
  return p.parse_args(argv)


def make_config(data_dir: str, args):
  from bayesncl_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_file(
      os.path.join(os.path.dirname(_HERE), "configs", "imagenet100.py"),
      f"method={args.method},dtype={args.dtype},batch_size={args.batch_size}")
  c.dataset.data_dir = data_dir
  c.dataset.num_classes = args.num_classes
  c.dataset.image_size = args.image_size
  c.dataset.num_workers = (max(0, (os.cpu_count() or 1) - 1)
                           if args.workers < 0 else args.workers)
  c.aug.crop_on = "device"
  c.aug.canvas_size = args.canvas_size
  c.model.width = args.width
  c.model.stage_sizes = tuple(int(s) for s in args.stage_sizes.split(",")
                              if s)
  c.model.proj_hidden = args.proj_hidden
  c.model.proj_out = args.proj_out
  if args.image_size < 64:
    c.model.stem = "cifar"
  c.optim.total_steps = 100_000  # the schedule only; the bench stops early.
  c.progress_bar = False
  return c


def run(config, args) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import input_pipeline, sharding, train  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh()
  setup = train.build(config, mesh)
  state = train.init_state(setup, jax.random.key(0))
  step = train.make_train_step(setup)
  rng = jax.random.key(1)
  it = input_pipeline.create_pretrain_iterator(config)
  b = config.optim.batch_size
  records = []
  try:
    t0 = time.perf_counter()
    batch = sharding.make_global_batch(next(it), mesh)
    first_batch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t0

    # 1. The step alone, on one resident batch.
    for _ in range(args.warmup):
      state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics["loss"])
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics["loss"])
    alone_s = time.perf_counter() - t0
    alone = b * args.steps / alone_s

    # 2. Fed by the pipeline, asynchronous dispatch as in train.py.
    def fed_steps(n, state):
      losses = []
      for _ in range(n):
        state, metrics = compiled(state, sharding.make_global_batch(
            next(it), mesh), rng)
        losses.append(metrics["loss"])
      jax.block_until_ready(losses[-1])
      return state, losses

    state, _ = fed_steps(args.warmup, state)
    t0 = time.perf_counter()
    state, losses = fed_steps(args.steps, state)
    fed_s = time.perf_counter() - t0
    fed = b * args.steps / fed_s
    records.append({
        "bench": "feed_step", "method": config.method,
        "dtype": config.model.dtype, "image_size": config.dataset.image_size,
        "canvas_size": config.aug.canvas_size, "global_batch": b,
        "workers": config.dataset.num_workers,
        "num_devices": mesh.size, "compile_s": compile_s,
        "first_batch_s": first_batch_s, "timed_steps": args.steps,
        "step_alone_images_per_sec": alone,
        "fed_images_per_sec": fed, "fed_over_alone": fed / alone,
        **common.xla_memory(compiled),
        "device_kind": jax.devices()[0].device_kind})

    # 3. Smoke: keep training; losses fetched once at the end.
    all_losses = list(losses)
    t0 = time.perf_counter()
    n = 0
    while True:
      if args.smoke_steps > 0:
        if n >= args.smoke_steps:
          break
      elif time.perf_counter() - t0 >= args.smoke_seconds:
        break
      chunk = 10 if args.smoke_steps <= 0 else min(10, args.smoke_steps - n)
      state, losses = fed_steps(chunk, state)
      all_losses += losses
      n += chunk
    smoke_s = time.perf_counter() - t0
    values = np.asarray(jax.device_get(all_losses), np.float64)
    k = max(1, len(values) // 10)
    first, last = float(values[:k].mean()), float(values[-k:].mean())
    records.append({
        "bench": "train_smoke", "method": config.method,
        "dtype": config.model.dtype, "global_batch": b,
        "steps": len(values), "seconds": smoke_s,
        "images_per_sec": b * n / smoke_s if n else None,
        "loss_first": first, "loss_last": last,
        "all_finite": bool(np.isfinite(values).all()),
        "loss_fell": bool(last < first),
        "losses": [round(float(v), 5) for v in values]})
  finally:
    it.close()
  return records


def main(argv=None):
  args = parse_args(argv)
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # Grain workers read absl flags.
    flags.FLAGS.mark_as_parsed()
  import input_pipeline_bench  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as root:
    t0 = time.perf_counter()
    classes_file, mean_kb = input_pipeline_bench.make_jpegs(
        root, args.num_images, args.num_classes, args.jpeg_size)
    data_dir = input_pipeline_bench.convert(root, classes_file,
                                            args.resize_shorter)
    print(f"Made {args.num_images} {args.jpeg_size} JPEGs (mean "
          f"{mean_kb:.0f} KiB, stored with shorter side "
          f"{args.resize_shorter or 'as made'}) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    records = run(make_config(data_dir, args), args)
  feed, smoke = records
  common.emit(feed, (
      f"feed {feed['method']} {feed['dtype']} B={feed['global_batch']} "
      f"{feed['image_size']}px canvas {feed['canvas_size']} workers="
      f"{feed['workers']}: step alone {feed['step_alone_images_per_sec']:.1f}"
      f" img/s, fed {feed['fed_images_per_sec']:.1f} img/s "
      f"({feed['fed_over_alone']:.2f}x)"))
  common.emit(smoke, (
      f"smoke {smoke['steps']} steps in {smoke['seconds']:.0f} s: loss "
      f"{smoke['loss_first']:.4f} -> {smoke['loss_last']:.4f}, finite "
      f"{smoke['all_finite']}, fell {smoke['loss_fell']}"))
  if not smoke["all_finite"] or not all(
      math.isfinite(x) for x in (smoke["loss_first"], smoke["loss_last"])):
    sys.exit(1)


if __name__ == "__main__":
  main()
