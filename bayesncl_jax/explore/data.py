"""What the explorer's pages show, computed from a run's evaluation.

Everything here is numpy on host arrays of the test split, in dataset order
(row n is example n of `datasets.get_source(config.dataset, eval_split)`).
The per-dim statistics use the definitions and the activity threshold of
`bayesncl_jax.metrics` (an entry is active when |z| > metrics.ZERO_TOL; the
activation of a sample on a dim is |z|), so a page's numbers agree with
`eval/report.json`: e.g. the mean over active dims of `consistency` is the
report's `semantic_consistency`.
"""
from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Sequence

from absl import logging
import numpy as np
from etils import epath

from bayesncl_jax import metrics

# Files of a run's evaluation directory (written by `bayesncl_jax.evaluate`).
REPORT_FILE = "report.json"
FEATURES_FILE = "features.npz"
# Per-dimension purity w.r.t. class and a nuisance (background) label, for
# datasets that have one; optional. JSON {"class_purity": [D],
# "background_purity": [D], ...} (or the same under "per_dim"), or an npz
# with those arrays.
MECHANISM_FILES = ("mechanism.json", "mechanism.npz")


class ExploreError(ValueError):
  """The input cannot be explored; the message says why and what to run."""


# ----------------------------------------------------------------------------
# A run's inputs.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """One evaluated run: config, report, history and test-split features.

  features: "z" (N, D) float32, "labels" (N,) int, optional "h" (N, d_h),
  "gate_mask" (N, D), "gate_probs" (N, D); row n = test example n.
  """
  workdir: str
  name: str
  config: Any
  report: dict[str, Any]
  history: list[dict[str, float]]
  features: dict[str, np.ndarray]
  class_names: tuple[str, ...]
  mechanism: dict[str, np.ndarray] | None = None

  @property
  def num_classes(self) -> int:
    return int(self.config.dataset.num_classes)

  @property
  def gated(self) -> bool:
    return "gate_mask" in self.features


def _read_json(path: epath.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ExploreError(f"{path} is not valid JSON ({e}); re-run the command "
                       "that wrote it.") from e


def read_history(workdir: epath.Path) -> list[dict[str, float]]:
  """The rows of metrics.jsonl (training curves); [] if there is none."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    line = line.strip()
    if line:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        # A run killed mid-write leaves a truncated last line; the rest holds.
        logging.warning("Skipping a malformed line of %s.", path)
  return rows


def check_workdir(workdir: str) -> tuple[epath.Path, epath.Path]:
  """(workdir, eval dir) of an evaluated run, or ExploreError saying why not."""
  wd = epath.Path(workdir)
  if not wd.exists():
    raise ExploreError(f"--workdir={workdir} does not exist.")
  if not (wd / "config.json").exists():
    raise ExploreError(f"No config.json in {workdir}: is it the workdir of a "
                       "bayesncl_jax.main run?")
  ckpt = wd / "checkpoints"
  if not ckpt.exists() or not any(p.name.isdigit() for p in ckpt.iterdir()):
    raise ExploreError(
        f"No checkpoint in {workdir} ({ckpt} holds no step). Pre-train "
        f"first: python -m bayesncl_jax.main --config=... --workdir={workdir}")
  eval_dir = wd / "eval"
  if not (eval_dir / REPORT_FILE).exists():
    raise ExploreError(
        f"No evaluation in {workdir} ({eval_dir / REPORT_FILE} does not "
        "exist). Evaluate first: python -m bayesncl_jax.evaluate "
        f"--workdir={workdir}")
  return wd, eval_dir


