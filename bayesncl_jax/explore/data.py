"""What the explorer's pages show, computed from a run's evaluation.

Everything here is numpy on host arrays of the test split, in dataset order
(row n is example n of `datasets.get_source(config.dataset, eval_split)`).
The per-dim statistics use the definitions and the activity threshold of
`bayesncl_jax.metrics` (an entry is active when |z| > metrics.ZERO_TOL; the
activation of a sample on a dim is |z|), the functions `evaluate` itself
calls, so a page's numbers agree with `eval/report.json` and
`eval/dims.npz`: e.g. the mean over active dims of `consistency` is the
report's `semantic_consistency` (papers' definition).

Workdirs are read through `bayesncl_jax.paths` (local or gs://).
"""
from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Sequence

from absl import logging
import numpy as np

from bayesncl_jax import datasets
from bayesncl_jax import integrity
from bayesncl_jax import metrics
from bayesncl_jax import paths

# Files of a run's evaluation directory (written by `bayesncl_jax.evaluate`).
REPORT_FILE = "report.json"
FEATURES_FILE = "features.npz"   # with --save_features
DIMS_FILE = "dims.npz"           # per-dim arrays of the protocols that ran


class ExploreError(ValueError):
  """The input cannot be explored; the message says why and what to run."""


# ----------------------------------------------------------------------------
# A run's inputs.
# ----------------------------------------------------------------------------
@dataclasses.dataclass
class Nuisance:
  """A nuisance label of the dataset (e.g. the background) and its dims.

  values: (N,) the label of each test image; value_names: name of each
  value. From eval/dims.npz (the `mechanism` protocol, on z before the
  gate), when it ran: class_purity, purity (D,) and is_dim (D,) bool — the
  dims more <name>-pure than class-pure, by the protocol's threshold.
  """
  name: str
  values: np.ndarray
  value_names: tuple[str, ...]
  class_purity: np.ndarray | None = None
  purity: np.ndarray | None = None
  is_dim: np.ndarray | None = None


@dataclasses.dataclass
class Run:
  """One evaluated run: config, report, history and test-split features.

  features: "z" (N, D) float32, "labels" (N,) int, optional "h" (N, d_h),
  "gate_mask" (N, D), "gate_probs" (N, D); row n = test example n.
  dims: the arrays of eval/dims.npz ({} if absent).
  """
  workdir: str
  name: str
  config: Any
  report: dict[str, Any]
  history: list[dict[str, float]]
  features: dict[str, np.ndarray]
  class_names: tuple[str, ...]
  dims: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  nuisances: list[Nuisance] = dataclasses.field(default_factory=list)

  @property
  def num_classes(self) -> int:
    return int(self.config.dataset.num_classes)

  @property
  def gated(self) -> bool:
    return "gate_mask" in self.features


def _read_json(path: str) -> Any:
  try:
    return json.loads(paths.read_text(path))
  except json.JSONDecodeError as e:
    raise ExploreError(f"{path} is not valid JSON ({e}); re-run the command "
                       "that wrote it.") from e


def _read_npz(path: str) -> dict[str, np.ndarray] | None:
  if not paths.exists(path):
    return None
  with np.load(io.BytesIO(paths.read_bytes(path))) as f:
    return {k: f[k] for k in f.files}


def read_history(workdir: str) -> list[dict[str, float]]:
  """The rows of metrics.jsonl (training curves); [] if there is none."""
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return []
  rows = []
  for line in paths.read_text(path).splitlines():
    line = line.strip()
    if line:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        # A run killed mid-write leaves a truncated last line; the rest holds.
        logging.warning("Skipping a malformed line of %s.", path)
  return rows


def check_workdir(workdir: str) -> str:
  """The eval dir of an evaluated run, or ExploreError saying why not."""
  try:
    paths.check(workdir)
  except paths.PathError as e:
    raise ExploreError(str(e)) from e
  if not paths.exists(workdir):
    raise ExploreError(f"--workdir={workdir} does not exist.")
  if not paths.exists(paths.join(workdir, "config.json")):
    raise ExploreError(f"No config.json in {workdir}: is it the workdir of a "
                       "bayesncl_jax.main run?")
  ckpt = paths.join(workdir, "checkpoints")
  # Orbax's committed steps: a gs:// step whose save never finished is none.
  if not integrity.committed_steps(ckpt):
    raise ExploreError(
        f"No checkpoint in {workdir} ({ckpt} holds no step). Pre-train "
        f"first: python -m bayesncl_jax.main --config=... --workdir={workdir}")
  eval_dir = paths.join(workdir, "eval")
  if not paths.exists(paths.join(eval_dir, REPORT_FILE)):
    raise ExploreError(
        f"No evaluation in {workdir} ({paths.join(eval_dir, REPORT_FILE)} "
        "does not exist). Evaluate first: python -m bayesncl_jax.evaluate "
        f"--workdir={workdir}")
  return eval_dir


