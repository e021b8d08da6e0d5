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
from bayesncl_jax import input_pipeline
from bayesncl_jax import metrics
from bayesncl_jax import train
from bayesncl_jax.evaluators import base
from bayesncl_jax.evaluators import linear_probe
from bayesncl_jax.evaluators import mechanism
from bayesncl_jax.evaluators import supervised

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


@pytest.mark.slow
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


N_EVAL = 160  # examples per split in the end-to-end evaluation.


@pytest.fixture(scope="module")
def tiny_report(tiny_workdir, tmp_path_factory):
  """The default protocols + --save_features on the tiny checkpoint."""
  out_dir = tmp_path_factory.mktemp("eval")
  options = evaluate.EvalOptions(
      max_examples=N_EVAL, batch_size=64, probe=FAST_PROBE, grid_dims=4,
      grid_images=5, save_features=True, out_dir=str(out_dir))
  return evaluate.evaluate(str(tiny_workdir), options), out_dir


@pytest.mark.slow
@needs_fmnist
def test_evaluate_end_to_end(tiny_report):
  report, out_dir = tiny_report
  with open(out_dir / "report.json") as f:
    on_disk = json.load(f)
  assert on_disk == report
  assert report["method"] == "bayesncl" and report["step"] == 2
  assert report["num_train_examples"] == N_EVAL
  assert report["num_test_examples"] == N_EVAL
  for key in ("linear_top1", "linear_top5", "knn_top1", "active_dims",
              "sparsity", "semantic_consistency", "top_k_consistency",
              "semantic_entropy", "effective_rank", "orthogonality",
              "retrieval_precision_at_10", "gate_open_rate",
              "top_activation_purity"):
    assert type(report[key]) is float, (key, report[key])  # pylint: disable=unidiomatic-typecheck
  for key in ("linear_top1", "linear_top5", "knn_top1", "sparsity",
              "semantic_consistency", "top_k_consistency", "orthogonality",
              "retrieval_precision_at_10", "gate_open_rate",
              "top_activation_purity"):
    assert 0.0 <= report[key] <= 1.0, (key, report[key])
  assert report["linear_top1"] <= report["linear_top5"]
  assert 1.0 <= report["active_dims"] <= 16
  assert 0.0 <= report["semantic_entropy"] <= math.log(10) + 1e-6
  assert 1.0 <= report["effective_rank"] <= 16 + 1e-4
  assert report["top_k_consistency_k"] == 100
  assert report["feature_selection_rule"] == "ncl"
  curve = report["feature_selection"]
  assert [p["k"] for p in curve] == [1, 2, 4, 8, 16]
  assert all(0.0 <= p["linear_top1"] <= 1.0 for p in curve)
  assert sorted(report["feature_selection_ranking"]) == list(range(16))
  assert report["protocol"]["linear"]["mode"] == "features"
  assert report["protocol"]["mechanism"]["nuisance_labels"] == []
  assert "finetune_top1" not in report        # not a default protocol
  for name in ("report.md", "top_activations.png", "active_dims_hist.png",
               "feature_selection.png", "dims.npz", "features.npz"):
    assert (out_dir / name).stat().st_size > 0, name
    assert name in report["files"]
  md = (out_dir / "report.md").read_text()
  assert "| semantic consistency (papers') |" in md
  assert "rule `ncl`" in md

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