def compute_features(workdir: str, step: int, max_examples: int = -1,
                     batch_size: int = 512, mesh=None
                     ) -> dict[str, np.ndarray]:
  """The test-split arrays of eval/features.npz, computed from the checkpoint.

  Used when the evaluation did not save its features. Same forward as
  `evaluate` (eval mode, trained gate): `evaluate.load_state` +
  `evaluate.extract_features` on config.dataset.eval_split, the first
  `max_examples` examples (all if <= 0). Returns the features.npz keys
  test_h, test_z, test_labels[, test_gate_mask], rows in dataset order.
  """
  from bayesncl_jax import evaluate  # pylint: disable=g-import-not-at-top
  try:
    setup, state = evaluate.load_state(workdir, step, mesh)
  except evaluate.EvaluationError as e:
    raise ExploreError(str(e)) from e
  feats = evaluate.extract_features(setup, state,
                                    setup.config.dataset.eval_split,
                                    batch_size, max_examples)
  order = np.argsort(feats["index"], kind="stable")
  if not np.array_equal(feats["index"][order], np.arange(order.size)):
    raise ExploreError("Feature extraction did not cover the first "
                       f"{order.size} test examples exactly once.")
  out = {"test_h": feats["h"], "test_z": feats["z"],
         "test_labels": feats["label"]}
  if "gate_mask" in feats:
    out["test_gate_mask"] = feats["gate_mask"]
  return {k: np.asarray(v)[order] for k, v in out.items()}


def read_features(eval_dir: epath.Path) -> dict[str, np.ndarray] | None:
  """The test-split arrays of eval/features.npz, or None if it is absent."""
  path = eval_dir / FEATURES_FILE
  if not path.exists():
    return None
  with np.load(io.BytesIO(path.read_bytes())) as f:
    return {k: f[k] for k in f.files if k.startswith("test_")}


def read_mechanism(eval_dir: epath.Path, feature_dim: int
                   ) -> dict[str, np.ndarray] | None:
  """Per-dim class / background purity (MECHANISM_FILES), or None."""
  for name in MECHANISM_FILES:
    path = eval_dir / name
    if not path.exists():
      continue
    if name.endswith(".json"):
      data = _read_json(path)
      data = data.get("per_dim", data)
    else:
      with np.load(io.BytesIO(path.read_bytes())) as f:
        data = {k: f[k] for k in f.files}
    try:
      out = {k: np.asarray(data[k], np.float64).reshape(-1)
             for k in ("class_purity", "background_purity")}
    except KeyError as e:
      raise ExploreError(f"{path} has no per-dim {e.args[0]}; re-run "
                         "evaluate.") from e
    if any(v.size != feature_dim for v in out.values()):
      raise ExploreError(f"{path} does not hold one value per feature dim "
                         f"({feature_dim}); re-run evaluate.")
    return out
  return None


def load_run(workdir: str, name: str | None = None, batch_size: int = 512,
             mesh=None) -> Run:
  """Reads an evaluated run; computes its features if evaluate saved none."""
  from bayesncl_jax import evaluate  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import train  # pylint: disable=g-import-not-at-top
  wd, eval_dir = check_workdir(workdir)
  config = train.load_config(workdir)
  report = _read_json(eval_dir / REPORT_FILE)
  feats = read_features(eval_dir)
  if feats is None:
    max_examples = (report.get("protocol") or {}).get("max_examples", -1)
    logging.info("%s has no %s: extracting the test features of step %s.",
                 eval_dir, FEATURES_FILE, report["step"])
    feats = compute_features(workdir, report["step"], max_examples,
                             batch_size, mesh)
  features = {"z": np.asarray(feats["test_z"], np.float32),
              "labels": np.asarray(feats["test_labels"]).astype(np.int64)}
  for key in ("h", "gate_mask", "gate_probs"):
    if f"test_{key}" in feats:
      features[key] = np.asarray(feats[f"test_{key}"], np.float32)
  n = features["z"].shape[0]
  if n != report["num_test_examples"]:
    raise ExploreError(
        f"{eval_dir} is inconsistent: report.json covers "
        f"{report['num_test_examples']} test examples, the features {n}. "
        f"Re-run python -m bayesncl_jax.evaluate --workdir={workdir}")
  return Run(workdir=str(wd), name=name or config.method, config=config,
             report=report, history=read_history(wd), features=features,
             class_names=tuple(evaluate.class_names(config)),
             mechanism=read_mechanism(eval_dir, features["z"].shape[1]))


