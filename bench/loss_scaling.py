r"""Memory and time of the NT-Xent loss + gradient vs batch and device count.

For each global batch (rows of z = 2 x images) and each device count d, jits
`jax.value_and_grad(nt_xent_loss)` with z row-sharded over d devices and the
similarity matrix constrained to row blocks (as the train step does), and
prints per-device temporary memory (`memory_analysis().temp_size_in_bytes`)
and the median time. With the row sharding a device should hold a
(rows/d) x rows block, so temp memory should fall ~1/d.

On a CPU the d devices are simulated (--max_devices sets XLA_FLAGS before
jax is imported) and share the same cores: the times show overheads, not
speed-ups; the memory numbers are the per-device layout XLA chose and carry
over to real devices.

  python bench/loss_scaling.py --rows=256,1024,4096 --devices=1,2,4,8
"""
from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402  pylint: disable=g-import-not-at-top


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", default="256,512,1024,2048,4096",
                 help="Global rows of z (2 views x images).")
  p.add_argument("--dim", type=int, default=256, help="Feature dim D.")
  p.add_argument("--devices", default="1,2,4,8")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--temperature", type=float, default=0.2)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  device_counts = [int(x) for x in args.devices.split(",")]
  # Must precede `import jax`. It multiplies only the CPU backend; on an
  # accelerator the real devices are used and the flag does nothing.
  common.set_host_device_count(max(device_counts))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import losses, sharding  # pylint: disable=g-import-not-at-top

  available = jax.devices()
  for d in device_counts:
    if d > len(available):
      print(f"skipping {d} devices: only {len(available)} available",
            flush=True)
      continue
    mesh = Mesh(np.asarray(available[:d]), (sharding.DATA_AXIS,))
    rows_s = sharding.rows_sharding(mesh)
    for n in (int(x) for x in args.rows.split(",")):
      if n % (2 * d):
        print(f"skipping rows={n} on {d} devices: not divisible", flush=True)
        continue
      z = np.random.default_rng(0).normal(size=(n, args.dim)).astype(
          np.float32)
      z /= np.linalg.norm(z, axis=1, keepdims=True)
      z = jax.device_put(z, rows_s)
      fn = jax.jit(jax.value_and_grad(
          lambda z: losses.nt_xent_loss(z, args.temperature,
                                        row_sharding=rows_s)),
                   in_shardings=rows_s)
      compiled = fn.lower(z).compile()
      mem = common.xla_memory(compiled)
      timing = common.time_calls(lambda: compiled(z), warmup=1,
                                 steps=args.steps,
                                 sync=jax.block_until_ready)
      full = n * n * 4
      r = {"bench": "nt_xent_value_and_grad", "rows": n, "dim": args.dim,
           "num_devices": d, **mem, **timing,
           # The whole (rows x rows) float32 similarity matrix, for scale.
           "full_sim_bytes": full,
           "temp_over_full_sim": mem["temp_bytes"] / full
                                 if mem["temp_bytes"] is not None else None}
      common.emit(r, (f"nt_xent v&g rows={n} D={args.dim} devices={d}: temp "
                      f"{common.mib(mem['temp_bytes'])}/device "
                      f"({r['temp_over_full_sim']:.2f}x one full sim matrix "
                      f"of {common.mib(full)}), {timing['median_ms']:.1f} ms"))


if __name__ == "__main__":
  main()