def read_report(workdir: str) -> dict[str, Any]:
  return _read_json(paths.join(workdir, "eval", REPORT_FILE))


def compute_features(workdir: str, step: int, max_examples: int = -1,
                     batch_size: int = 512, mesh=None
                     ) -> dict[str, np.ndarray]:
  """The test-split arrays of eval/features.npz, computed from the checkpoint.

  Used when the evaluation did not save its features (evaluate without
  --save_features): the checkpoint of `step` (`evaluate.load_state`), the
  eval-mode extraction of `evaluate` on config.dataset.eval_split
  (`evaluators.features.extract_features`, the first `max_examples` if > 0)
  and the key layout of its --save_features (`features_npz`). Returns the
  test_* arrays (test_h, test_z, test_labels, test_gate_probs,
  test_gate_mask, test_<nuisance>), rows in dataset order.
  """
  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import evaluate
  from bayesncl_jax.evaluators import features as features_lib
  try:
    setup, state = evaluate.load_state(workdir, step, mesh)
  except evaluate.EvaluationError as e:
    raise ExploreError(str(e)) from e
  feats = features_lib.extract_features(
      setup, state, setup.config.dataset.eval_split, batch_size,
      max_examples)
  if not np.array_equal(feats["index"], np.arange(feats["index"].size)):
    raise ExploreError("Feature extraction did not return the first "
                       f"{feats['index'].size} test examples in order.")
  arrays = features_lib.features_npz(feats, feats)   # the test_* half
  return {k: v for k, v in arrays.items() if k.startswith("test_")}


def read_features(eval_dir: str) -> dict[str, np.ndarray] | None:
  """The test-split arrays of eval/features.npz, or None if it is absent."""
  arrays = _read_npz(paths.join(eval_dir, FEATURES_FILE))
  if arrays is None:
    return None
  return {k: v for k, v in arrays.items() if k.startswith("test_")}


def _nuisances(config, feats: dict[str, np.ndarray],
               dims: dict[str, np.ndarray]) -> list[Nuisance]:
  out = []
  for name, value_names in datasets.nuisance_labels(config.dataset).items():
    if f"test_{name}" not in feats:
      raise ExploreError(f"The features have no test_{name} (the dataset's "
                         f"{name} label); re-run evaluate --save_features.")
    nuisance = Nuisance(name, np.asarray(feats[f"test_{name}"], np.int64),
                        tuple(value_names))
    if f"is_{name}_dim" in dims:
      nuisance.class_purity = dims["class_purity_pregate"]
      nuisance.purity = dims[f"{name}_purity"]
      nuisance.is_dim = dims[f"is_{name}_dim"].astype(bool)
    out.append(nuisance)
  return out


def load_run(workdir: str, name: str | None = None, batch_size: int = 512,
             mesh=None) -> Run:
  """Reads an evaluated run; computes its features if evaluate saved none."""
  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import evaluate
  from bayesncl_jax import train
  eval_dir = check_workdir(workdir)
  config = train.load_config(workdir)
  report = read_report(workdir)
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
  n, d = features["z"].shape
  if n != report["num_test_examples"]:
    raise ExploreError(
        f"{eval_dir} is inconsistent: report.json covers "
        f"{report['num_test_examples']} test examples, the features {n}. "
        f"Re-run python -m bayesncl_jax.evaluate --workdir={workdir}")
  dims = _read_npz(paths.join(eval_dir, DIMS_FILE)) or {}
  if any(np.shape(v)[:1] != (d,) for v in dims.values()):
    raise ExploreError(f"{paths.join(eval_dir, DIMS_FILE)} does not hold one "
                       f"value per feature dim ({d}); re-run evaluate.")
  return Run(workdir=workdir, name=name or config.method, config=config,
             report=report, history=read_history(workdir),
             features=features,
             class_names=tuple(evaluate.class_names(config)), dims=dims,
             nuisances=_nuisances(config, feats, dims))


