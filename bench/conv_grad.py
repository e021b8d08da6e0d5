r"""Where a ResNet step's time goes: forward, input- and weight-gradient convs.

For every distinct 3x3 convolution of a ResNet-18 (CIFAR stem, --width) at
--rows images of --image_size px, times three jitted XLA programs — the
forward convolution, the gradient w.r.t. the input (dx) and the gradient
w.r.t. the kernel (dw) — and, with --torch, the same three in PyTorch
(`torch.nn.functional.conv2d` and `torch.autograd.grad`, NCHW, on the same
device type). Each layer prints one JSON record and a readable line; a last
record sums the layers weighted by how often the ResNet uses each shape.

Written to explain the CPU results in RESULTS.md (XLA:CPU's step is slower
than PyTorch's while its forward pass is not): run it on any backend.

  python bench/conv_grad.py --rows=128 --torch
"""
from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

import common  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=128,
                 help="Images in the batch (two views of 64 = 128).")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--torch", action="store_true")
  return p.parse_args(argv)


def resnet18_convs(width: int, image_size: int):
  """(count, spatial_in, c_in, c_out, stride) of the 3x3 convs, CIFAR stem."""
  convs = [(1, image_size, 3, width, 1)]  # stem
  size, c = image_size, width
  for stage in range(4):
    c_out = width * 2 ** stage
    stride = 1 if stage == 0 else 2
    convs.append((1, size, c, c_out, stride))  # first conv of the stage
    size //= stride
    convs.append((3, size, c_out, c_out, 1))  # the other three
    c = c_out
  return convs


def time_jax(rows, size, c_in, c_out, stride, args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dn = ("NHWC", "HWIO", "NHWC")

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride),
                                        ((1, 1), (1, 1)),
                                        dimension_numbers=dn)
  x = jax.random.normal(jax.random.key(0), (rows, size, size, c_in))
  w = jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out)) * 0.05
  dy = jnp.ones_like(conv(x, w))
  fns = {
      "fwd": jax.jit(conv),
      "dx": jax.jit(lambda x, w, dy: jax.vjp(lambda v: conv(v, w), x)[1](dy)[0]),
      "dw": jax.jit(lambda x, w, dy: jax.vjp(lambda v: conv(x, v), w)[1](dy)[0]),
  }
  argsets = {"fwd": (x, w), "dx": (x, w, dy), "dw": (x, w, dy)}
  return {name: common.time_calls(
      lambda f=f, a=argsets[name]: f(*a), warmup=args.warmup,
      steps=args.steps, sync=lambda y: y.block_until_ready())["median_ms"]
          for name, f in fns.items()}


def time_torch(rows, size, c_in, c_out, stride, args):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (
      lambda _: None)
  g = torch.Generator().manual_seed(0)
  x = torch.randn(rows, c_in, size, size, generator=g).to(dev)
  w = (torch.randn(c_out, c_in, 3, 3, generator=g) * 0.05).to(dev)
  x.requires_grad_(True)
  w.requires_grad_(True)

  def fwd():
    with torch.no_grad():
      return F.conv2d(x, w, stride=stride, padding=1)

  def grad(wrt):
    y = F.conv2d(x, w, stride=stride, padding=1)
    return torch.autograd.grad(y, wrt, torch.ones_like(y))
  fns = {"fwd": fwd, "dx": lambda: grad(x), "dw": lambda: grad(w)}
  # dx/dw include a forward pass in PyTorch (autograd needs the graph);
  # subtract it so the columns mean the same as JAX's.
  out = {name: common.time_calls(f, warmup=args.warmup, steps=args.steps,
                                 sync=sync)["median_ms"]
         for name, f in fns.items()}
  out["dx"] = max(out["dx"] - out["fwd"], 0.0)
  out["dw"] = max(out["dw"] - out["fwd"], 0.0)
  return out


def main(argv=None):
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top,unused-import
  frameworks = ["jax"] + (["torch"] if args.torch else [])
  totals = {fw: {"fwd": 0.0, "dx": 0.0, "dw": 0.0} for fw in frameworks}
  for count, size, c_in, c_out, stride in resnet18_convs(args.width,
                                                         args.image_size):
    record = {"bench": "conv_grad", "rows": args.rows, "spatial": size,
              "c_in": c_in, "c_out": c_out, "stride": stride,
              "count": count}
    line = (f"conv {args.rows}x{size}x{size}x{c_in} -> {c_out} /{stride} "
            f"(x{count}):")
    for fw in frameworks:
      timing = (time_jax if fw == "jax" else time_torch)(
          args.rows, size, c_in, c_out, stride, args)
      record[fw] = timing
      for k, v in timing.items():
        totals[fw][k] += count * v
      line += (f" {fw} fwd {timing['fwd']:.1f} / dx {timing['dx']:.1f} / "
               f"dw {timing['dw']:.1f} ms;")
    common.emit(record, line)
  record = {"bench": "conv_grad_total", "rows": args.rows,
            "image_size": args.image_size, "width": args.width, **totals}
  line = "ResNet-18 3x3 convs, summed:"
  for fw in frameworks:
    t = totals[fw]
    line += (f" {fw} fwd {t['fwd']:.0f} / dx {t['dx']:.0f} / dw "
             f"{t['dw']:.0f} ms (dw = {t['dw'] / t['fwd']:.1f}x fwd);")
  common.emit(record, line)


if __name__ == "__main__":
  main()
