r"""Throughput of the JAX pre-training step (and, with --torch, PyTorch's).

Times `train.make_train_step` — on-device augmentation, forward, NT-Xent (+
KL), backward, LARS update — on random uint8 views, for every combination of
the selected methods, backbones, image sizes and dtypes. Per configuration it
prints one `JSON {...}` record and a readable line with: images/s per device,
ms/step (median of --steps timed steps after --warmup), compile time, peak
memory (`compiled.memory_analysis()`), model FLOPs per step (XLA's
`cost_analysis()` of the per-device program) and MFU against --peak_flops
(null unless given: a CPU has no single published peak).

  python bench/step_throughput.py --methods=cl,ncl,bayesncl --batch_size=64
  python bench/step_throughput.py --methods=cl --torch        # + PyTorch
  # an accelerator, the ImageNet-100 shape:
  python bench/step_throughput.py --backbones=resnet18,resnet50 \
      --image_sizes=224 --dtypes=bfloat16 --batch_size=256 \
      --peak_flops=989e12 --torch

No dataset is needed: the step's shapes do not depend on the data, so the
number of training examples (read by `train.build` for the lr schedule) is
stubbed.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from unittest import mock

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--methods", default="cl,ncl,bayesncl")
  p.add_argument("--backbones", default="resnet18")
  p.add_argument("--image_sizes", default="32")
  p.add_argument("--dtypes", default="float32")
  p.add_argument("--batch_size", type=int, default=32,
                 help="Global batch of images (2x views). CPU default small.")
  p.add_argument("--steps", type=int, default=20,
                 help="Timed steps; the median is reported.")
  p.add_argument("--warmup", type=int, default=2,
                 help="Untimed steps after compilation.")
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--stage_sizes", default="",
                 help="e.g. 1,1 for a tiny test model; '' = standard depth.")
  p.add_argument("--proj_hidden", type=int, default=2048)
  p.add_argument("--proj_out", type=int, default=256)
  p.add_argument("--gate_type", default="ste",
                 help="ste matches the PyTorch step (straight-through).")
  p.add_argument("--stem", default="auto",
                 help="auto: cifar below 64 px, imagenet otherwise.")
  p.add_argument("--peak_flops", type=float, default=None,
                 help="Peak FLOP/s of ONE device, for MFU (e.g. 989e12 for "
                      "H100 SXM bf16 dense). Unset: MFU is null.")
  p.add_argument("--torch", action="store_true",
                 help="Also time bench/torch_step.py's step (eager and "
                      "torch.compile) and print the JAX/PyTorch ratio.")
  p.add_argument("--torch_variants", default="eager,compile")
  p.add_argument("--conv_impls", default="auto",
                 help="Comma list of model.conv_impl values (auto, xla, "
                      "per_tap, im2col); with more than one, their steps are "
                      "compiled side by side and timed interleaved, one step "
                      "of each per round.")
  p.add_argument("--num_devices", type=int, default=0,
                 help="> 0: simulate this many CPU devices (sets XLA_FLAGS).")
  return p.parse_args(argv)


def make_config(method, backbone, size, dtype, args, conv_impl="auto"):
  from bayesncl_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.base_config()
  c.method = method
  c.dataset.name = "cifar10" if size < 64 else "imagenet100"
  c.dataset.num_classes = 10 if size < 64 else 100
  c.dataset.image_size = size
  c.model.backbone = backbone
  c.model.width = args.width
  c.model.stem = (("cifar" if size < 64 else "imagenet")
                  if args.stem == "auto" else args.stem)
  c.model.stage_sizes = tuple(int(s) for s in args.stage_sizes.split(",")
                              if s)
  c.model.proj_hidden = args.proj_hidden
  c.model.proj_out = args.proj_out
  c.model.dtype = dtype
  c.model.conv_impl = conv_impl
  c.gate.type = args.gate_type
  c.aug.blur_prob = 0.0 if size < 64 else 0.5  # as the configs/ files.
  c.optim.batch_size = args.batch_size
  c.optim.total_steps = 1000
  return c


def compile_jax(config) -> dict:
  """Builds and compiles one configuration's step; returns its pieces."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import datasets, sharding, train  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh()
  # train.build reads the dataset size only for the lr schedule.
  with mock.patch.object(datasets, "num_examples", return_value=50_000):
    setup = train.build(config, mesh)
  state = train.init_state(setup, jax.random.key(0))
  b, s = config.optim.batch_size, config.dataset.image_size
  rs = np.random.default_rng(0)
  batch = {
      "view1": rs.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
      "view2": rs.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
      "label": rs.integers(0, config.dataset.num_classes, (b,),
                           dtype=np.int32)}
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))
  rng = jax.random.key(1)
  step = train.make_train_step(setup)

  t0 = time.perf_counter()
  compiled = step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch, rng)
    return metrics["loss"]
  return {"config": config, "mesh": mesh, "compiled": compiled,
          "compile_s": compile_s, "run": run}


