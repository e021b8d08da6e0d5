r"""The backgrounds-testbed ledger, NCL vs BayesNCL-STE at ResNet-18 width,
on one GPU in at most 8 minutes (run by bench/gpu_ledger.sh).

It runs `python -m bayesncl_jax.reproduce` on configs/fashion_mnist_backgrounds.py
as it is, with the model of configs/cifar10.py (ResNet-18: four stages of two
blocks, width 64, CIFAR stem; projector 2048 -> 256; bfloat16 compute):

  variants ncl, bayesncl_ste; seed 0; protocols linear, knn, interp,
  mechanism (evaluation on the first 10,000 examples of each split);
  --steps=1172 by default: 1172 steps of 256 images = 5.0 epochs of the
  60,000 training images (the smallest budget issue 23 calls deciding).

The budget is an estimate, not a measurement (no GPU was lent to the
session that wrote this): a step is ~1.9 TFLOP (512 views of 32 px through
ResNet-18 with the CIFAR stem, ~0.6 G multiply-adds each forward, x3 for
forward and backward), ~25-50 ms on an H100/H200 at 5-10% of its ~790
TFLOP/s bf16 rate, so 2 x 1172 steps take 1-2 minutes; compilation, the
backgrounds cache (8 s on a 2-core CPU) and the two evaluations take the
rest. The driver prints each phase's wall time (reproduce.json and the
ledger hold them); lower --steps only if a measured run does not fit.

Throughput settings that do not change what is computed: crops cut on the
device (`aug.crop_on=device`, the host sends each image once), and a single
checkpoint at the end (`ckpt_every` = the step count).

Data: there is no network on the lent machine, so the Fashion-MNIST IDX
files travel with the tree. `--stage` (here, once) copies them from
/usr/share/datasets/fashion-mnist (or --data) into .ledger_data/fashion-mnist
(git-ignored); on the GPU machine carry `.ledger_data` (the device tool's
`carry`), and the driver reads it from there.

Output: the whole grid in --out (default a fresh folder under /tmp:
checkpoints are large); ledger.json, ledger.md, ledger.png and each run's
eval/report.json (as <variant>_seed<k>_report.json) copied to --ledger
(default bench/ledgers/fashion_mnist_backgrounds_gpu).

`--tiny` runs the same on the CPU at toy sizes (a width-4 one-stage
ResNet-18, 2 steps of 16 images on 64 training images, evaluation on 64
examples); the tests run it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(_HERE)
CONFIG = "configs/fashion_mnist_backgrounds.py"
VARIANTS = ("ncl", "bayesncl_ste")
STAGED_DATA = os.path.join(REPO, ".ledger_data", "fashion-mnist")
DEBIAN_DATA = "/usr/share/datasets/fashion-mnist"
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
DEFAULT_LEDGER = os.path.join(_HERE, "ledgers",
                              "fashion_mnist_backgrounds_gpu")
# 1172 x 256 = 300,032 images = 5.0 epochs of 60,000.
DEFAULT_STEPS = 1172
BATCH = 256

# The model of configs/cifar10.py (ResNet-18 at full width, its projector,
# bfloat16), as overrides of the testbed config.
RESNET18 = {
    "model.width": 64, "model.stage_sizes": "()", "model.proj_hidden": 2048,
    "model.proj_out": 256, "model.top_k": 32, "model.dtype": "bfloat16",
}
TINY_MODEL = {
    "model.width": 4, "model.stage_sizes": "(1,)", "model.proj_hidden": 32,
    "model.proj_out": 16, "model.top_k": 2, "model.dtype": "float32",
}
EVAL_FLAGS = "--max_examples=10000"
TINY_EVAL_FLAGS = "--max_examples=64 --linear_epochs=2 --batch_size=32"
PROTOCOLS = "linear,knn,interp,mechanism"


# What `main`, `evaluate` and `reproduce` import: checked before the grid,
# so a GPU image without them fails in a second, not after compilation.
NEEDED_MODULES = ("bayesncl_jax.train", "bayesncl_jax.evaluate",
                  "bayesncl_jax.reproduce")


class LedgerError(RuntimeError):
  """The ledger cannot run as asked (no data, no GPU)."""


def check_modules(modules=NEEDED_MODULES) -> None:
  """Imports `modules`; a missing package becomes one LedgerError."""
  for module in modules:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      raise LedgerError(
          f"Python package {e.name!r} is missing (importing {module}). "
          "Install requirements.txt (and a CUDA jax); on a machine without "
          "network, bring them as wheels: 'pip download -r requirements.txt "
          "-d WHEELS' where pip can reach PyPI, then 'pip install --no-index "
          "--find-links WHEELS -r requirements.txt' there.") from None


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true",
                 help="Toy sizes on the CPU (what the tests run).")
  p.add_argument("--stage", action="store_true",
                 help="Only copy the Fashion-MNIST IDX files into "
                 ".ledger_data/fashion-mnist, to carry to the GPU machine.")
  p.add_argument("--dry_run", action="store_true",
                 help="Print the reproduce command and stop.")
  p.add_argument("--data", default=None,
                 help="Folder of the four IDX .gz files (default: "
                 ".ledger_data/fashion-mnist if staged, else "
                 f"{DEBIAN_DATA}).")
  p.add_argument("--out", default=None,
                 help="Folder of the grid (default: a new one in /tmp).")
  p.add_argument("--ledger", default=DEFAULT_LEDGER,
                 help="Folder the ledger and the reports are copied to.")
  p.add_argument("--steps", type=int, default=None,
                 help=f"Pre-training steps (default {DEFAULT_STEPS}; "
                 "--tiny: 2).")
  p.add_argument("--seeds", default="0")
  args = p.parse_args(argv)
  if args.steps is not None and args.steps < 1:
    p.error("--steps must be >= 1.")
  return args


def _has_idx(folder: str) -> bool:
  return all(os.path.isfile(os.path.join(folder, f)) for f in IDX_FILES)


def find_data(data: str | None) -> str:
  """The IDX folder to read: --data, the staged copy, or Debian's."""
  for folder in ([data] if data else [STAGED_DATA, DEBIAN_DATA]):
    if _has_idx(folder):
      return os.path.abspath(folder)
  where = data or f"{STAGED_DATA} or {DEBIAN_DATA}"
  raise LedgerError(
      f"No Fashion-MNIST IDX files ({', '.join(IDX_FILES)}) in {where}. On a "
      "machine that has them (apt-get install dataset-fashion-mnist), run "
      "'bench/gpu_ledger.sh --stage' and carry .ledger_data to the GPU "
      "machine, or pass --data=FOLDER.")


