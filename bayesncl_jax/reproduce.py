r"""Reproduction ledger: every variant × seed, trained, evaluated, summarised.

  python -m bayesncl_jax.reproduce --config=configs/fashion_mnist.py \
      --seeds=0,1,2 --steps=N --out=DIR \
      [--variants=cl,ncl,ncl_topk,bayesncl_gumbel,bayesncl_ste] \
      [--ablations] [--protocols=linear,knn,interp] [--eval_flags="..."] \
      [--reevaluate] [--ledger_only] [--dry_run] [--compilation_cache=PATH] \
      [--config.a.b=value ...]

For each variant and seed, in DIR/<variant>/seed<k>/:
  1. pre-training: `python -m bayesncl_jax.main --config=CONFIG:<variant
     argument> --workdir=... --config.seed=k --config.optim.total_steps=N`
     plus every `--config.*` flag given here (the same code and checkpoints
     as a hand-run `main`; one subprocess per run, so a crash or the memory
     of one run does not take the grid down). A finished run (summary.json
     at its last step) is skipped; an interrupted one resumes from its last
     checkpoint, which `main` does by itself.
  2. evaluation: `python -m bayesncl_jax.evaluate --workdir=...
     --protocols=...` when eval/report.json is missing, belongs to another
     step, or --reevaluate is given.
Then DIR/ledger.json, DIR/ledger.md and DIR/ledger.png: mean ± std over
seeds of every scalar metric the reports hold, each variant's paired
difference to NCL over the seeds both have (mean, 95% Student-t confidence
interval, and a sign count), and consistency against linear accuracy with
one dot per seed.

Variants (`VARIANTS`): cl, ncl, ncl_topk, bayesncl_gumbel (binary Concrete,
the configs' default gate), bayesncl_ste (the gate of the paper's headline
numbers), bayesncl_gumbel_authors (the authors' single-Gumbel formula);
the default grid is the first five. `--ablations` adds the BayesNCL paper's
ablations on the STE model (`ABLATIONS`): soft gating, no gradient
isolation, 1- and 3-layer gate heads.

Runs share JAX's persistent compilation cache (the one of every command:
`cli.compilation_cache_dir`, by default ~/.cache/bayesncl_jax/
jax_compilation_cache; `--compilation_cache=DIR` moves it, `''` turns it
off), so only the first seed of a variant pays for XLA compilation. Each run directory also holds reproduce.json (the
exact commands and wall times of this driver) and train.log / eval.log
(the subprocesses' output).
The config argument after CONFIG's path is kept and the variant's
arguments are appended after it, so they win on a conflict. Runs go one at
a time on the machine's devices (one host); SIGTERM to this driver is passed
to the running `main`, which saves a checkpoint before exiting.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import stats

from bayesncl_jax import atomic

from bayesncl_jax import cli

# name -> (config argument, description); the order is the ledger's.
VARIANTS = {
    "cl": ("method=cl", "SimCLR (signed features)"),
    "ncl": ("method=ncl", "NCL (non-negative features)"),
    "ncl_topk": ("method=ncl_topk", "NCL+TopK (each sample's top-k dims of "
                 "σ+(z), config.model.top_k)"),
    "bayesncl_gumbel": ("method=bayesncl,gate=gumbel_sigmoid",
                        "BayesNCL, Gumbel-sigmoid gate (binary Concrete, "
                        "logistic noise)"),
    "bayesncl_ste": ("method=bayesncl,gate=ste", "BayesNCL, straight-through "
                     "gate (the paper's headline gate)"),
    "bayesncl_gumbel_authors": ("method=bayesncl,gate=gumbel_authors",
                                "BayesNCL, the authors' single-Gumbel gate "
                                "(opens with 1 - exp(-e^a))"),
}
DEFAULT_VARIANTS = ("cl", "ncl", "ncl_topk", "bayesncl_gumbel",
                    "bayesncl_ste")
ABLATIONS = {
    "bayesncl_ste_soft": ("method=bayesncl,gate=ste,soft_gate",
                          "ablation: STE model trained with soft gating "
                          "z ⊙ p (evaluated with the hard gate)"),
    "bayesncl_ste_no_isolation": ("method=bayesncl,gate=ste,no_isolation",
                                  "ablation: STE model, gate head on h "
                                  "(no stop-gradient)"),
    "bayesncl_ste_depth1": ("method=bayesncl,gate=ste,gate_depth=1",
                            "ablation: STE model, 1-layer gate head"),
    "bayesncl_ste_depth3": ("method=bayesncl,gate=ste,gate_depth=3",
                            "ablation: STE model, 3-layer gate head"),
}
ALL_VARIANTS = {**VARIANTS, **ABLATIONS}
BASELINE = "ncl"

# The ordered headline subset of the report's metrics, as (candidates,
# label): the first candidate key present is used. Every other scalar of
# report.json is still summarised in the full table.
HEADLINE = (
    (("linear_top1",), "linear top-1"),
    (("knn_top1",), "kNN top-1"),
    (("semantic_consistency",), "semantic consistency"),
    (("semantic_consistency_topk", "semantic_consistency_top_k",
      "topk_consistency", "top_k_consistency", "consistency_topk",
      "consistency_top_k"), "top-k consistency"),
    (("sparsity",), "sparsity"),
    (("active_dims_per_sample_mean",), "active dims / sample"),
    (("active_dims",), "active dims"),
    (("gate_open_rate",), "gate open rate (eval, test split)"),
)
# Top-level numbers of report.json that describe the run, not the features.
REPORT_META_KEYS = frozenset({
    "step", "num_train_examples", "num_test_examples", "backbone_dim",
    "feature_dim"})
# Nested parts of report.json that hold settings and timings, not metrics.
REPORT_META_DICTS = frozenset({"protocol", "seconds"})
# The driver's own measurements, added to every run's metrics.
TIMING_KEYS = ("train_wall_s", "eval_wall_s", "train_cpu_s", "eval_cpu_s")


class ReproduceError(RuntimeError):
  """The grid cannot run as asked (bad flags, a directory of another grid)."""


# ----------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------
def describe(values: Sequence[float]) -> dict[str, Any]:
  """n, mean and sample standard deviation (ddof 1; None below 2 values)."""
  x = np.asarray(values, np.float64)
  return {"n": int(x.size), "mean": float(x.mean()) if x.size else None,
          "std": float(x.std(ddof=1)) if x.size > 1 else None,
          "values": [float(v) for v in x]}


def paired_difference(values: dict[int, float], baseline: dict[int, float],
                      confidence: float = 0.95) -> dict[str, Any] | None:
  """values − baseline over the seeds both have.

  Returns n, the seeds, the mean and standard deviation of the differences,
  the two-sided Student-t confidence interval mean ± t_{(1+c)/2, n−1} ·
  std / √n and the paired t-test's two-sided p-value (scipy.stats.ttest_rel;
  both None for n < 2, the p-value also when every difference is the same),
  and the sign count (positive, negative, zero). None when no seed is shared.
  """
  seeds = sorted(set(values) & set(baseline))
  if not seeds:
    return None
  d = np.asarray([values[s] - baseline[s] for s in seeds], np.float64)
  out = {"n": len(seeds), "seeds": seeds, "mean": float(d.mean()),
         "std": float(d.std(ddof=1)) if d.size > 1 else None,
         "ci": None, "confidence": confidence,
         "positive": int((d > 0).sum()), "negative": int((d < 0).sum()),
         "zero": int((d == 0).sum())}
  out["p_value"] = None
  if d.size > 1:
    a = np.asarray([values[s] for s in seeds], np.float64)
    b = np.asarray([baseline[s] for s in seeds], np.float64)
    if out["std"] > 0:
      test = stats.ttest_rel(a, b)
      ci = test.confidence_interval(confidence)
      out["ci"] = [float(ci.low), float(ci.high)]
      out["p_value"] = float(test.pvalue)
    else:           # no spread: scipy's interval is nan, the width is 0.
      out["ci"] = [out["mean"], out["mean"]]
  return out


# ----------------------------------------------------------------------------
# The grid.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  variant: str
  seed: int
  workdir: str
  train_cmd: list[str]
  eval_cmd: list[str]


def split_config(config: str) -> tuple[str, str]:
  """'path.py:arg' -> ('path.py', 'arg'); no colon -> (config, '')."""
  path, _, arg = config.partition(":")
  return path, arg


def variant_config_flag(config: str, variant: str) -> str:
  path, arg = split_config(config)
  extra = ALL_VARIANTS[variant][0]
  return f"--config={path}:{','.join(filter(None, (arg, extra)))}"


def build_runs(args, overrides: Sequence[str]) -> list[Run]:
  runs = []
  for variant in args.variants:
    for seed in args.seeds:
      workdir = os.path.join(args.out, variant, f"seed{seed}")
      train_cmd = [sys.executable, "-m", "bayesncl_jax.main",
                   variant_config_flag(args.config, variant),
                   f"--workdir={workdir}", f"--config.seed={seed}"]
      if args.steps:
        train_cmd.append(f"--config.optim.total_steps={args.steps}")
      train_cmd += ["--config.progress_bar=False", *overrides]
      eval_cmd = [sys.executable, "-m", "bayesncl_jax.evaluate",
                  f"--workdir={workdir}", f"--protocols={args.protocols}",
                  *shlex.split(args.eval_flags)]
      runs.append(Run(variant, seed, workdir, train_cmd, eval_cmd))
  return runs


def load_variant_config(config: str, variant: str, seed: int,
                        steps: int | None, overrides: Sequence[str]):
  """The config `main` will see for this run, parsed as `main` parses it."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["reproduce", variant_config_flag(config, variant),
          f"--config.seed={seed}", *overrides]
  if steps:
    argv.append(f"--config.optim.total_steps={steps}")
  fv = flags.FlagValues()
  # sys_argv: the override flags to define are read from it (not sys.argv).
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def check_configs(args, overrides: Sequence[str]) -> None:
  """Fails before any training if a variant's config is invalid."""
  from bayesncl_jax import config_lib  # pylint: disable=g-import-not-at-top
  for variant in args.variants:
    try:
      config = load_variant_config(args.config, variant, args.seeds[0],
                                   args.steps, overrides)
      config_lib.validate(config)
    except Exception as e:  # absl / ml_collections / ConfigError alike.
      raise ReproduceError(f"Variant {variant!r} ({ALL_VARIANTS[variant][0]})"
                           f" has an invalid config: {e}") from e


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def training_done(workdir: str) -> bool:
  """summary.json of a run that reached its last step (not preempted)."""
  s = _read_json(os.path.join(workdir, "summary.json"))
  return bool(s) and not s.get("preempted") and s.get("step") == s.get(
      "total_steps")