@pytest.mark.slow
@needs_fmnist
def test_report_equals_direct_calls_on_the_extracted_features(
    tiny_workdir, tiny_report):
  """Every number of the report, recomputed from features extracted anew."""
  report, out_dir = tiny_report
  setup, state = evaluate.load_state(str(tiny_workdir))
  tr = evaluate.extract_features(setup, state, "train", 64, N_EVAL)
  te = evaluate.extract_features(setup, state, "test", 64, N_EVAL)
  saved = np.load(out_dir / "features.npz")
  assert sorted(saved.files) == sorted([
      "train_h", "train_z", "train_labels", "test_h", "test_z",
      "test_labels", "test_gate_probs", "test_gate_mask"])
  for split, feats in (("train", tr), ("test", te)):
    np.testing.assert_array_equal(saved[f"{split}_h"], feats["h"])
    np.testing.assert_array_equal(saved[f"{split}_z"], feats["z"])
    np.testing.assert_array_equal(saved[f"{split}_labels"], feats["label"])
    np.testing.assert_array_equal(feats["index"], np.arange(N_EVAL))
  np.testing.assert_array_equal(saved["test_gate_probs"], te["gate_probs"])
  np.testing.assert_array_equal(saved["test_gate_mask"], te["gate_mask"])

  c = 10
  y, z = te["label"], te["z"]
  probe = linear_probe.linear_eval(tr["h"], tr["label"], te["h"], y, c,
                                   FAST_PROBE)
  assert report["linear_top1"] == probe["top1"]
  assert report["linear_train_top1"] == probe["train_top1"]
  knn = metrics.knn_accuracy(tr["h"], tr["label"], te["h"], y, c, k=20)
  assert report["knn_top1"] == knn["top1"]
  assert report["semantic_consistency"] == metrics.semantic_consistency(
      z, y, c)
  assert report["top_k_consistency"] == metrics.semantic_consistency(
      z, y, c, top_k=100, rank_by="value")
  assert report["orthogonality"] == metrics.orthogonality(z)
  assert report["disentanglement"] == _none_if_nan(
      metrics.disentanglement(z)["disentanglement"])
  support = (np.abs(z) > 1e-5).sum(0)
  assert report["dim_support_min"] == support[support > 0].min()
  assert report["dim_support_median"] == np.median(support[support > 0])
  assert report["gate_open_rate"] == pytest.approx(te["gate_mask"].mean())
  ret = metrics.retrieval_report(z, y, k=10)
  assert report["retrieval_precision_at_10"] == ret["precision"]
  assert report["retrieval_zero_rows"] == ret["zero_rows"] == int(
      np.sum(~np.any(np.abs(z) > 1e-5, axis=1)))
  # NCL's feature selection, by numpy from the train split's z_raw.
  pos = np.maximum(tr["z_raw"], 0.0)
  norms = np.linalg.norm(pos, axis=1, keepdims=True)
  scores = (pos / np.where(norms > 0, norms, 1.0)).sum(0)
  np.testing.assert_array_equal(report["feature_selection_ranking"],
                                np.argsort(-scores, kind="stable"))
  dims = np.load(out_dir / "dims.npz")
  np.testing.assert_array_equal(dims["support"], support)
  np.testing.assert_allclose(dims["gate_open_rate"], te["gate_mask"].mean(0))


def _none_if_nan(value):
  return None if math.isnan(value) else value


