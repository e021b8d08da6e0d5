r"""Where a ResNet step's conv time goes, and which gradient formulation wins.

Collects every convolution a model runs — by tracing the encoder
(`models.ResNet`) and reading the `conv_general_dilated` calls of its jaxpr:
stem, 3x3 stride 1 and 2, 1x1 shortcuts, with their padding — and for each
distinct shape times, as separate jitted programs, XLA's forward and the
input gradient (dx) and kernel gradient (dw) in each formulation of
`bayesncl_jax.conv` (xla, per_tap, im2col). The programs are timed
interleaved (one call of each, round after round, --repeats rounds) so that
the shared machine's load hits all of them alike; each reports the median
wall time and the median process CPU time (user + system, all threads) per
call. Each shape prints one JSON record and a readable line with the winner
per gradient and what `conv.choose()` (the rule of `model.conv_impl=auto`)
picks; a last record sums the shapes weighted by how often the model uses
them, for xla-only, auto, and the best of each shape.

  python bench/conv_grad.py --model=resnet18 --rows=64 --image_size=32
  python bench/conv_grad.py --model=width8 --rows=256 --image_size=28
  python bench/conv_grad.py --model=resnet18 --rows=128 --torch   # + PyTorch

--rows is the batch one convolution sees: the per-view batch with the
default `model.bn_views=separate` (the model runs once per view).
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402  pylint: disable=g-import-not-at-top

# The encoders of the benchmarks: (width, stage_sizes, stem, stem_padding).
MODELS = {
    "resnet18": (64, (2, 2, 2, 2), "cifar", 2),
    "width8": (8, (1, 1, 1), "cifar", 2),  # configs/fashion_mnist.py
    "resnet18_imagenet": (64, (2, 2, 2, 2), "imagenet", 2),
}
IMPLS = ("xla", "per_tap", "im2col")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="resnet18", choices=sorted(MODELS))
  p.add_argument("--rows", type=int, default=64,
                 help="Images one convolution sees (per-view batch).")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--in_channels", type=int, default=3)
  p.add_argument("--dtype", default="float32",
                 choices=("float32", "bfloat16"))
  p.add_argument("--repeats", type=int, default=5,
                 help="Interleaved rounds; the median is reported.")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--only", default="",
                 help="Comma list of shape indices to time ('' = all).")
  p.add_argument("--torch", action="store_true",
                 help="Also time PyTorch's fwd/dx/dw per shape.")
  return p.parse_args(argv)


def model_convs(model: str, rows: int, image_size: int, in_channels: int):
  """Counter {(x_shape, w_shape, strides, padding): uses} of the encoder."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import models  # pylint: disable=g-import-not-at-top
  width, stages, stem, stem_padding = MODELS[model]
  net = models.ResNet("resnet18", width, stem, stages,
                      stem_padding=stem_padding)
  x = jax.ShapeDtypeStruct((rows, image_size, image_size, in_channels),
                           jnp.float32)
  variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x,
                                                train=False), x)
  jaxpr = jax.make_jaxpr(
      lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]))(
          variables, x)
  found = collections.Counter()

  def walk(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        key = (tuple(lhs), tuple(rhs),
               tuple(eqn.params["window_strides"]),
               tuple(tuple(p) for p in eqn.params["padding"]))
        found[key] += 1
      for v in eqn.params.values():  # jit / custom_* bodies.
        for sub in v if isinstance(v, (tuple, list)) else (v,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)
  walk(jaxpr.jaxpr)
  return found


def _programs(x_shape, w_shape, strides, padding, dtype):
  """{name: (jitted fn, args)} of fwd and dx/dw in every formulation."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import conv  # pylint: disable=g-import-not-at-top
  dt = jnp.dtype(dtype)
  x = jax.random.normal(jax.random.key(0), x_shape).astype(dt)
  w = (jax.random.normal(jax.random.key(1), w_shape) * 0.05).astype(dt)
  y = conv.xla_conv(x, w, strides, padding)
  dy = jax.random.normal(jax.random.key(2), y.shape).astype(dt)
  progs = {"fwd": (jax.jit(lambda x, w: conv.xla_conv(x, w, strides,
                                                      padding)), (x, w))}
  for impl in IMPLS:
    progs[f"dx_{impl}"] = (jax.jit(
        lambda w, dy, f=conv.DX[impl]: f(x_shape, w, dy, strides, padding,
                                         dt)), (w, dy))
    progs[f"dw_{impl}"] = (jax.jit(
        lambda x, dy, f=conv.DW[impl]: f(x, w_shape, dy, strides, padding,
                                         dt)), (x, dy))
  return progs


def time_interleaved(progs, repeats, warmup):
  """{name: {"ms": median wall, "cpu_ms": median process CPU}} per call."""
  for f, a in progs.values():
    for _ in range(warmup + 1):  # the first call compiles.
      f(*a).block_until_ready()
  wall = collections.defaultdict(list)
  cpu = collections.defaultdict(list)
  for _ in range(repeats):
    for name, (f, a) in progs.items():
      t0, c0 = time.perf_counter(), time.process_time()
      f(*a).block_until_ready()
      wall[name].append((time.perf_counter() - t0) * 1e3)
      cpu[name].append((time.process_time() - c0) * 1e3)
  return {n: {"ms": statistics.median(wall[n]),
              "cpu_ms": statistics.median(cpu[n])} for n in progs}


def time_torch(x_shape, w_shape, strides, padding, repeats, warmup):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  n, h, wd, c = x_shape
  kh, kw, _, o = w_shape
  g = torch.Generator().manual_seed(0)
  x = torch.randn(n, c, h, wd, generator=g, requires_grad=True)
  w = (torch.randn(o, c, kh, kw, generator=g) * 0.05).requires_grad_(True)
  pad = padding[0][0]  # symmetric in every model conv.
  y = F.conv2d(x, w, stride=strides, padding=pad)
  dy = torch.randn_like(y)
  fns = {
      "fwd": lambda: F.conv2d(x.detach(), w.detach(), stride=strides,
                              padding=pad),
      "dx": lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, strides, pad),
      "dw": lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, strides, pad),
  }
  return {k: {"ms": common.time_calls(f, warmup=warmup, steps=repeats,
                                      sync=lambda _: None)["median_ms"]}
          for k, f in fns.items()}


def main(argv=None):
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top,unused-import
  from bayesncl_jax import conv  # pylint: disable=g-import-not-at-top
  shapes = model_convs(args.model, args.rows, args.image_size,
                       args.in_channels)
  common.emit({"bench": "conv_grad_shapes", "model": args.model,
               "shapes": [{"x_shape": k[0], "w_shape": k[1], "strides": k[2],
                           "padding": k[3], "uses": u}
                          for k, u in shapes.items()]},
              f"{args.model}: {len(shapes)} distinct convolutions")
  only = {int(i) for i in args.only.split(",") if i}
  totals = collections.Counter()
  for idx, ((x_shape, w_shape, strides, padding), uses) in enumerate(
      shapes.items()):
    if only and idx not in only:
      continue
    t = time_interleaved(_programs(x_shape, w_shape, strides, padding,
                                   args.dtype), args.repeats, args.warmup)
    auto_dw, auto_dx = conv.choose(x_shape, w_shape, strides)
    best = {g: min(IMPLS, key=lambda i, g=g: t[f"{g}_{i}"]["ms"])
            for g in ("dw", "dx")}
    record = {"bench": "conv_grad", "model": args.model, "index": idx,
              "x_shape": x_shape, "w_shape": w_shape, "strides": strides,
              "padding": padding, "uses": uses, "dtype": args.dtype,
              "timing": t, "fastest": best,
              "auto": {"dw": auto_dw, "dx": auto_dx}}
    if args.torch:
      record["torch"] = time_torch(x_shape, w_shape, strides, padding,
                                   args.repeats, args.warmup)
    totals["fwd"] += uses * t["fwd"]["ms"]
    for g, a in (("dw", auto_dw), ("dx", auto_dx)):
      totals[f"{g}_xla"] += uses * t[f"{g}_xla"]["ms"]
      totals[f"{g}_auto"] += uses * t[f"{g}_{a}"]["ms"]
      totals[f"{g}_best"] += uses * t[f"{g}_{best[g]}"]["ms"]
    line = (f"[{idx}] x{x_shape} w{w_shape} /{strides[0]} pad {padding[0]} "
            f"(x{uses}): fwd {t['fwd']['ms']:.1f}")
    for g in ("dw", "dx"):
      line += f" | {g} " + " ".join(
          f"{i} {t[f'{g}_{i}']['ms']:.1f}/{t[f'{g}_{i}']['cpu_ms']:.0f}"
          for i in IMPLS)
    line += (f" ms (wall/cpu) | fastest dw {best['dw']} dx {best['dx']}; "
             f"auto dw {auto_dw} dx {auto_dx}")
    if args.torch:
      tt = record["torch"]
      line += (f" | torch fwd {tt['fwd']['ms']:.1f} dx {tt['dx']['ms']:.1f}"
               f" dw {tt['dw']['ms']:.1f}")
    common.emit(record, line)
  common.emit({"bench": "conv_grad_total", "model": args.model,
               "rows": args.rows, "image_size": args.image_size,
               "dtype": args.dtype, **totals},
              f"{args.model} convs x uses, ms: fwd {totals['fwd']:.0f}; dw "
              f"xla {totals['dw_xla']:.0f} auto {totals['dw_auto']:.0f} best "
              f"{totals['dw_best']:.0f}; dx xla {totals['dx_xla']:.0f} auto "
              f"{totals['dx_auto']:.0f} best {totals['dx_best']:.0f}")


if __name__ == "__main__":
  main()