def evaluation_done(workdir: str) -> bool:
  """eval/report.json of the run's final step."""
  r = _read_json(os.path.join(workdir, "eval", "report.json"))
  s = _read_json(os.path.join(workdir, "summary.json"))
  return bool(r) and bool(s) and r.get("step") == s.get("step")


class _Child:
  """The running subprocess, so SIGTERM can be forwarded to it."""
  proc: subprocess.Popen | None = None
  terminated = False


def _forward_sigterm(signum, frame):
  del signum, frame
  _Child.terminated = True
  if _Child.proc is not None and _Child.proc.poll() is None:
    _Child.proc.send_signal(signal.SIGTERM)


def subprocess_env(compilation_cache: str | None) -> dict[str, str]:
  """The runs' environment: ours, plus the compilation cache setting.

  compilation_cache: the --compilation_cache flag (None: the shared
  default of `cli.compilation_cache_dir`). The runs resolve it the same
  way, so seeds of one variant, which compile the same programs, share one
  cache and only the first pays for XLA compilation.
  """
  env = dict(os.environ)
  path = cli.compilation_cache_dir(compilation_cache)
  env[cli.COMPILATION_CACHE_ENV] = path or ""
  return env


def _children_cpu_s() -> float:
  ru = resource.getrusage(resource.RUSAGE_CHILDREN)
  return ru.ru_utime + ru.ru_stime


