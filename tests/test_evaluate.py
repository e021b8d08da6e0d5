"""Offline evaluation: probe, kNN, feature selection, the command end to end."""
import dataclasses
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from bayesncl_jax import augment
from bayesncl_jax import config_lib
from bayesncl_jax import datasets
from bayesncl_jax import evaluate
from bayesncl_jax.evaluators import linear_probe
from bayesncl_jax import metrics
from bayesncl_jax import train

ROOT = pathlib.Path(__file__).resolve().parent.parent
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists(), reason="apt-get install -y dataset-fashion-mnist")

FAST_PROBE = linear_probe.ProbeConfig(epochs=20, batch_size=64, lr=0.1)
# The unit tests share one probe shape (N, D, C, batch, epochs): one compile.
N, D, C = 2000, 16, 10


def _blobs(rng, n, centres, noise):
  labels = rng.integers(0, centres.shape[0], n)
  return centres[labels] + noise * rng.normal(size=(n, centres.shape[1])), labels


# ----------------------------------------------------------------------------
# Linear probe.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("standardize", [True, False])
def test_linear_probe_separable_features_reach_full_accuracy(standardize):
  rng = np.random.default_rng(0)
  # 10 well-separated blobs at a large, uneven scale: only a working probe
  # (and, without standardisation, a small enough lr) gets them all right.
  centres = rng.normal(size=(C, D)) * 4.0
  centres[:, 0] *= 30.0
  x, y = _blobs(rng, N, centres, 0.3)
  xt, yt = _blobs(rng, 500, centres, 0.3)
  config = dataclasses.replace(FAST_PROBE, lr=0.1 if standardize else 1e-4,
                               standardize=standardize)
  res = linear_probe.linear_eval(x, y, xt, yt, C, config)
  assert res["top1"] >= 0.99, res
  assert res["top5"] == 1.0
  # Raw features at this scale need a small lr: slower, but converging.
  assert res["final_train_loss"] < (0.1 if standardize else 0.5)


def test_linear_probe_random_labels_stay_at_chance():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(N, D))
  y, yt = rng.integers(0, C, N), rng.integers(0, C, 1000)
  res = linear_probe.linear_eval(x, y, rng.normal(size=(1000, D)), yt, C,
                                 FAST_PROBE)
  assert res["top1"] < 0.16, res  # chance is 0.1


def test_linear_probe_uses_train_statistics_and_ignores_dead_dims():
  rng = np.random.default_rng(2)
  x = rng.normal(5.0, 2.0, (N, D))
  x[:, 3] = 0.0                                       # a dead dim.
  probe, _ = linear_probe.train_linear_probe(x, rng.integers(0, C, N), C,
                                             FAST_PROBE)
  np.testing.assert_allclose(probe.mean, x.mean(0), rtol=1e-5, atol=1e-5)
  live = np.arange(D) != 3
  np.testing.assert_allclose(probe.std[live], x[:, live].std(0), rtol=1e-4)
  assert float(probe.std[3]) == 1.0
  assert np.all(np.isfinite(np.asarray(probe.w)))


def test_linear_probe_rejects_bad_inputs():
  with pytest.raises(ValueError, match="labels"):
    linear_probe.train_linear_probe(np.zeros((4, 2)), np.array([0, 1, 2, 3]),
                                    3)
  with pytest.raises(ValueError, match="NaN"):
    linear_probe.train_linear_probe(np.full((4, 2), np.nan),
                                    np.zeros(4, int), 3)


# ----------------------------------------------------------------------------
# kNN and feature selection.
# ----------------------------------------------------------------------------
def test_knn_on_clustered_features_gives_the_known_answer():
  rng = np.random.default_rng(3)
  # 4 clusters along orthogonal directions, 30 train points each.
  centres = np.eye(4) * 10.0
  y = np.repeat(np.arange(4), 30)
  x = centres[y] + 0.1 * rng.normal(size=(120, 4))
  # 8 queries at the centres; the last 2 are given a wrong label, so the
  # known answer is top-1 = 6 / 8 exactly.
  yt = np.array([0, 1, 2, 3, 0, 1, 3, 0])
  xt = centres[np.array([0, 1, 2, 3, 0, 1, 2, 3])]
  res = metrics.knn_accuracy(x, y, xt, yt, 4, k=20, temperature=0.07)
  assert res["top1"] == pytest.approx(6 / 8)


