r"""Learning curve of pre-training runs: evaluate every checkpoint, tabulate, plot.

For each --workdir and each checkpoint Orbax committed there, runs

  python -m bayesncl_jax.evaluate --workdir=W --step=S --protocols=P \
      --max_examples=N --out_dir=OUT/<run>/step_<S>

(skipped when that report exists: rerun the command as the runs go on), then
writes OUT/curve.md (one row per run and checkpoint) and OUT/curve.png:

* class probe top-1 from h (the linear protocol, --max_examples train
  images, the test split);
* background probe top-1 from h and from z, background dims / active dims,
  class consistency (the mechanism protocol: dims chosen on the train split,
  scored on the test split);
* BayesNCL: the evaluation gate's open rate on the test split (all dims, and
  on background vs class dims over the samples where each dim fires) and
  the *training* gate's open rate (`gate_open_rate` of metrics.jsonl, the
  mean over the logged rows of the epoch that ends at the checkpoint).

The points of one run are checkpoints of one schedule (its learning rate has
not annealed at the intermediate ones), not separate shorter runs; the table
says so.

  python bench/learning_curve.py --workdir=RUN_NCL --workdir=RUN_STE \
      --out=docs/learning_curve
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bayesncl_jax import integrity  # noqa: E402  pylint: disable=g-import-not-at-top
from bayesncl_jax import run_record  # noqa: E402  pylint: disable=g-import-not-at-top

METRICS_FILE = "metrics.jsonl"

# (report key or callable, column title, format)
COLUMNS = [
    ("epoch", "epochs", "{:.1f}"),
    ("linear_top1", "class probe from h", "{:.3f}"),
    ("background_probe_top1_h", "background probe from h", "{:.3f}"),
    ("background_probe_top1_z", "background probe from z", "{:.3f}"),
    ("dims", "background dims / active", "{}"),
    ("class_consistency_all_dims", "class consistency", "{:.3f}"),
    ("gate_open_rate", "gate open (eval, test)", "{:.3f}"),
    ("gate_open_rate_background_dims_when_active",
     "open on background dims (eval, when active)", "{:.3f}"),
    ("gate_open_rate_class_dims_when_active",
     "open on class dims (eval, when active)", "{:.3f}"),
    ("train_gate_open_rate", "gate open (training)", "{:.3f}"),
]


def read_jsonl(path: pathlib.Path) -> list[dict]:
  rows = []
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a torn line: the row is not needed for the curve
  return rows


def run_name(workdir: pathlib.Path) -> str:
  """The folder name, reduced to a safe file name."""
  name = "".join(c if c.isalnum() or c in "-_" else "_" for c in workdir.name)
  return name or "run"


def training_rates(rows: list[dict], step: int, steps_per_epoch: float
                   ) -> tuple[float, float]:
  """(epoch at `step`, mean training gate open rate over its last epoch)."""
  epoch = float("nan")
  rates = []
  for row in rows:
    if row.get("step", 0) <= step:
      if "epoch" in row:
        epoch = float(row["epoch"])
      if "gate_open_rate" in row and row["step"] > step - steps_per_epoch:
        rates.append(float(row["gate_open_rate"]))
  return epoch, (sum(rates) / len(rates) if rates else float("nan"))


def evaluate(workdir: pathlib.Path, step: int, out_dir: pathlib.Path,
             args) -> dict:
  report = out_dir / "report.json"
  if not report.exists():
    cmd = [sys.executable, "-m", "bayesncl_jax.evaluate",
           f"--workdir={workdir}", f"--step={step}",
           f"--protocols={args.protocols}",
           f"--max_examples={args.max_examples}", f"--out_dir={out_dir}"]
    if args.trust_unsealed:
      cmd.append("--trust_unsealed")
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
  return json.loads(report.read_text())


def fmt(value, pattern: str) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "—"
  return pattern.format(value)


def collect(args) -> list[dict]:
  rows = []
  for wd in args.workdir:
    workdir = pathlib.Path(wd).resolve()
    config = json.loads((workdir / run_record.CONFIG).read_text())
    metrics = read_jsonl(workdir / METRICS_FILE)
    # Steps per epoch from the logged epochs (the dataset's size is not in
    # the config).
    logged = [r for r in metrics if r.get("epoch")]
    steps_per_epoch = (logged[-1]["step"] / logged[-1]["epoch"] if logged
                       else float("inf"))
    for step in integrity.committed_steps(workdir / "checkpoints"):
      report = evaluate(workdir, step,
                        pathlib.Path(args.out) / run_name(workdir)
                        / f"step_{step}", args)
      epoch, train_rate = training_rates(metrics, step, steps_per_epoch)
      gate = config.get("gate", {}).get("type", "")
      method = config["method"] + (f" ({gate})" if config["method"] ==
                                   "bayesncl" else "")
      active = (report.get("background_dims", 0) or 0) + (
          report.get("class_dims", 0) or 0)
      rows.append({"run": run_name(workdir), "method": method, "step": step,
                   "epoch": epoch, "train_gate_open_rate": train_rate,
                   "dims": f"{report.get('background_dims')} / {active}",
                   **{k: report.get(k) for k, _, _ in COLUMNS
                      if k not in ("epoch", "dims", "train_gate_open_rate")}})
  return rows


def table(rows: list[dict]) -> str:
  head = ["run", "method", "step"] + [title for _, title, _ in COLUMNS]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["run"], r["method"], str(r["step"])] + [
        fmt(r.get(k), f) for k, _, f in COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
  """Class probe, class consistency and (BayesNCL) the gate's open rates."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(10, 3.4))
  runs = list(dict.fromkeys(r["run"] for r in rows))

  def series(ax, run, key, **kw):
    pts = [(r["epoch"], r[key]) for r in rows if r["run"] == run
           and r.get(key) is not None and not (
               isinstance(r[key], float) and math.isnan(r[key]))]
    if pts:
      ax.plot(*zip(*pts), marker="o", markersize=3, **kw)

  for i, (key, title) in enumerate([
      ("linear_top1", "class probe from h (10k)"),
      ("class_consistency_all_dims", "class consistency (test)")]):
    ax = fig.add_subplot(1, 3, i + 1)
    for run in runs:
      series(ax, run, key, label=run)
    ax.set_title(title, fontsize=9)
  ax = fig.add_subplot(1, 3, 3)
  for run in runs:
    series(ax, run, "gate_open_rate_background_dims_when_active",
           label=f"{run}: background dims (when active)")
    series(ax, run, "gate_open_rate_class_dims_when_active", linestyle="--",
           label=f"{run}: class dims (when active)")
    series(ax, run, "train_gate_open_rate", linestyle=":",
           label=f"{run}: training gate, all dims")
  ax.set_title("gate open rate", fontsize=9)
  if ax.lines:
    ax.legend(fontsize=6)
  for ax in fig.axes:
    ax.set_xlabel("epochs", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  fig.axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", action="append", required=True,
                      help="A pre-training workdir; repeat for several runs.")
  parser.add_argument("--out", required=True,
                      help="Folder for the evaluations, curve.md, curve.png.")
  parser.add_argument("--protocols", default="linear,interp,mechanism")
  parser.add_argument("--max_examples", type=int, default=10_000)
  parser.add_argument("--trust_unsealed", action="store_true",
                      help="Pass --trust_unsealed to evaluate (checkpoints "
                      "without an integrity manifest; see the README).")
  args = parser.parse_args(argv)
  for wd in args.workdir:
    if not (pathlib.Path(wd) / run_record.CONFIG).exists():
      parser.error(f"{wd} has no {run_record.CONFIG}: not a workdir of "
                   "bayesncl_jax.main.")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows = collect(args)
  command = "python bench/learning_curve.py " + " ".join(
      f"--workdir={w}" for w in args.workdir) + f" --out={args.out}" + (
          " --trust_unsealed" if args.trust_unsealed else "")
  (out / "curve.md").write_text(
      f"Command: `{command}`\n\nCheckpoints of one schedule per run (the "
      "learning rate has not annealed at the intermediate ones).\n\n"
      + table(rows) + "\n")
  (out / "curve.json").write_text(json.dumps(rows, indent=1))
  plot(rows, out / "curve.png")
  print(table(rows))


if __name__ == "__main__":
  main()