def _run_logged(cmd: list[str], log_path: str, env=None
                ) -> tuple[int, float, float]:
  """Runs cmd with its output appended to log_path.

  Returns (return code, wall seconds, CPU seconds of the subprocess): on a
  shared machine the CPU time is the steadier measure of the work.
  """
  t0, cpu0 = time.time(), _children_cpu_s()
  with open(log_path, "a") as log:
    log.write(f"\n$ {shlex.join(cmd)}\n")
    log.flush()
    _Child.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                   env=env)
    try:
      rc = _Child.proc.wait()
    finally:
      _Child.proc = None
  return rc, time.time() - t0, _children_cpu_s() - cpu0


def _tail(path: str, n: int = 30) -> str:
  try:
    with open(path) as f:
      return "".join(f.readlines()[-n:])
  except FileNotFoundError:
    return ""


def execute(run: Run, *, reevaluate: bool, log=print, env=None
            ) -> str | None:
  """Trains and evaluates one run as needed; returns an error or None."""
  os.makedirs(run.workdir, exist_ok=True)
  meta_path = os.path.join(run.workdir, "reproduce.json")
  meta = _read_json(meta_path) or {}
  # A different command in the same directory would resume a checkpoint of
  # another budget or config: refuse rather than mix two experiments.
  if meta.get("train_cmd") and meta["train_cmd"][1:] != run.train_cmd[1:]:
    return (f"{run.workdir} holds a run started with another command:\n  "
            f"{shlex.join(meta['train_cmd'][1:])}\nnot\n  "
            f"{shlex.join(run.train_cmd[1:])}\nUse another --out or delete "
            "that directory.")
  meta["train_cmd"] = run.train_cmd
  for k in TIMING_KEYS:
    meta.setdefault(k, 0.0)

  def save():
    # Atomic: a torn reproduce.json would read back as None and let the
    # "started with another command" guard above pass.
    atomic.write_text(meta_path, json.dumps(meta, indent=2))

  save()
  name = f"{run.variant} seed {run.seed}"
  if training_done(run.workdir):
    log(f"{name}: trained (skipped)")
  else:
    resumed = os.path.isdir(os.path.join(run.workdir, "checkpoints"))
    log(f"{name}: training{' (resuming)' if resumed else ''} ...")
    rc, wall, cpu = _run_logged(run.train_cmd,
                                os.path.join(run.workdir, "train.log"), env)
    meta["train_wall_s"] += wall  # summed over resumed attempts.
    meta["train_cpu_s"] += cpu
    save()
    if _Child.terminated:
      return f"{name}: stopped by SIGTERM (resume by rerunning)"
    if rc != 0 or not training_done(run.workdir):
      log_path = os.path.join(run.workdir, "train.log")
      what = (f"training failed (exit {rc})" if rc else
              "training stopped before its last step (preempted?)")
      return f"{name}: {what}; {log_path} ends with:\n{_tail(log_path)}"
    log(f"{name}: trained in {wall:.0f} s")
  if evaluation_done(run.workdir) and not reevaluate:
    log(f"{name}: evaluated (skipped)")
    return None
  log(f"{name}: evaluating ...")
  meta["eval_cmd"] = run.eval_cmd
  rc, wall, cpu = _run_logged(run.eval_cmd,
                              os.path.join(run.workdir, "eval.log"), env)
  meta["eval_wall_s"] = wall  # the wall time of the report that exists.
  meta["eval_cpu_s"] = cpu
  save()
  if _Child.terminated:
    return f"{name}: stopped by SIGTERM during evaluation"
  if rc != 0 or not evaluation_done(run.workdir):
    log_path = os.path.join(run.workdir, "eval.log")
    return (f"{name}: evaluation failed (exit {rc}); {log_path} ends "
            f"with:\n{_tail(log_path)}")
  log(f"{name}: evaluated in {wall:.0f} s")
  return None