def test_default_selection_ks():
  assert evaluate.default_selection_ks(16) == (1, 2, 4, 8, 16)
  assert evaluate.default_selection_ks(10) == (1, 2, 4, 8, 10)
  assert evaluate.default_selection_ks(1) == (1,)


def test_feature_selection_picks_the_planted_dims():
  rng = np.random.default_rng(4)
  d, n = 16, 1200
  # Classes 0, 1, 2 point in directions (6, .5), (.5, 6), (6, 6) of dims
  # (3, 11): distinct angles, so cosine retrieval separates them too. Dim 3
  # alone cannot tell class 0 from 2, so k = 1 must lose about a third.
  directions = np.array([[6.0, 0.5], [0.5, 6.0], [6.0, 6.0]])

  def features(labels):
    f = rng.uniform(0.0, 0.5, (labels.size, d))     # uninformative, small.
    f[:, [3, 11]] = directions[labels] + 0.2 * rng.normal(size=(labels.size,
                                                                2))
    return f

  y, yt = rng.integers(0, 3, n), rng.integers(0, 3, 400)
  sel = evaluate.feature_selection(features(y), y, features(yt), yt, 3,
                                   ks=(1, 2, 16), probe=FAST_PROBE)
  assert set(sel["ranking"][:2]) == {3, 11}
  curve = {p["k"]: p for p in sel["curve"]}
  assert 0.5 < curve[1]["linear_top1"] < 0.8      # one dim: 2 of 3 classes
  assert curve[2]["linear_top1"] > 0.97            # both dims: all
  assert curve[2]["retrieval_precision_at_10"] > 0.95
  assert curve[16]["linear_top1"] > 0.97
  # Zeroed columns are the same as dropped ones (see feature_selection).
  sliced = linear_probe.linear_eval(features(y)[:, sel["ranking"][:2]], y,
                                    features(yt)[:, sel["ranking"][:2]], yt,
                                    3, FAST_PROBE)
  assert abs(sliced["top1"] - curve[2]["linear_top1"]) <= 2 / 400


# ----------------------------------------------------------------------------
# The command end to end on a tiny real checkpoint.
# ----------------------------------------------------------------------------
TINY = {"optim.total_steps": 2, "optim.batch_size": 32,
        "dataset.max_train_examples": 512, "model.width": 4,
        "model.stage_sizes": (1,), "model.proj_hidden": 32,
        "model.proj_out": 16, "progress_bar": False, "log_every": 1,
        "ckpt_every": 1}


def _tiny_config(**overrides):
  return config_lib.load_file(ROOT / "configs" / "fashion_mnist.py",
                              "method=bayesncl", {**TINY, **overrides})


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tiny_bayesncl")
  train.train_and_evaluate(_tiny_config(), str(workdir))
  return workdir