# ----------------------------------------------------------------------------
# Per-dimension statistics.
# ----------------------------------------------------------------------------
def class_counts(z: np.ndarray, labels: np.ndarray, num_classes: int
                 ) -> np.ndarray:
  """(D, C) per dim, how many of the samples that activate it (|z| >
  ZERO_TOL) have each label: the counts behind metrics.dim_purity and the
  papers' semantic consistency (`labels` may be a nuisance label)."""
  # pylint: disable-next=protected-access
  counts = metrics._class_mass(z, np.asarray(labels, np.int32),
                               metrics.ZERO_TOL, num_classes, "frequency")
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
              value_top_k: int | None = None) -> dict[str, np.ndarray]:
  """Per-dim statistics of z (N, D) with labels (N,), all (D,) unless said.

  active           some sample activates the dim (metrics.active_dims).
  class_counts     (D, C) `class_counts`.
  top_class        argmax of class_counts (-1 for an inactive dim).
  consistency      metrics.dim_purity: the share of the top class among the
                   samples that activate the dim (NaN if none); its mean
                   over active dims is the report's semantic_consistency
                   and it is dims.npz's class_purity.
  top_k_consistency  with value_top_k = k: metrics.dim_purity over the
                   dim's k largest values (dims.npz's top_k_class_purity;
                   the report's top_k_consistency is its mean).
  activation_rate  fraction of samples with |z| > ZERO_TOL.
  mean_activation  mean |z| over the samples that activate the dim (0 if
                   none).
  total_activation Σ_n |z_nd| (metrics.most_active_dims ranks by it).
  gate_open_rate   mean over samples of the eval gate mask (BayesNCL only;
                   dims.npz's gate_open_rate, the report's is its mean).
  """
  z = np.asarray(z, np.float32)
  a = np.abs(z)
  on = a > metrics.ZERO_TOL
  n_on = on.sum(0)
  counts = class_counts(z, labels, num_classes)
  totals = counts.sum(1)
  active = n_on > 0
  out = {
      "active": active,
      "class_counts": counts,
      "top_class": np.where(totals > 0, counts.argmax(1), -1),
      "consistency": metrics.dim_purity(z, labels, num_classes),
      "activation_rate": n_on / z.shape[0],
      "mean_activation": np.where(
          active, np.where(on, a, 0.0).sum(0) / np.maximum(n_on, 1), 0.0),
      "total_activation": a.sum(0, dtype=np.float64),
  }
  if value_top_k:
    out["top_k_consistency"] = metrics.dim_purity(
        z, labels, num_classes, top_k=int(value_top_k), rank_by="value")
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
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Cosine nearest neighbours on z of each query row, the query excluded.

  As the report's retrieval (`metrics.retrieval_report`): rows
  L2-normalised; an all-zero row (no |z| > ZERO_TOL) has no direction, so it
  is never a neighbour and, as a query, has none. Ties go to lower indices.
  Returns per query (neighbour rows (k',), similarities (k',)), descending,
  k' <= k.
  """
  z = np.asarray(z, np.float64)
  valid = metrics.nonzero_rows(z)
  norm = np.linalg.norm(z, axis=1, keepdims=True)
  keys = z / np.where(norm > 0, norm, 1.0)
  rows = np.asarray(rows, np.int64)
  out = []
  for start in range(0, rows.size, 256):   # 256 × N similarities at a time.
    q = rows[start:start + 256]
    sim = keys[q] @ keys.T
    sim[:, ~valid] = -np.inf
    sim[np.arange(q.size), q] = -np.inf
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    for i, row in enumerate(q):
      nb = order[i][np.isfinite(sim[i, order[i]])] if valid[row] else (
          order[i][:0])
      out.append((nb, sim[i, nb]))
  return out


def most_active_dims(z: np.ndarray) -> np.ndarray:
  """The active dims, in the order of metrics.most_active_dims (Σ|z| desc)."""
  ranking = metrics.most_active_dims(z, z.shape[1])
  active = np.abs(np.asarray(z)).max(0) > metrics.ZERO_TOL
  return ranking[active[ranking]]