# ----------------------------------------------------------------------------
# The ledger.
# ----------------------------------------------------------------------------
def scalar_metrics(report: dict[str, Any], prefix: str = ""
                   ) -> dict[str, float]:
  """Every finite number of a report that measures the features.

  Top-level numbers, and those of nested dicts as "outer.inner"; lists
  (curves), strings, booleans, REPORT_META_KEYS and REPORT_META_DICTS are
  left out.
  """
  out = {}
  for k, v in report.items():
    if (not prefix and (k in REPORT_META_KEYS or k in REPORT_META_DICTS)
        or isinstance(v, bool)):
      continue
    if isinstance(v, dict):
      out.update(scalar_metrics(v, f"{prefix}{k}."))
    elif isinstance(v, (int, float)) and math.isfinite(v):
      out[prefix + k] = float(v)
  return out


def collect(out_dir: str, variants: Iterable[str], seeds: Iterable[int]
            ) -> dict[str, dict[int, dict[str, float]]]:
  """variant -> seed -> metrics, for the runs that have a report."""
  results: dict[str, dict[int, dict[str, float]]] = {}
  for variant in variants:
    for seed in seeds:
      workdir = os.path.join(out_dir, variant, f"seed{seed}")
      if not evaluation_done(workdir):
        continue
      metrics = scalar_metrics(
          _read_json(os.path.join(workdir, "eval", "report.json")))
      meta = _read_json(os.path.join(workdir, "reproduce.json")) or {}
      for k in TIMING_KEYS:
        if meta.get(k):
          metrics[k] = float(meta[k])
      results.setdefault(variant, {})[seed] = metrics
  return results