# ----------------------------------------------------------------------------
# Per-dimension statistics.
# ----------------------------------------------------------------------------
def class_counts(z: np.ndarray, labels: np.ndarray, num_classes: int,
                 top_k: int | None = None) -> np.ndarray:
  """(D, C) counts of each dim's selected samples per class (metrics' rule).

  top_k=None: the samples that activate the dim (|z| > ZERO_TOL), as
  `metrics.semantic_consistency`; top_k=K: the dim's K largest activations
  among them, as semantic_consistency(top_k=K).
  """
  # pylint: disable=protected-access
  labels = np.asarray(labels, np.int32)
  if top_k is None:
    counts = metrics._class_mass(z, labels, metrics.ZERO_TOL, num_classes,
                                 "frequency")
  else:
    counts = metrics._top_k_class_counts(z, labels, metrics.ZERO_TOL,
                                         num_classes,
                                         min(int(top_k), z.shape[0]))
  return np.rint(np.asarray(counts)).astype(np.int64)


def closed_gates(gate_mask: np.ndarray, eval_mode: str = "hard",
                 threshold: float = 0.5) -> np.ndarray:
  """(N, D) bool: the gate closed dim d for sample n.

  hard eval gate: the mask is 0 (1[p > threshold] = 0); soft eval gate (the
  mask is p itself): p <= threshold, the samples the hard gate would close.
  """
  if eval_mode == "soft":
    return gate_mask <= threshold
  return gate_mask <= metrics.ZERO_TOL


def dim_stats(z: np.ndarray, labels: np.ndarray, num_classes: int,
              gate_mask: np.ndarray | None = None,
              consistency_top_k: int | None = None) -> dict[str, np.ndarray]:
  """Per-dim statistics of z (N, D) with labels (N,), all (D,) unless said.

  active           some sample activates the dim (metrics.active_dims).
  class_counts     (D, C) `class_counts` (selected samples per class).
  top_class        argmax of class_counts (-1 for an inactive dim).
  consistency      max_c counts / Σ_c counts: the per-dim term whose mean
                   over active dims is metrics.semantic_consistency.
  activation_rate  fraction of samples with |z| > ZERO_TOL.
  mean_activation  mean |z| over the samples that activate the dim (0 if
                   none).
  total_activation Σ_n |z_nd| (metrics.most_active_dims ranks by it).
  gate_open_rate   mean over samples of the eval gate mask (BayesNCL only;
                   the mean over dims is the report's gate_open_rate).
  """
  z = np.asarray(z, np.float32)
  a = np.abs(z)
  on = a > metrics.ZERO_TOL
  n_on = on.sum(0)
  counts = class_counts(z, labels, num_classes, consistency_top_k)
  totals = counts.sum(1)
  active = n_on > 0
  out = {
      "active": active,
      "class_counts": counts,
      "top_class": np.where(totals > 0, counts.argmax(1), -1),
      "consistency": np.where(totals > 0,
                              counts.max(1) / np.maximum(totals, 1), np.nan),
      "activation_rate": n_on / z.shape[0],
      "mean_activation": np.where(
          active, np.where(on, a, 0.0).sum(0) / np.maximum(n_on, 1), 0.0),
      "total_activation": a.sum(0, dtype=np.float64),
  }
  if gate_mask is not None:
    out["gate_open_rate"] = np.asarray(gate_mask, np.float64).mean(0)
  return out


def top_images(z: np.ndarray, dims: Sequence[int], k: int
               ) -> list[np.ndarray]:
  """Per dim, the rows of its k largest activations |z[:, dim]|, descending.

  metrics.top_activating_indices (one call for all dims), each row list cut
  to the samples that activate the dim (so it may hold fewer than k).
  """
  dims = np.asarray(dims, np.int64).reshape(-1)
  if dims.size == 0:
    return []
  k = min(int(k), z.shape[0])
  rows = metrics.top_activating_indices(z, dims, k)           # (len(dims), k)
  return [r[np.abs(z[r, d]) > metrics.ZERO_TOL] for d, r in zip(dims, rows)]


