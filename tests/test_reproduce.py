"""The reproduction ledger: statistics by hand, then a tiny grid end to end."""
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from bayesncl_jax import reproduce

ROOT = pathlib.Path(__file__).resolve().parent.parent
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_ledger_intervals_are_scipys(n):
  rng = np.random.default_rng(n)
  var, ncl = rng.normal(0.5, 0.1, n), rng.normal(0.45, 0.1, n)
  d = reproduce.paired_difference(dict(enumerate(var)), dict(enumerate(ncl)))
  test = stats.ttest_rel(var, ncl)
  ci = test.confidence_interval(0.95)
  assert d["ci"] == [ci.low, ci.high]
  assert d["p_value"] == test.pvalue
  # The textbook interval: mean ± t_{0.975, n-1} · sd / √n.
  diff = var - ncl
  half = stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n)
  assert d["ci"] == pytest.approx([diff.mean() - half, diff.mean() + half],
                                  abs=1e-14)


def test_student_t_table_values():
  # The 97.5% points every statistics table prints:
  # differences 0, 1, ..., n-1 give half-widths t · sd / √n.
  for n, t in ((2, 12.706), (3, 4.303), (5, 2.776), (10, 2.262)):
    diffs = np.arange(n, dtype=np.float64)
    d = reproduce.paired_difference(dict(enumerate(diffs)),
                                    dict(enumerate(np.zeros(n))))
    half = (d["ci"][1] - d["ci"][0]) / 2
    assert half / (diffs.std(ddof=1) / math.sqrt(n)) == pytest.approx(
        t, abs=5e-4)