def headline_keys(metric_names: Iterable[str]) -> list[tuple[str, str]]:
  """(key, label) of the HEADLINE metrics present, in order."""
  names = set(metric_names)
  out = []
  for candidates, label in HEADLINE:
    key = next((c for c in candidates if c in names), None)
    if key is None and label == "top-k consistency":
      key = next((n for n in sorted(names) if "consistency" in n
                  and re.search(r"top_?k", n)), None)
    if key is not None:
      out.append((key, label))
  return out


def build_ledger(results: dict[str, dict[int, dict[str, float]]], *,
                 baseline: str = BASELINE, info: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
  """Summary and paired differences of `collect`'s results."""
  metric_names = sorted({k for per_seed in results.values()
                         for m in per_seed.values() for k in m})
  summary, paired = {}, {}
  for variant, per_seed in results.items():
    summary[variant] = {}
    for key in metric_names:
      vals = [m[key] for _, m in sorted(per_seed.items()) if key in m]
      if vals:
        summary[variant][key] = describe(vals)
  if baseline in results:
    base = results[baseline]
    for variant, per_seed in results.items():
      if variant == baseline:
        continue
      paired[variant] = {}
      for key in metric_names:
        if key in TIMING_KEYS:
          continue
        diff = paired_difference(
            {s: m[key] for s, m in per_seed.items() if key in m},
            {s: m[key] for s, m in base.items() if key in m})
        if diff is not None:
          paired[variant][key] = diff
  return {
      **(info or {}),
      "baseline": baseline,
      "variants": {v: {"config_arg": ALL_VARIANTS[v][0],
                       "description": ALL_VARIANTS[v][1]}
                   for v in results if v in ALL_VARIANTS},
      "headline": [k for k, _ in headline_keys(metric_names)],
      "runs": {v: {str(s): m for s, m in sorted(per_seed.items())}
               for v, per_seed in results.items()},
      "summary": summary,
      "paired_vs_baseline": paired,
  }


def _fmt(x: float | None, digits: int = 4) -> str:
  return "n/a" if x is None else f"{x:.{digits}f}"


def _mean_std(d: dict[str, Any] | None) -> str:
  if not d:
    return ""
  if d["std"] is None:
    return f"{_fmt(d['mean'])} (n=1)"
  return f"{_fmt(d['mean'])} ± {_fmt(d['std'])}"


def _paired_cell(d: dict[str, Any] | None) -> str:
  if not d:
    return ""
  ci = ("" if d["ci"] is None
        else f" [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]")
  return (f"{d['mean']:+.4f}{ci} ({d['positive']}+/{d['negative']}−"
          + (f"/{d['zero']}=" if d["zero"] else "") + ")")


def ledger_markdown(ledger: dict[str, Any]) -> str:
  """ledger.json as a markdown page."""
  variants = list(ledger["summary"])
  labels = dict(headline_keys(ledger["headline"]))
  head = ledger["headline"]
  lines = ["# Reproduction ledger", ""]
  if ledger.get("command"):
    lines += ["```", ledger["command"], "```", ""]
  for key, label in (("config", "config"), ("steps", "pre-training steps"),
                     ("seeds", "seeds"), ("created", "written")):
    if ledger.get(key) is not None:
      lines.append(f"- {label}: `{ledger[key]}`")
  lines += ["", "Variants:", ""]
  for v in variants:
    info = ledger["variants"].get(v, {})
    n = max((d["n"] for d in ledger["summary"][v].values()), default=0)
    lines.append(f"- `{v}` ({n} seeds): {info.get('description', '')} — "
                 f"config argument `{info.get('config_arg', '')}`")
  lines += ["", "## Headline metrics (mean ± sample std over seeds)", "",
            "| variant | " + " | ".join(labels[k] for k in head) + " |",
            "|---|" + "---|" * len(head)]
  for v in variants:
    lines.append(f"| {v} | " + " | ".join(
        _mean_std(ledger["summary"][v].get(k)) for k in head) + " |")
  if "cl" in variants and "semantic_consistency" in head:
    lines += ["", "CL's semantic consistency is 1/C by construction (dense "
              "signed features activate every dim on every sample, so the "
              "metric is the largest class share): not comparable with the "
              "non-negative variants; read the top-k consistency instead "
              "where it is reported."]
  base = ledger["baseline"]
  paired = ledger["paired_vs_baseline"]
  if paired:
    lines += ["", f"## Paired difference to {base.upper()} (variant − "
              f"{base.upper()}, same seed)", "",
              "Mean difference over the seeds both have, its 95% Student-t "
              "confidence interval (n − 1 degrees of freedom), and how many "
              "seeds were above/below the baseline. An interval that "
              "contains 0 is no evidence of a difference.", "",
              "| variant | " + " | ".join(labels[k] for k in head) + " |",
              "|---|" + "---|" * len(head)]
    for v in paired:
      lines.append(f"| {v} | " + " | ".join(
          _paired_cell(paired[v].get(k)) for k in head) + " |")
  elif base not in ledger["summary"]:
    lines += ["", f"(No paired differences: the baseline `{base}` has no "
              "evaluated run.)"]
  all_keys = sorted({k for v in variants for k in ledger["summary"][v]})
  lines += ["", "## Every scalar metric (mean ± std)", "",
            "| metric | " + " | ".join(variants) + " |",
            "|---|" + "---|" * len(variants)]
  for k in all_keys:
    lines.append(f"| {k} | " + " | ".join(
        _mean_std(ledger["summary"][v].get(k)) for v in variants) + " |")
  lines += ["", "Per-run values: `ledger.json` (`runs`); reports: "
            "`<variant>/seed<k>/eval/report.md`. `train_wall_s` / "
            "`eval_wall_s` are this driver's wall times of the `main` and "
            "`evaluate` subprocesses (start-up and compilation included), "
            "`*_cpu_s` their CPU time (user + system)."]
  return "\n".join(lines) + "\n"


def ledger_figure(ledger: dict[str, Any], path: str) -> bool:
  """Consistency against linear accuracy, one dot per seed, mean ± std."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  head = ledger["headline"]
  x_key = "linear_top1" if "linear_top1" in head else None
  y_keys = [k for k in head if "consistency" in k]
  if x_key is None or not y_keys:
    return False
  labels = dict(headline_keys(head))
  fig = Figure(figsize=(5.2 * len(y_keys), 4.4))
  axes = fig.subplots(1, len(y_keys), squeeze=False)[0]
  colors = matplotlib.colormaps["tab10"]
  for ax, y_key in zip(axes, y_keys):
    for i, (v, per_seed) in enumerate(ledger["runs"].items()):
      pts = [(m[x_key], m[y_key]) for m in per_seed.values()
             if x_key in m and y_key in m]
      if not pts:
        continue
      xs, ys = np.asarray(pts).T
      c = colors(i % 10)
      ax.scatter(xs, ys, s=14, color=c, alpha=0.5)
      ax.errorbar(xs.mean(), ys.mean(),
                  xerr=xs.std(ddof=1) if xs.size > 1 else None,
                  yerr=ys.std(ddof=1) if ys.size > 1 else None,
                  fmt="o", ms=7, color=c, capsize=3, label=v)
    ax.set_xlabel(labels[x_key])
    ax.set_ylabel(labels[y_key])
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{ledger.get('config', '')}, {ledger.get('steps') or ''} "
               "steps: dots = seeds, markers = mean ± std", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def write_ledger(out_dir: str, variants, seeds, info) -> dict[str, Any]:
  ledger = build_ledger(collect(out_dir, variants, seeds), info=info)
  with open(os.path.join(out_dir, "ledger.json"), "w") as f:
    json.dump(ledger, f, indent=2)
  with open(os.path.join(out_dir, "ledger.md"), "w") as f:
    f.write(ledger_markdown(ledger))
  ledger_figure(ledger, os.path.join(out_dir, "ledger.png"))
  return ledger


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------
def parse_args(argv: Sequence[str]):
  p = argparse.ArgumentParser(
      prog="python -m bayesncl_jax.reproduce",
      description=__doc__.split("\n\n")[0],
      epilog="Any --config.a.b=value flag is passed to every run's `main`.")
  p.add_argument("--config", required=True,
                 help="Config file, optionally with its argument: "
                      "configs/fashion_mnist.py[:arg].")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=0,
                 help="Pre-training steps per run (config.optim.total_steps);"
                      " 0 = the config's own budget.")
  p.add_argument("--out", required=True, help="Grid directory.")
  p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                 help=f"Subset of {','.join(VARIANTS)}.")
  p.add_argument("--ablations", action="store_true",
                 help=f"Also run {','.join(ABLATIONS)}.")
  p.add_argument("--protocols", default="linear,knn,interp",
                 help="Passed to bayesncl_jax.evaluate --protocols.")
  p.add_argument("--eval_flags", default="",
                 help="More bayesncl_jax.evaluate flags, one string, e.g. "
                      "\"--linear_epochs=20 --max_examples=5000\".")
  p.add_argument("--reevaluate", action="store_true",
                 help="Evaluate again even where eval/report.json exists.")
  p.add_argument("--ledger_only", action="store_true",
                 help="Train and evaluate nothing; rebuild the ledger from "
                      "the runs in --out.")
  p.add_argument("--compilation_cache", default=None,
                 help="JAX persistent compilation cache of the runs "
                      f"(default ${cli.COMPILATION_CACHE_ENV}, else "
                      "~/.cache/bayesncl_jax/jax_compilation_cache; "
                      "'' = none).")
  p.add_argument("--dry_run", action="store_true",
                 help="Print the commands and exit.")
  args, rest = p.parse_known_args(argv)
  overrides = []
  for a in rest:
    if not (a.startswith("--config.") and "=" in a):
      p.error(f"unrecognised argument {a!r}: only --config.FIELD=VALUE "
              "overrides pass through to the runs.")
    overrides.append(a)
  try:
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    p.error(f"--seeds={args.seeds!r} must be comma-separated integers.")
  if not args.seeds or len(set(args.seeds)) != len(args.seeds):
    p.error("--seeds needs at least one seed and no repeats.")
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in ALL_VARIANTS]
  if unknown or not variants:
    p.error(f"unknown --variants {unknown}; choose from "
            f"{', '.join(ALL_VARIANTS)}.")
  if args.ablations:
    variants += [v for v in ABLATIONS if v not in variants]
  args.variants = variants
  if args.steps < 0:
    p.error("--steps must be >= 0.")
  if not os.path.exists(split_config(args.config)[0]):
    p.error(f"--config file {split_config(args.config)[0]!r} does not "
            "exist.")
  return args, overrides


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args, overrides = parse_args(argv)
  runs = build_runs(args, overrides)
  if args.dry_run:
    for run in runs:
      print(shlex.join(run.train_cmd))
      print(shlex.join(run.eval_cmd))
    return 0
  info = {"command": shlex.join(["python", "-m", "bayesncl_jax.reproduce",
                                 *argv]),
          "config": args.config, "steps": args.steps or None,
          "seeds": args.seeds, "protocols": args.protocols,
          "overrides": overrides,
          "created": time.strftime("%Y-%m-%d %H:%M:%S")}
  failures = []
  _Child.terminated = False
  if not args.ledger_only:
    try:
      check_configs(args, overrides)
    except ReproduceError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    os.makedirs(args.out, exist_ok=True)
    env = subprocess_env(args.compilation_cache)
    previous = signal.signal(signal.SIGTERM, _forward_sigterm)
    t0 = time.time()
    try:
      for i, run in enumerate(runs, 1):
        err = execute(run, reevaluate=args.reevaluate, env=env,
                      log=lambda s, i=i: print(f"[{i}/{len(runs)}] {s}",
                                               flush=True))
        if err:
          failures.append(err)
          print(f"[{i}/{len(runs)}] {err}", file=sys.stderr, flush=True)
        if _Child.terminated:
          break
    finally:
      signal.signal(signal.SIGTERM, previous)
    info["grid_wall_s"] = time.time() - t0
  os.makedirs(args.out, exist_ok=True)
  ledger = write_ledger(args.out, args.variants, args.seeds, info)
  print(ledger_markdown(ledger))
  print(f"Wrote {args.out}/ledger.json, ledger.md, ledger.png.")
  if failures:
    print(f"{len(failures)} run(s) failed; rerun the same command to "
          "retry (finished runs are skipped).", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
