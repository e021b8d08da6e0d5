r"""What the gate costs: each variant's train-step time relative to NCL.

The BayesNCL paper reports its gate at ≤ 1.13× NCL's training time
(CIFAR-100 75.12 vs 70.95 min, ImageNet-100 218.53 vs 193.78 min). This
compiles `train.make_train_step` for NCL and for every other variant
(`bayesncl_jax.reproduce` names: the three gates, NCL+TopK, CL, the
ablations) on the same model, then times them **interleaved in one
process**: round r times `--steps_per_round` steps of every variant in turn,
so a change of machine load hits all variants alike. Each step is timed in
wall-clock time and in CPU time of this process (all its threads): on a
shared CPU, where other jobs steal cores, the CPU time is the steadier
measure of the work. Per variant it prints a `JSON {...}` record with the
median step time (wall and CPU), the ratios of medians to NCL, and the
median (min–max) over rounds of the per-round ratio to NCL.

  python bench/gate_cost.py                                  # demo model
  python bench/gate_cost.py --config=configs/cifar10.py \
      --config.optim.batch_size=16 --config.model.dtype=float32  # ResNet-18

Random uint8 views, no dataset (the lr schedule's dataset size is stubbed);
every `--config.a.b=value` flag overrides the config of all variants.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402  pylint: disable=g-import-not-at-top

DEFAULT_VARIANTS = ("ncl,bayesncl_ste,bayesncl_gumbel,bayesncl_gumbel_authors,"
                    "ncl_topk,cl")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/fashion_mnist.py")
  p.add_argument("--variants", default=DEFAULT_VARIANTS,
                 help="bayesncl_jax.reproduce variant names; ncl is the "
                      "reference and is always timed.")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps_per_round", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2,
                 help="Untimed steps per variant after compilation.")
  p.add_argument("--num_devices", type=int, default=0,
                 help="> 0: simulate this many CPU devices (sets XLA_FLAGS).")
  args, rest = p.parse_known_args(argv)
  bad = [a for a in rest if not (a.startswith("--config.") and "=" in a)]
  if bad:
    p.error(f"unrecognised arguments {bad}: only --config.FIELD=VALUE "
            "overrides are passed on.")
  args.overrides = rest
  args.variants = [v for v in args.variants.split(",") if v]
  if "ncl" not in args.variants:
    args.variants.insert(0, "ncl")
  return args


def build_step(config):
  """(compiled step, state, batch, rng, GFLOP per step) for one config."""
  from bayesncl_jax import train  # pylint: disable=g-import-not-at-top

  setup, state, batch, rng, _ = common.synthetic_train_inputs(config,
                                                               50_000)
  t0 = time.perf_counter()
  compiled = train.make_train_step(setup).lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  flops = common.xla_cost(compiled)["flops"]
  return compiled, state, batch, rng, flops, compile_s


def main(argv=None):
  args = parse_args(argv)
  if args.num_devices > 0:
    common.set_host_device_count(args.num_devices)
  from bayesncl_jax import reproduce  # pylint: disable=g-import-not-at-top

  steps = {}
  for v in args.variants:
    if v not in reproduce.ALL_VARIANTS:
      sys.exit(f"unknown variant {v!r}; choose from "
               f"{', '.join(reproduce.ALL_VARIANTS)}")
    config = reproduce.load_variant_config(args.config, v, 0, 1000,
                                           args.overrides)
    config.unlock()
    config.progress_bar = False
    compiled, state, batch, rng, flops, compile_s = build_step(config)
    holder = {"state": state}

    def run(compiled=compiled, holder=holder, batch=batch, rng=rng):
      holder["state"], metrics = compiled(holder["state"], batch, rng)
      metrics["loss"].block_until_ready()

    for _ in range(args.warmup):
      run()
    steps[v] = {"run": run, "flops": flops, "compile_s": compile_s,
                "config": config, "times": [], "round_means": [],
                "cpu_times": [], "round_cpu_means": []}

  for _ in range(args.rounds):
    for v in args.variants:
      ts, cs = [], []
      for _ in range(args.steps_per_round):
        t0, c0 = time.perf_counter(), time.process_time()
        steps[v]["run"]()
        ts.append((time.perf_counter() - t0) * 1e3)
        cs.append((time.process_time() - c0) * 1e3)
      steps[v]["times"] += ts
      steps[v]["cpu_times"] += cs
      steps[v]["round_means"].append(statistics.fmean(ts))
      steps[v]["round_cpu_means"].append(statistics.fmean(cs))

  ref = steps["ncl"]
  ref_median = statistics.median(ref["times"])
  ref_cpu_median = statistics.median(ref["cpu_times"])
  for v in args.variants:
    st = steps[v]
    median = statistics.median(st["times"])
    cpu_median = statistics.median(st["cpu_times"])
    ratios = [a / b for a, b in zip(st["round_means"], ref["round_means"])]
    cpu_ratios = [a / b for a, b in zip(st["round_cpu_means"],
                                        ref["round_cpu_means"])]
    c = st["config"]
    record = {
        "bench": "gate_cost", "variant": v,
        "config_arg": reproduce.ALL_VARIANTS[v][0],
        "config": args.config, "backbone": c.model.backbone,
        "width": c.model.width, "stage_sizes": list(c.model.stage_sizes),
        "image_size": c.dataset.image_size,
        "proj": [c.model.proj_hidden, c.model.proj_out],
        "dtype": c.model.dtype, "global_batch": c.optim.batch_size,
        "rounds": args.rounds, "steps_per_round": args.steps_per_round,
        "median_ms": median, "min_ms": min(st["times"]),
        "compile_s": st["compile_s"],
        "gflop_per_step": st["flops"] / 1e9 if st["flops"] else None,
        "ratio_of_medians_to_ncl": median / ref_median,
        "paired_ratio_to_ncl_median": statistics.median(ratios),
        "paired_ratio_to_ncl_min": min(ratios),
        "paired_ratio_to_ncl_max": max(ratios),
        "median_cpu_ms": cpu_median,
        "cpu_ratio_of_medians_to_ncl": cpu_median / ref_cpu_median,
        "paired_cpu_ratio_to_ncl_median": statistics.median(cpu_ratios),
        "paired_cpu_ratio_to_ncl_min": min(cpu_ratios),
        "paired_cpu_ratio_to_ncl_max": max(cpu_ratios)}
    gf = record["gflop_per_step"]
    common.emit(record, (
        f"{v:<26} {median:8.1f} ms/step (median of {len(st['times'])}), "
        f"{'n/a' if gf is None else f'{gf:.2f}'} GFLOP/step; vs NCL: "
        f"{record['ratio_of_medians_to_ncl']:.3f}x of medians, per-round "
        f"{record['paired_ratio_to_ncl_median']:.3f}x "
        f"({record['paired_ratio_to_ncl_min']:.3f}-"
        f"{record['paired_ratio_to_ncl_max']:.3f}); CPU "
        f"{cpu_median:.1f} ms/step, vs NCL "
        f"{record['cpu_ratio_of_medians_to_ncl']:.3f}x of medians, "
        f"per-round {record['paired_cpu_ratio_to_ncl_median']:.3f}x "
        f"({record['paired_cpu_ratio_to_ncl_min']:.3f}-"
        f"{record['paired_cpu_ratio_to_ncl_max']:.3f})"))


if __name__ == "__main__":
  main()