def weak_images(z: np.ndarray, dim: int, k: int, seed: int = 0,
                quantile: float = 0.25) -> np.ndarray:
  """Up to k rows drawn among the weakest activators of `dim`, ascending.

  The pool: samples that activate the dim (|z| > ZERO_TOL) with |z| at or
  below the `quantile` of their activations — what the dim looks like at its
  faint end. Drawn without replacement with a fixed seed; sorted by
  activation.
  """
  a = np.abs(z[:, dim])
  on = np.flatnonzero(a > metrics.ZERO_TOL)
  if on.size == 0:
    return on
  cut = np.quantile(a[on], quantile)
  pool = on[a[on] <= cut]
  rng = np.random.default_rng(seed + dim)
  pick = rng.choice(pool, size=min(k, pool.size), replace=False)
  return pick[np.argsort(a[pick], kind="stable")]


def activation_histogram(z: np.ndarray, dim: int, bins: int = 30
                         ) -> tuple[np.ndarray, np.ndarray]:
  """(counts (bins,), edges (bins + 1,)) of |z| over the dim's activators."""
  a = np.abs(z[:, dim])
  a = a[a > metrics.ZERO_TOL]
  if a.size == 0:
    return np.zeros((bins,), np.int64), np.linspace(0.0, 1.0, bins + 1)
  hi = float(a.max())
  return np.histogram(a, bins=bins, range=(0.0, hi if hi > 0 else 1.0))


# ----------------------------------------------------------------------------
# Images.
# ----------------------------------------------------------------------------
def sample_images(labels: np.ndarray, per_class: int, num_classes: int,
                  seed: int = 0) -> np.ndarray:
  """Up to per_class rows of each class, drawn with a fixed seed, sorted."""
  rng = np.random.default_rng(seed)
  picks = []
  for c in range(num_classes):
    rows = np.flatnonzero(labels == c)
    if rows.size:
      picks.append(rng.choice(rows, size=min(per_class, rows.size),
                              replace=False))
  return np.sort(np.concatenate(picks)) if picks else np.zeros((0,), int)


def active_dims_of(z_row: np.ndarray) -> np.ndarray:
  """Dims a sample activates (|z| > ZERO_TOL), largest |z| first."""
  a = np.abs(z_row)
  dims = np.flatnonzero(a > metrics.ZERO_TOL)
  return dims[np.argsort(-a[dims], kind="stable")]


def nearest_neighbours(z: np.ndarray, rows: Sequence[int], k: int
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Cosine nearest neighbours on z of each query row, the query excluded.

  The similarity of `metrics.retrieval_precision_at_k`: rows L2-normalised,
  an all-zero row has cosine 0 to every sample. Ties go to lower indices.
  Returns (neighbour rows (Q, k), similarities (Q, k)), descending.
  """
  z = np.asarray(z, np.float64)
  norm = np.linalg.norm(z, axis=1, keepdims=True)
  keys = z / np.where(norm > 0, norm, 1.0)
  rows = np.asarray(rows, np.int64)
  k = min(int(k), z.shape[0] - 1)
  if k < 1 or rows.size == 0:
    return (np.zeros((rows.size, 0), np.int64),
            np.zeros((rows.size, 0), np.float64))
  nbrs, sims = [], []
  for start in range(0, rows.size, 256):   # 256 × N similarities at a time.
    q = rows[start:start + 256]
    sim = keys[q] @ keys.T
    sim[np.arange(q.size), q] = -np.inf
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    nbrs.append(order)
    sims.append(np.take_along_axis(sim, order, axis=1))
  return np.concatenate(nbrs), np.concatenate(sims)


def most_active_dims(z: np.ndarray) -> np.ndarray:
  """The active dims, in the order of metrics.most_active_dims (Σ|z| desc)."""
  ranking = metrics.most_active_dims(z, z.shape[1])
  active = np.abs(np.asarray(z)).max(0) > metrics.ZERO_TOL
  return ranking[active[ranking]]