def stage(data: str | None) -> str:
  """Copies the IDX files into .ledger_data/fashion-mnist; returns it."""
  source = find_data(data)
  if os.path.abspath(source) != os.path.abspath(STAGED_DATA):
    os.makedirs(STAGED_DATA, exist_ok=True)
    for name in IDX_FILES:
      shutil.copy2(os.path.join(source, name), STAGED_DATA)
  return STAGED_DATA


def overrides(tiny: bool, steps: int, data: str, out: str) -> list[str]:
  """The --config.* flags every run of the grid gets."""
  flags = dict(TINY_MODEL if tiny else RESNET18)
  flags.update({
      "dataset.data_dir": data,
      "dataset.cache_dir": os.path.join(out, "data_cache"),
      "aug.crop_on": "device",
      "ckpt_every": steps,
  })
  if tiny:
    flags.update({"optim.batch_size": 16, "dataset.max_train_examples": 64,
                  "log_every": 1})
  else:
    flags["optim.batch_size"] = BATCH
  return [f"--config.{k}={v}" for k, v in flags.items()]


def reproduce_argv(args, data: str, out: str) -> list[str]:
  steps = args.steps or (2 if args.tiny else DEFAULT_STEPS)
  return [f"--config={CONFIG}", f"--variants={','.join(VARIANTS)}",
          f"--seeds={args.seeds}", f"--steps={steps}",
          f"--protocols={PROTOCOLS}",
          f"--eval_flags={TINY_EVAL_FLAGS if args.tiny else EVAL_FLAGS}",
          f"--out={out}", *overrides(args.tiny, steps, data, out)]


def copy_ledger(out: str, ledger: str, seeds: list[int]) -> list[str]:
  """ledger.{json,md,png} and each run's report into `ledger`."""
  os.makedirs(ledger, exist_ok=True)
  copied = []
  for name in ("ledger.json", "ledger.md", "ledger.png"):
    if os.path.exists(os.path.join(out, name)):
      shutil.copy2(os.path.join(out, name), ledger)
      copied.append(name)
  for variant in VARIANTS:
    for seed in seeds:
      report = os.path.join(out, variant, f"seed{seed}", "eval",
                            "report.json")
      if os.path.exists(report):
        name = f"{variant}_seed{seed}_report.json"
        shutil.copy2(report, os.path.join(ledger, name))
        copied.append(name)
  return copied


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    if args.stage:
      print(f"Staged the Fashion-MNIST IDX files in {stage(args.data)}; "
            "carry .ledger_data to the GPU machine.")
      return 0
    data = find_data(args.data)
    if not args.dry_run:
      check_modules()
  except LedgerError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = args.out or tempfile.mkdtemp(prefix="gpu_ledger_")
  argv = reproduce_argv(args, data, out)
  cmd = [sys.executable, "-m", "bayesncl_jax.reproduce", *argv]
  print("+ " + " ".join(cmd), flush=True)
  if args.dry_run:
    return 0
  t0 = time.time()
  rc = subprocess.call(cmd, cwd=REPO)
  wall = time.time() - t0
  seeds = [int(s) for s in args.seeds.split(",") if s]
  copied = copy_ledger(out, args.ledger, seeds)
  print(f"gpu_ledger: reproduce exited {rc} after {wall:.1f} s; copied "
        f"{', '.join(copied) or 'nothing'} to {args.ledger} (grid in {out}).",
        flush=True)
  return rc


if __name__ == "__main__":
  sys.exit(main())