def test_importing_the_figure_modules_keeps_the_matplotlib_backend(tmp_path):
  # A notebook's backend must survive `import bayesncl_jax...`: figures go
  # through matplotlib.figure.Figure, never matplotlib.use("Agg").
  code = (
      "import matplotlib; matplotlib.use('svg')\n"
      "from bayesncl_jax import plots, reproduce, show_augmentations, "
      "show_backgrounds\n"
      "import numpy as np\n"
      "show_backgrounds.draw(np.zeros((2, 2, 8, 8, 3), np.uint8), ['a', 'b'],"
      f" ['c', 'd'], {str(tmp_path / 'bg.png')!r})\n"
      "show_augmentations.draw(np.zeros((3, 8, 8, 1)), np.ones((3, 8, 8, 1)),"
      f" {str(tmp_path / 'aug.png')!r})\n"
      "print(matplotlib.get_backend())\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split()[-1] == "svg"
  for name in ("bg.png", "aug.png"):
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_describe_by_hand():
  d = reproduce.describe([0.5, 0.6, 0.7])
  assert d["n"] == 3 and d["mean"] == pytest.approx(0.6)
  # sqrt(((-0.1)^2 + 0 + 0.1^2) / (3 - 1)) = 0.1
  assert d["std"] == pytest.approx(0.1)
  one = reproduce.describe([0.3])
  assert one["std"] is None and one["mean"] == 0.3


def test_paired_difference_by_hand():
  ncl = {0: 0.50, 1: 0.60, 2: 0.70, 5: 0.9}
  var = {0: 0.55, 1: 0.58, 2: 0.80, 3: 0.1}
  d = reproduce.paired_difference(var, ncl)
  # Shared seeds 0, 1, 2: differences 0.05, -0.02, 0.10.
  assert d["seeds"] == [0, 1, 2] and d["n"] == 3
  mean = (0.05 - 0.02 + 0.10) / 3
  sd = math.sqrt(((0.05 - mean) ** 2 + (-0.02 - mean) ** 2
                  + (0.10 - mean) ** 2) / 2)
  half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
  assert d["mean"] == pytest.approx(mean)
  assert d["std"] == pytest.approx(sd)
  assert d["ci"] == pytest.approx([mean - half, mean + half])
  assert (d["positive"], d["negative"], d["zero"]) == (2, 1, 0)
  single = reproduce.paired_difference({0: 1.0}, {0: 1.0})
  assert single["ci"] is None and single["zero"] == 1
  assert single["p_value"] is None
  # No spread: a zero-width interval (scipy's would be nan), no p-value.
  flat = reproduce.paired_difference({0: 1.5, 1: 2.5}, {0: 1.0, 1: 2.0})
  assert flat["ci"] == [0.5, 0.5] and flat["p_value"] is None
  assert reproduce.paired_difference({1: 1.0}, {0: 1.0}) is None


# ----------------------------------------------------------------------------
# Reading reports and writing the ledger (synthetic runs).
# ----------------------------------------------------------------------------
def test_scalar_metrics_reads_whatever_the_report_has():
  report = {"method": "ncl", "step": 300, "feature_dim": 64,
            "linear_top1": 0.8, "brand_new_metric": 3, "flag": True,
            "nan_metric": float("nan"), "feature_selection": [{"k": 1}],
            "support": {"min": 2, "median": 40.5},
            "seconds": {"total": 9.0}, "protocol": {"knn": {"k": 20}}}
  assert reproduce.scalar_metrics(report) == {
      "linear_top1": 0.8, "brand_new_metric": 3.0, "support.min": 2.0,
      "support.median": 40.5}


def test_headline_order_and_topk_consistency_name():
  keys = ["sparsity", "knn_top1", "semantic_consistency", "linear_top1",
          "consistency_at_top_k", "gate_open_rate", "x"]
  assert reproduce.headline_keys(keys) == [
      ("linear_top1", "linear top-1"), ("knn_top1", "kNN top-1"),
      ("semantic_consistency", "semantic consistency"),
      ("consistency_at_top_k", "top-k consistency"),
      ("sparsity", "sparsity"), ("gate_open_rate", "gate open rate (eval, test split)")]


def test_ledger_from_synthetic_runs(tmp_path):
  results = {
      "ncl": {0: {"linear_top1": 0.80, "semantic_consistency": 0.50},
              1: {"linear_top1": 0.78, "semantic_consistency": 0.52}},
      "bayesncl_ste": {0: {"linear_top1": 0.79, "semantic_consistency": 0.55,
                           "gate_open_rate": 0.6},
                       1: {"linear_top1": 0.77, "semantic_consistency": 0.58,
                           "gate_open_rate": 0.7}}}
  ledger = reproduce.build_ledger(results, info={"config": "c.py",
                                                 "steps": 5})
  s = ledger["summary"]["bayesncl_ste"]["semantic_consistency"]
  assert s["mean"] == pytest.approx(0.565)
  assert s["std"] == pytest.approx(0.03 / math.sqrt(2))
  p = ledger["paired_vs_baseline"]["bayesncl_ste"]
  assert p["linear_top1"]["mean"] == pytest.approx(-0.01)
  assert p["linear_top1"]["negative"] == 2
  # Differences 0.05 and 0.06: mean 0.055, sd 0.00707, t_{.975,1} = 12.706.
  half = stats.t.ppf(0.975, 1) * np.std([0.05, 0.06], ddof=1) / math.sqrt(2)
  assert p["semantic_consistency"]["ci"] == pytest.approx(
      [0.055 - half, 0.055 + half])
  assert "gate_open_rate" not in p  # NCL has no gate: nothing to pair.
  assert ledger["headline"] == ["linear_top1", "semantic_consistency",
                                "gate_open_rate"]
  md = reproduce.ledger_markdown(ledger)
  assert "| bayesncl_ste | 0.7800 ± 0.0141 | 0.5650 ± 0.0212 |" in md
  assert "Paired difference to NCL" in md
  assert "-0.0100 [-0.0100, -0.0100] (0+/2−)" in md
  assert reproduce.ledger_figure(ledger, str(tmp_path / "f.png"))
  assert (tmp_path / "f.png").stat().st_size > 1000


def test_ledger_without_baseline_says_so():
  ledger = reproduce.build_ledger({"cl": {0: {"linear_top1": 0.7}}})
  assert ledger["paired_vs_baseline"] == {}
  assert "baseline `ncl` has no evaluated run" in reproduce.ledger_markdown(
      ledger)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------
def _args(*extra):
  return ["--config=configs/fashion_mnist.py", "--out=/tmp/x", *extra]


@pytest.mark.parametrize("extra,match", [
    (["--variants=ncl,bayesncl_magic"], "unknown --variants"),
    (["--seeds=0,zero"], "comma-separated integers"),
    (["--seeds=1,1"], "no repeats"),
    (["--lr=3"], "only --config.FIELD=VALUE"),
])
def test_bad_command_lines(extra, match, capsys):
  with pytest.raises(SystemExit):
    reproduce.parse_args(_args(*extra))
  assert match in capsys.readouterr().err


def test_dry_run_commands(capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  assert reproduce.main(_args(
      "--config=configs/fashion_mnist.py:top_k=4", "--seeds=3",
      "--steps=7", "--ablations", "--variants=ncl_topk", "--dry_run",
      "--config.model.width=4")) == 0
  lines = capsys.readouterr().out.splitlines()
  train = [l for l in lines if "bayesncl_jax.main" in l]
  assert len(train) == 1 + len(reproduce.ABLATIONS)
  assert ("--config=configs/fashion_mnist.py:top_k=4,method=ncl_topk "
          "--workdir=/tmp/x/ncl_topk/seed3 --config.seed=3 "
          "--config.optim.total_steps=7") in train[0]
  assert train[0].endswith("--config.model.width=4")
  assert "gate=ste,soft_gate" in train[1]


def test_invalid_variant_config_fails_before_training(tmp_path, capsys,
                                                      monkeypatch):
  monkeypatch.chdir(ROOT)
  rc = reproduce.main(["--config=configs/fashion_mnist.py",
                       f"--out={tmp_path}", "--variants=ncl_topk",
                       "--config.model.top_k=65"])
  assert rc == 2
  assert "config.model.top_k=65 must be an integer in 1..64" in (
      capsys.readouterr().err)
  assert not (tmp_path / "ncl_topk").exists()


# ----------------------------------------------------------------------------
# End to end: 2 variants x 2 seeds, a tiny model, a few steps.
# ----------------------------------------------------------------------------
TINY = ["--config.model.width=4", "--config.model.stage_sizes=(1,)",
        "--config.model.proj_hidden=32", "--config.model.proj_out=16",
        "--config.optim.batch_size=16", "--config.log_every=1",
        "--config.dataset.max_train_examples=64"]


def _reproduce(out, *extra):
  env = {**os.environ,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  cmd = [sys.executable, "-m", "bayesncl_jax.reproduce",
         "--config=configs/fashion_mnist.py", "--seeds=0,1", "--steps=2",
         f"--out={out}", "--variants=ncl,bayesncl_ste",
         f"--compilation_cache={out.parent / 'jax_cache'}",
         "--eval_flags=--max_examples=64 --linear_epochs=1", *TINY, *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(),
                    reason="apt-get install -y dataset-fashion-mnist")
def test_grid_end_to_end_skips_and_resumes(tmp_path):
  out = tmp_path / "grid"
  proc = _reproduce(out)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  ledger = json.loads((out / "ledger.json").read_text())
  assert list(ledger["summary"]) == ["ncl", "bayesncl_ste"]
  for variant in ("ncl", "bayesncl_ste"):
    for seed in (0, 1):
      run = out / variant / f"seed{seed}"
      report = json.loads((run / "eval" / "report.json").read_text())
      assert report["step"] == 2
      assert ledger["runs"][variant][str(seed)]["linear_top1"] == (
          report["linear_top1"])
      config = json.loads((run / "config.json").read_text())
      assert config["seed"] == seed and config["optim"]["total_steps"] == 2
  ste = json.loads((out / "bayesncl_ste/seed0/config.json").read_text())
  assert ste["method"] == "bayesncl" and ste["gate"]["type"] == "ste"
  s = ledger["summary"]["bayesncl_ste"]["linear_top1"]
  assert s["n"] == 2 and s["mean"] == pytest.approx(np.mean(s["values"]))
  p = ledger["paired_vs_baseline"]["bayesncl_ste"]["linear_top1"]
  base = ledger["summary"]["ncl"]["linear_top1"]["values"]
  assert p["mean"] == pytest.approx(np.mean(np.subtract(s["values"], base)))
  assert "gate_open_rate" in ledger["headline"]
  assert {"train_wall_s", "train_cpu_s", "eval_wall_s", "eval_cpu_s"} <= set(
      ledger["runs"]["ncl"]["0"])
  md = (out / "ledger.md").read_text()
  assert "| bayesncl_ste |" in md and "Paired difference to NCL" in md
  assert (out / "ledger.png").stat().st_size > 1000
  # The runs' shared compile cache.
  assert list((out.parent / "jax_cache").iterdir())

  # Interrupted after its last checkpoint (no summary, no report): only
  # that run trains (resuming) and is evaluated again.
  victim = out / "bayesncl_ste" / "seed1"
  (victim / "summary.json").unlink()
  shutil.rmtree(victim / "eval")
  proc = _reproduce(out)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "bayesncl_ste seed 1: training (resuming)" in proc.stdout
  assert proc.stdout.count("trained (skipped)") == 3
  assert proc.stdout.count("evaluated (skipped)") == 3
  assert "Resumed from" in (victim / "train.log").read_text()
  assert (victim / "eval" / "report.json").exists()

  # The same directory with another budget is refused, not mixed.
  proc = _reproduce(out, "--config.optim.base_lr=0.1")
  assert proc.returncode == 1
  assert "holds a run started with another command" in proc.stderr