@needs_fmnist
def test_evaluate_end_to_end(tiny_workdir, tmp_path):
  out_dir = tmp_path / "eval"
  options = evaluate.EvalOptions(
      max_examples=300, batch_size=64, probe=FAST_PROBE, grid_dims=4,
      grid_images=5, out_dir=str(out_dir))
  report = evaluate.evaluate(str(tiny_workdir), options)
  with open(out_dir / "report.json") as f:
    on_disk = json.load(f)
  assert on_disk == report
  assert report["method"] == "bayesncl" and report["step"] == 2
  assert report["num_train_examples"] == 300
  assert report["num_test_examples"] == 300
  for key in ("linear_top1", "linear_top5", "knn_top1", "active_dims",
              "sparsity", "semantic_consistency", "semantic_entropy",
              "effective_rank", "orthogonality", "retrieval_precision_at_10",
              "gate_open_rate", "top_activation_purity"):
    assert type(report[key]) is float, (key, report[key])  # pylint: disable=unidiomatic-typecheck
  for key in ("linear_top1", "linear_top5", "knn_top1", "sparsity",
              "semantic_consistency", "orthogonality",
              "retrieval_precision_at_10", "gate_open_rate",
              "top_activation_purity"):
    assert 0.0 <= report[key] <= 1.0, (key, report[key])
  assert report["linear_top1"] <= report["linear_top5"]
  assert 1.0 <= report["active_dims"] <= 16
  assert 0.0 <= report["semantic_entropy"] <= math.log(10) + 1e-6
  assert 1.0 <= report["effective_rank"] <= 16 + 1e-4
  curve = report["feature_selection"]
  assert [p["k"] for p in curve] == [1, 2, 4, 8, 16]
  assert all(0.0 <= p["linear_top1"] <= 1.0 for p in curve)
  assert sorted(report["feature_selection_ranking"]) == list(range(16))
  for name in ("report.md", "top_activations.png", "active_dims_hist.png",
               "feature_selection.png"):
    assert (out_dir / name).stat().st_size > 0, name
  assert "| semantic consistency |" in (out_dir / "report.md").read_text()

  # The grid's captions are the true classes of the images it shows: the
  # index bookkeeping through the sharded, padded extraction is right.
  grid = np.load(out_dir / "top_activations.npz")
  assert grid["images"].shape == (4, 5, 28, 28, 1)
  source = datasets.get_source(_tiny_config().dataset, "test")
  for idx, label, image in zip(grid["indices"].ravel(),
                               grid["labels"].ravel(),
                               grid["images"].reshape(-1, 28, 28, 1)):
    assert int(source[int(idx)]["label"]) == int(label)
    np.testing.assert_array_equal(source[int(idx)]["image"], image)


@needs_fmnist
def test_extracted_features_match_a_plain_forward(tiny_workdir):
  setup, state = evaluate.load_state(str(tiny_workdir))
  # 8 devices, batch 16, 40 examples: 3 batches, the last one padded.
  feats = evaluate.extract_features(setup, state, "test", batch_size=16,
                                    max_examples=40)
  np.testing.assert_array_equal(feats["index"], np.arange(40))
  source = datasets.get_source(setup.config.dataset, "test")
  images = np.stack([source[i]["image"] for i in range(40)])
  x = augment.normalize(images, setup.config.dataset.mean,
                        setup.config.dataset.std)
  forward = jax.jit(lambda v, x: setup.model.apply(v, x, train=False))
  out = forward({"params": jax.device_get(state.params),
                 "batch_stats": jax.device_get(state.batch_stats)}, x)
  np.testing.assert_allclose(feats["h"], out["h"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(feats["z"], out["z"], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(feats["gate_mask"], out["gate_mask"])
  np.testing.assert_array_equal(feats["label"],
                                [source[i]["label"] for i in range(40)])


@needs_fmnist
def test_missing_or_bad_checkpoint_errors_are_clear(tiny_workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match="No config.json"):
    evaluate.evaluate(str(tmp_path))
  bare = tmp_path / "bare"
  bare.mkdir()
  shutil.copy(tiny_workdir / "config.json", bare / "config.json")
  with pytest.raises(evaluate.EvaluationError, match="No checkpoints"):
    evaluate.evaluate(str(bare))
  assert not (bare / "checkpoints").exists()   # nothing created.
  with pytest.raises(evaluate.EvaluationError, match=r"step 3.*\[1, 2\]"):
    evaluate.load_state(str(tiny_workdir), step=3)
  with pytest.raises(ValueError, match="protocols"):
    evaluate.evaluate(str(tiny_workdir),
                      evaluate.EvalOptions(protocols=("linear", "nope")))

  # Every file of the step-2 state replaced by garbage.
  corrupt = tmp_path / "corrupt"
  shutil.copytree(tiny_workdir, corrupt)
  state_dir = corrupt / "checkpoints" / "2" / "state"
  for path in state_dir.rglob("*"):
    if path.is_file():
      path.write_bytes(b"not a checkpoint")
  with pytest.raises(train.CheckpointError, match="corrupt"):
    evaluate.load_state(str(corrupt), step=2)


def test_command_line_reports_a_missing_checkpoint(tmp_path):
  (tmp_path / "config.json").write_text(
      _tiny_config().to_json_best_effort())
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  proc = subprocess.run(
      [sys.executable, "-m", "bayesncl_jax.evaluate",
       f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=120)
  assert proc.returncode != 0
  assert "error: No checkpoints in" in proc.stderr
  assert "Traceback" not in proc.stderr