@pytest.mark.slow
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
  variables = {"params": jax.device_get(state.params),
               "batch_stats": jax.device_get(state.batch_stats)}
  forward = jax.jit(lambda v, x: setup.model.apply(v, x, train=False))
  out = forward(variables, x)
  np.testing.assert_allclose(feats["h"], out["h"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(feats["z"], out["z"], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(feats["gate_mask"], out["gate_mask"])
  np.testing.assert_allclose(feats["gate_probs"], out["gate_probs"],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(feats["label"],
                                [source[i]["label"] for i in range(40)])
  # z_raw: the projector's Dense layers by hand on h; z_pregate = its
  # normalised relu (rep_relu's value); z = normalize(z_pregate * mask).
  proj = variables["params"]["projector"]
  hidden = np.maximum(np.asarray(out["h"]) @ proj["Dense_0"]["kernel"]
                      + proj["Dense_0"]["bias"], 0.0)
  z_raw = hidden @ proj["Dense_1"]["kernel"] + proj["Dense_1"]["bias"]
  np.testing.assert_allclose(feats["z_raw"], z_raw, rtol=1e-4, atol=1e-5)
  pos = np.maximum(z_raw, 0.0)
  pregate = pos / np.maximum(np.linalg.norm(pos, axis=1, keepdims=True),
                             1e-12)
  np.testing.assert_allclose(feats["z_pregate"], pregate, rtol=1e-4,
                             atol=1e-5)
  gated = pregate * feats["gate_mask"]
  gated /= np.maximum(np.linalg.norm(gated, axis=1, keepdims=True), 1e-12)
  np.testing.assert_allclose(feats["z"], gated, rtol=1e-4, atol=1e-5)
  # Only what is asked for is kept (the train split keeps h, z, z_raw).
  few = evaluate.extract_features(setup, state, "test", batch_size=16,
                                  max_examples=16, keys=("h",))
  assert sorted(few) == ["h", "index", "label"]


# ----------------------------------------------------------------------------
# Augmented probe and fine-tuning: one step against a hand computation.
# ----------------------------------------------------------------------------
ONE_STEP = linear_probe.ProbeConfig(epochs=1, batch_size=32, lr=0.5,
                                    schedule="constant")


def _first_batch(setup, crop_scale):
  """The first global batch train_supervised sees, re-made from the source."""
  config = setup.config
  it = supervised.augmented_batches(config, num_examples=32, global_batch=32,
                                    epochs=1, crop_scale=crop_scale, seed=0)
  batch = next(it)
  # Epoch 0 visits the examples in default_rng([seed, 0])'s permutation;
  # example q is cropped with default_rng([seed, 0, q]).
  source = datasets.get_source(config.dataset, "train")
  perm = np.random.default_rng([0, 0]).permutation(32)
  np.testing.assert_array_equal(batch["label"],
                                [source[int(i)]["label"] for i in perm])
  for q in (0, 5):
    image = source[int(perm[q])]["image"]
    rng = np.random.default_rng([0, 0, q])
    box = input_pipeline.random_resized_crop_params(
        28, 28, crop_scale, input_pipeline.CROP_RATIO, rng)
    view = input_pipeline.resize_bicubic(image, 28, 28, box)
    if rng.random() < 0.5:
      view = view[:, ::-1]
    np.testing.assert_array_equal(batch["image"][q], view)
  return batch


def _head_step(h, labels, num_classes, lr):
  """W after one SGD step from W = 0: −lr · hᵀ(softmax(0) − onehot) / B."""
  onehot = np.eye(num_classes)[labels]
  grad_w = h.T @ (1.0 / num_classes - onehot) / h.shape[0]
  grad_b = (1.0 / num_classes - onehot).mean(0)
  return -lr * grad_w, -lr * grad_b


@pytest.mark.slow
@needs_fmnist
def test_augmented_probe_step_is_a_linear_step_on_frozen_h(tiny_workdir):
  setup, state = evaluate.load_state(str(tiny_workdir))
  result = supervised.train_supervised(setup, state, ONE_STEP, epochs=1,
                                       finetune=False, max_examples=32)
  assert result.steps == 1 and result.global_batch == 32
  batch = _first_batch(setup, (0.08, 1.0))
  x = augment.normalize(batch["image"], setup.config.dataset.mean,
                        setup.config.dataset.std)
  variables = {"params": jax.device_get(state.params),
               "batch_stats": jax.device_get(state.batch_stats)}
  h = np.asarray(setup.model.apply(variables, x, train=False)["h"])
  w, b = _head_step(h, batch["label"], 10, 0.5)
  np.testing.assert_allclose(result.head["w"], w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(result.head["b"], b, rtol=1e-5, atol=1e-7)
  # The backbone and its statistics are untouched.
  jax.tree.map(np.testing.assert_array_equal, result.params,
               variables["params"])
  jax.tree.map(np.testing.assert_array_equal, result.batch_stats,
               variables["batch_stats"])


@pytest.mark.slow
@needs_fmnist
def test_finetune_trains_the_backbone_in_train_mode(tiny_workdir):
  setup, state = evaluate.load_state(str(tiny_workdir))
  variables = {"params": jax.device_get(state.params),
               "batch_stats": jax.device_get(state.batch_stats)}
  one = supervised.train_supervised(setup, state, ONE_STEP, epochs=1,
                                    finetune=True, max_examples=32)
  batch = _first_batch(setup, (0.08, 1.0))
  x = augment.normalize(batch["image"], setup.config.dataset.mean,
                        setup.config.dataset.std)
  # Training-mode BatchNorm: batch statistics of the global batch, and the
  # running averages move.
  h, new_vars = setup.model.apply(variables, x, train=True,
                                  mutable=["batch_stats"],
                                  method=supervised.encode)
  h = np.asarray(h)
  w, _ = _head_step(h, batch["label"], 10, 0.5)
  np.testing.assert_allclose(one.head["w"], w, rtol=1e-3, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               one.batch_stats["backbone"],
               jax.device_get(new_vars["batch_stats"]["backbone"]))
  # Step 1 starts from a zero head, so no gradient reaches the backbone;
  # step 2 does.
  jax.tree.map(np.testing.assert_array_equal, one.params["backbone"],
               variables["params"]["backbone"])
  two = supervised.train_supervised(setup, state, ONE_STEP, epochs=2,
                                    finetune=True, max_examples=32)
  moved = jax.tree.leaves(jax.tree.map(
      lambda a, b: float(np.max(np.abs(a - b))), two.params["backbone"],
      variables["params"]["backbone"]))
  assert max(moved) > 0


@pytest.mark.slow
@needs_fmnist
def test_finetune_and_augmented_probe_protocols_write_their_keys(
    tiny_workdir, tmp_path):
  options = evaluate.EvalOptions(
      protocols=("finetune", "linear"), linear_probe="augmented",
      max_examples=64, batch_size=64,
      probe=dataclasses.replace(ONE_STEP, epochs=2, schedule="cosine"),
      finetune_epochs=1, out_dir=str(tmp_path))
  report = evaluate.evaluate(str(tiny_workdir), options)
  for key in ("finetune_top1", "finetune_top5", "linear_top1",
              "linear_top5"):
    assert 0.0 <= report[key] <= 1.0, key
  assert report["protocol"]["linear"]["mode"] == "augmented"
  assert report["protocol"]["finetune"]["epochs"] == 1
  assert "finetune_top1" in json.loads(
      (tmp_path / "report.json").read_text())


@pytest.mark.slow
@needs_fmnist
def test_mechanism_end_to_end_with_a_nuisance_source(tiny_workdir, tmp_path,
                                                     monkeypatch):
  """A dataset whose items carry a background label (the contract of
  datasets.nuisance_names), built here from Fashion-MNIST by index."""
  real_get_source = datasets.get_source

  class WithBackground:
    def __init__(self, source):
      self.source = source

    def __len__(self):
      return len(self.source)

    def __getitem__(self, i):
      return {**self.source[i], "background": int(i) % 3}

  monkeypatch.setattr(datasets, "get_source",
                      lambda cfg, split: WithBackground(
                          real_get_source(cfg, split)))
  monkeypatch.setattr(datasets, "nuisance_names",
                      lambda cfg: ("background",), raising=False)
  options = evaluate.EvalOptions(
      protocols=("mechanism",), max_examples=96, batch_size=32,
      probe=dataclasses.replace(FAST_PROBE, epochs=2), save_features=True,
      out_dir=str(tmp_path))
  report = evaluate.evaluate(str(tiny_workdir), options)
  saved = np.load(tmp_path / "features.npz")
  np.testing.assert_array_equal(saved["test_background"],
                                np.arange(96) % 3)
  setup, state = evaluate.load_state(str(tiny_workdir))
  te = evaluate.extract_features(setup, state, "test", 32, 96)
  tr = evaluate.extract_features(setup, state, "train", 32, 96,
                                 keys=base.TRAIN_FEATURE_KEYS)
  np.testing.assert_array_equal(te["nuisance_background"],
                                np.arange(96) % 3)
  want, arrays = mechanism.mechanism_metrics(
      tr, te, 10, "background", 1.5,
      dataclasses.replace(linear_probe.ProbeConfig(), epochs=2))
  for key, value in want.items():
    assert report[key] == _none_if_nan(value), key
  dims = np.load(tmp_path / "dims.npz")
  np.testing.assert_array_equal(dims["is_background_dim"],
                                arrays["is_background_dim"])
  md = (tmp_path / "report.md").read_text()
  assert "| background dims |" in md
  assert "on the `train` split (where the dims are chosen)" in md
  assert report["protocol"]["mechanism"]["scoring_split"] == "test"


@pytest.mark.slow
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


@pytest.mark.slow
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
