r"""First-step time of the train step, cold vs warm compilation cache.

Runs, each in a fresh process, the train step of a config (default
configs/fashion_mnist.py) once with an empty persistent compilation cache
(cold: trace + XLA compile + run, the entry written to the cache) and then
--warm_runs times with the same cache (warm: trace + load from disk + run).
Per process it prints one `JSON {...}` record: the first call's seconds
(`first_step_s`), split into trace+lower (`lower_s`) and compile-or-load
(`compile_s`), and the second call's (`second_step_s`).

  python bench/first_step.py                      # a fresh temporary cache
  python bench/first_step.py --cache=/tmp/jc --warm_runs=2

The cache is switched on the way every command does it
(`cli.enable_compilation_cache`).
"""
from __future__ import annotations

import argparse
import os
import shutil
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
  p.add_argument("--config", default="configs/fashion_mnist.py")
  p.add_argument("--cache", default="",
                 help="Cache folder (emptied first); '' = a temporary one.")
  p.add_argument("--warm_runs", type=int, default=1)
  p.add_argument("--child", choices=("cold", "warm"), default=None,
                 help=argparse.SUPPRESS)
  return p.parse_args(argv)


def child(args) -> None:
  from bayesncl_jax import cli  # pylint: disable=g-import-not-at-top
  cli.enable_compilation_cache(args.cache)
  import jax  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import config_lib, train  # pylint: disable=g-import-not-at-top

  path, _, arg = args.config.partition(":")
  config = config_lib.load_file(path, arg or None)
  setup, state, batch, rng, _ = common.synthetic_train_inputs(config)
  step = train.make_train_step(setup)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch, rng)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  t3 = time.perf_counter()
  state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  t4 = time.perf_counter()
  common.emit({"run": args.child, "config": args.config,
               "lower_s": t1 - t0, "compile_s": t2 - t1,
               "first_step_s": t3 - t0, "second_step_s": t4 - t3,
               "process_cpu_s": time.process_time()},
              f"{args.child}: first step {t3 - t0:.2f} s (trace+lower "
              f"{t1 - t0:.2f} s, compile/load {t2 - t1:.2f} s, run "
              f"{t3 - t2:.2f} s); second step {t4 - t3:.2f} s")


def main(argv=None):
  args = parse_args(argv)
  if args.child:
    child(args)
    return
  cache = args.cache or tempfile.mkdtemp(prefix="jax_cache_")
  shutil.rmtree(cache, ignore_errors=True)
  for run in ["cold"] + ["warm"] * args.warm_runs:
    subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                    run, f"--config={args.config}", f"--cache={cache}"],
                   check=True)
  if not args.cache:
    shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
  main()
