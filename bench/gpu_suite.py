r"""Every GPU number of bench/RESULTS.md from one command (run by bench/gpu.sh).

On a CUDA machine (jax[cuda] and a CUDA torch installed):

1. step throughput, ResNet-18 224 px bf16, global batch 256, projector
   16384 -> 2048 (configs/imagenet100.py), CL / NCL / BayesNCL: JAX
   (`step_throughput.py`) vs PyTorch eager and `torch.compile`
   (`torch_step.py`), with MFU against the GPU's dense bf16 peak and peak
   memory; each framework in its own process, so neither holds the other's
   memory;
2. the input pipeline with device crops feeding the real step, and a bf16
   training smoke of --smoke_seconds (`feed_step.py`).

It writes all records to <out>/gpu_<time>.json and appends Markdown tables
naming the GPU to --results (bench/RESULTS.md). `--tiny` runs the same on
the CPU at toy sizes (width-8 ResNet-18, 32 px, batch 8, a few steps;
BayesNCL only, torch eager only): the tests use it, so the command is known
to work before a GPU is lent.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

import common  # noqa: E402  pylint: disable=g-import-not-at-top

# Dense bf16 tensor-core peak FLOP/s of one GPU, from NVIDIA's datasheets,
# matched against the device name (first match wins). Unknown GPUs: pass
# --peak_flops, else MFU is left empty.
PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
    ("H100", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
)
RESULTS_HEADING = "## GPU runs (`bench/gpu.sh`)"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true",
                 help="Toy sizes on the CPU (what the tests run).")
  p.add_argument("--out", default=os.path.join(_HERE, "gpu_runs"),
                 help="Folder of the JSON output.")
  p.add_argument("--results", default=os.path.join(_HERE, "RESULTS.md"),
                 help="Markdown file the tables are appended to.")
  p.add_argument("--methods", default=None,
                 help="Default cl,ncl,bayesncl (--tiny: bayesncl).")
  p.add_argument("--peak_flops", type=float, default=None,
                 help="Dense bf16 peak FLOP/s of one GPU (default: from "
                 "the device name).")
  p.add_argument("--smoke_seconds", type=float, default=180.0)
  p.add_argument("--workers", type=int, default=-1,
                 help="Grain workers of the fed step; -1 = CPUs - 1.")
  p.add_argument("--torch_variants", default="eager,compile")
  p.add_argument("--skip", default="",
                 help="Comma-separated parts to skip: step, torch, feed.")
  return p.parse_args(argv)


def sizes(args) -> dict:
  """Model/batch settings of the run: the real ones or the --tiny ones."""
  if args.tiny:
    return {"image_size": 32, "batch_size": 8, "width": 8,
            "stage_sizes": "1,1,1,1", "proj_hidden": 32, "proj_out": 16,
            "steps": 2, "warmup": 1, "dtype": "bfloat16",
            "feed": ["--num_images=24", "--jpeg_size=96x72",
                     "--resize_shorter=0", "--canvas_size=96", "--steps=2",
                     "--warmup=1", "--smoke_steps=3"]}
  return {"image_size": 224, "batch_size": 256, "width": 64,
          "stage_sizes": "", "proj_hidden": 16384, "proj_out": 2048,
          "steps": 20, "warmup": 3, "dtype": "bfloat16",
          "feed": ["--num_images=1024", "--jpeg_size=500x375",
                   "--resize_shorter=256", "--canvas_size=384",
                   "--steps=30", "--warmup=5",
                   f"--smoke_seconds={args.smoke_seconds}"]}


def _python(script: str, *flags: str, timeout: float) -> list[dict]:
  """Runs bench/<script> with this Python; returns its JSON records."""
  cmd = [sys.executable, os.path.join(_HERE, script), *flags]
  print("+ " + " ".join(cmd), flush=True)
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        check=False)
  sys.stdout.write("".join(line + "\n" for line in done.stdout.splitlines()
                           if not line.startswith(common.JSON_PREFIX)))
  if done.returncode != 0:
    raise RuntimeError(f"{script} failed ({done.returncode}):\n"
                       f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
  return common.parse_records(done.stdout)


def probe_device() -> dict:
  """Backend and device name as JAX sees them, from a child process."""
  out = subprocess.run(
      [sys.executable, "-c", "import jax, json; d = jax.devices()[0]; "
       "print(json.dumps({'backend': jax.default_backend(), "
       "'device_kind': d.device_kind, 'count': jax.device_count()}))"],
      capture_output=True, text=True, check=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


def peak_flops_for(device_kind: str) -> float | None:
  for name, flops in PEAK_BF16_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def run_suite(args) -> dict:
  started = time.perf_counter()
  device = probe_device()
  if not args.tiny and device["backend"] != "gpu":
    raise SystemExit(
        f"bench/gpu.sh needs a CUDA GPU visible to JAX; JAX sees backend "
        f"{device['backend']!r} ({device['device_kind']}). Install "
        "jax[cuda] (and a CUDA torch), or run `bench/gpu.sh --tiny` for the "
        "CPU smoke version.")
  peak = args.peak_flops or (None if args.tiny
                             else peak_flops_for(device["device_kind"]))
  s = sizes(args)
  skip = set(filter(None, args.skip.split(",")))
  model = [f"--width={s['width']}", f"--stage_sizes={s['stage_sizes']}",
           f"--proj_hidden={s['proj_hidden']}",
           f"--proj_out={s['proj_out']}"]
  run = {"device": device, "peak_flops": peak, "tiny": args.tiny,
         "date": datetime.datetime.now().isoformat(timespec="seconds"),
         "step": [], "torch": [], "feed": [], "notes": []}

  if "step" not in skip:
    run["step"] = _python(
        "step_throughput.py", f"--methods={args.methods}",
        "--backbones=resnet18", f"--image_sizes={s['image_size']}",
        f"--dtypes={s['dtype']}", f"--batch_size={s['batch_size']}",
        f"--steps={s['steps']}", f"--warmup={s['warmup']}", *model,
        *([f"--peak_flops={peak}"] if peak else []), timeout=1800)

  variants = ["eager"] if args.tiny else args.torch_variants.split(",")
  if "torch" not in skip:
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      run["notes"].append("torch not importable: PyTorch rows skipped "
                          "(pip install -r requirements-bench.txt).")
      skip.add("torch")
  if "torch" not in skip:
    jax_by_method = {r["method"]: r for r in run["step"]}
    for method in args.methods.split(","):
      jr = jax_by_method.get(method, {})
      for variant in variants:
        flops = jr.get("flops_per_step_per_device")
        tr = _python(
            "torch_step.py", f"--method={method}", "--backbone=resnet18",
            f"--image_size={s['image_size']}", f"--dtype={s['dtype']}",
            f"--batch_size={s['batch_size']}", f"--variant={variant}",
            f"--steps={s['steps']}", f"--warmup={s['warmup']}", *model,
            "--num_classes=100",
            *([f"--peak_flops={peak}"] if peak else []),
            *([f"--flops_per_step={flops}"] if flops else []),
            timeout=1800)
        for r in tr:
          if jr:
            r["jax_over_torch_throughput"] = (
                jr["images_per_sec_per_device"] /
                r["images_per_sec_per_device"])
        run["torch"] += tr

  if "feed" not in skip:
    run["feed"] = _python(
        "feed_step.py", *s["feed"], f"--image_size={s['image_size']}",
        f"--batch_size={s['batch_size']}", f"--dtype={s['dtype']}",
        f"--workers={0 if args.tiny else args.workers}", *model,
        timeout=1800)
  run["wall_s"] = time.perf_counter() - started
  return run


def _fmt(x, spec=".1f", scale=1.0, suffix=""):
  return "n/a" if x is None else f"{x * scale:{spec}}{suffix}"


def markdown(run: dict) -> str:
  """The run as Markdown tables whose rows name the GPU."""
  gpu = run["device"]["device_kind"] + (" (--tiny, CPU)" if run["tiny"]
                                        else "")
  lines = [f"### {gpu}, {run['date']}", "",
           f"`bench/gpu.sh{' --tiny' if run['tiny'] else ''}`: "
           f"{run['wall_s'] / 60:.1f} min in all; peak FLOP/s for MFU: "
           f"{_fmt(run['peak_flops'], '.3g')}.", ""]
  rows = run["step"] + run["torch"]
  if rows:
    lines += ["| GPU | framework | variant | method | px | dtype | batch | "
              "ms/step | img/s | MFU | peak memory GiB | JAX ÷ this |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
      lines.append(
          f"| {gpu} | {r['framework']} | {r['variant']} | {r['method']} | "
          f"{r['image_size']} | {r['dtype']} | {r['global_batch']} | "
          f"{r['median_ms']:.1f} | {r['images_per_sec_per_device']:.1f} | "
          f"{_fmt(r.get('mfu'), '.1f', 100, '%')} | "
          f"{_fmt(r.get('peak_bytes'), '.2f', 1 / 2**30)} | "
          f"{_fmt(r.get('jax_over_torch_throughput'), '.2f', 1, '×')} |")
    lines.append("")
  feeds = [r for r in run["feed"] if r["bench"] == "feed_step"]
  smokes = [r for r in run["feed"] if r["bench"] == "train_smoke"]
  for r in feeds:
    lines += ["| GPU | pipeline | workers | batch | step alone img/s | "
              "fed img/s | fed ÷ alone |", "|---|---|---|---|---|---|---|",
              f"| {gpu} | device crops, canvas {r['canvas_size']} → "
              f"{r['image_size']} px, {r['dtype']} {r['method']} | "
              f"{r['workers']} | {r['global_batch']} | "
              f"{r['step_alone_images_per_sec']:.1f} | "
              f"{r['fed_images_per_sec']:.1f} | {r['fed_over_alone']:.2f} |",
              ""]
  for r in smokes:
    lines += ["| GPU | training smoke | steps | seconds | loss first 10% → "
              "last 10% | all finite | loss fell |",
              "|---|---|---|---|---|---|---|",
              f"| {gpu} | {r['dtype']} {r['method']} B={r['global_batch']} | "
              f"{r['steps']} | {r['seconds']:.0f} | {r['loss_first']:.4f} → "
              f"{r['loss_last']:.4f} | {r['all_finite']} | "
              f"{r['loss_fell']} |", ""]
  lines += [f"Note: {n}" for n in run["notes"]]
  return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
  args = parse_args(argv)
  if args.methods is None:
    args.methods = "bayesncl" if args.tiny else "cl,ncl,bayesncl"
  run = run_suite(args)
  os.makedirs(args.out, exist_ok=True)
  stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
  path = os.path.join(args.out, f"gpu_{stamp}.json")
  with open(path, "w") as f:
    json.dump(run, f, indent=1, default=str)
  text = markdown(run)
  existing = ""
  if os.path.exists(args.results):
    with open(args.results) as f:
      existing = f.read()
  with open(args.results, "a") as f:
    if RESULTS_HEADING not in existing:
      f.write(("\n" if existing else "") + RESULTS_HEADING + "\n\n")
    f.write("\n" + text)
  print(text)
  print(f"wrote {path}; appended to {args.results} "
        f"({run['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
  main()