def time_interleaved(runs, *, warmup: int, steps: int) -> list[dict]:
  """Times the `run()`s one step each per round; per run: median/min/mean
  wall ms and median process CPU ms (user + system, all threads) per step."""
  for run in runs:
    for _ in range(warmup):
      run().block_until_ready()
  wall = [[] for _ in runs]
  cpu = [[] for _ in runs]
  for _ in range(steps):
    for i, run in enumerate(runs):
      t0, c0 = time.perf_counter(), time.process_time()
      run().block_until_ready()
      wall[i].append((time.perf_counter() - t0) * 1e3)
      cpu[i].append((time.process_time() - c0) * 1e3)
  return [{"median_ms": statistics.median(w), "min_ms": min(w),
           "mean_ms": statistics.fmean(w), "cpu_median_ms":
           statistics.median(c), "timed_steps": steps}
          for w, c in zip(wall, cpu)]


def jax_record(built: dict, timing: dict, args) -> dict:
  config, compiled = built["config"], built["compiled"]
  b, s = config.optim.batch_size, config.dataset.image_size
  n_dev = built["mesh"].size
  cost = common.xla_cost(compiled)
  mem = common.xla_memory(compiled)
  sec = timing["median_ms"] / 1e3
  flops = cost["flops"]
  mfu = (flops / sec / args.peak_flops
         if flops and args.peak_flops else None)
  return {
      "framework": "jax", "variant": f"jit/conv_impl={config.model.conv_impl}",
      "conv_impl": config.model.conv_impl,
      "method": config.method, "backbone": config.model.backbone,
      "image_size": s, "dtype": config.model.dtype,
      "stem": config.model.stem, "global_batch": b, "num_devices": n_dev,
      "images_per_sec_per_device": b / sec / n_dev,
      "compile_s": built["compile_s"], **timing,
      # FLOPs of the per-device SPMD program, i.e. per device per step.
      "flops_per_step_per_device": flops,
      "model_tflops_per_sec_per_device": flops / sec / 1e12 if flops else None,
      "bytes_accessed": cost["bytes_accessed"],
      **mem, "peak_flops": args.peak_flops, "mfu": mfu}


def readable(r: dict) -> str:
  mfu = "null" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
  flops = r.get("flops_per_step_per_device")
  return (f"{r['framework']}/{r['variant']} {r['method']} {r['backbone']} "
          f"{r['image_size']}px {r['dtype']} B={r['global_batch']} "
          f"dev={r['num_devices']}: {r['median_ms']:.1f} ms/step "
          f"(cpu {r.get('cpu_median_ms', float('nan')):.0f} ms), "
          f"{r['images_per_sec_per_device']:.1f} img/s/dev, compile "
          f"{r['compile_s']:.1f} s, peak {common.mib(r.get('peak_bytes'))}, "
          f"{'n/a' if not flops else f'{flops / 1e9:.1f} GFLOP'}/step, "
          f"MFU {mfu}")


def main(argv=None):
  args = parse_args(argv)
  if args.num_devices > 0:
    common.set_host_device_count(args.num_devices)
  import jax  # pylint: disable=g-import-not-at-top,unused-import

  jax_records = []  # one per (method, backbone, size, dtype): the first impl
  for method, backbone, size, dtype in itertools.product(
      args.methods.split(","), args.backbones.split(","),
      [int(x) for x in args.image_sizes.split(",")], args.dtypes.split(",")):
    built = [compile_jax(make_config(method, backbone, size, dtype, args, impl))
             for impl in args.conv_impls.split(",")]
    timings = time_interleaved([b["run"] for b in built], warmup=args.warmup,
                               steps=args.steps)
    records = [jax_record(b, t, args) for b, t in zip(built, timings)]
    for r in records:
      extra = ""
      if r is not records[0]:
        r["speedup_vs_first_conv_impl"] = (records[0]["median_ms"]
                                           / r["median_ms"])
        extra = (f"; {r['speedup_vs_first_conv_impl']:.2f}x the step of "
                 f"conv_impl={records[0]['conv_impl']}")
      common.emit(r, readable(r) + extra)
    jax_records.append(records)

  if not args.torch:
    return
  try:
    import torch_step  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"--torch: PyTorch is not importable ({e}); `pip install -r "
          "requirements-bench.txt`.", file=sys.stderr)
    sys.exit(2)
  for records in jax_records:
    jr = records[0]
    for variant in args.torch_variants.split(","):
      tr = torch_step.bench(
          method=jr["method"], backbone=jr["backbone"],
          image_size=jr["image_size"], dtype=jr["dtype"], stem=jr["stem"],
          batch_size=args.batch_size, width=args.width,
          stage_sizes=[int(s) for s in args.stage_sizes.split(",") if s],
          proj_hidden=args.proj_hidden, proj_out=args.proj_out,
          variant=variant, steps=args.steps, warmup=args.warmup,
          peak_flops=args.peak_flops,
          flops_per_step=jr["flops_per_step_per_device"])
      # > 1 means JAX processes more images per second than PyTorch.
      ratios = {r["conv_impl"]: r["images_per_sec_per_device"]
                / tr["images_per_sec_per_device"] for r in records}
      tr["jax_over_torch_throughput"] = ratios[jr["conv_impl"]]
      tr["jax_over_torch_throughput_by_conv_impl"] = ratios
      common.emit(tr, readable(tr) + "; JAX/PyTorch throughput = " + ", ".join(
          f"{v:.2f}x (conv_impl={k})" for k, v in ratios.items()))


if __name__ == "__main__":
  main()
