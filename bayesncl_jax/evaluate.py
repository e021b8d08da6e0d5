r"""Offline evaluation of a pre-trained checkpoint (METHOD.md §5).

  python -m bayesncl_jax.evaluate --workdir=DIR [--step=N] \
      [--protocols=linear,knn,interp,selection,retrieval,grids] \
      [--linear_epochs=50] [--knn_k=20] [--max_examples=N]

The config is the one the run saved (`DIR/config.json`); the state is the
checkpoint of `--step` (default: the latest). Outputs go to `DIR/eval/`:
report.json, report.md, top_activations.png (+ .npz), active_dims_hist.png,
feature_selection.png.

Protocols, with the authors' defects fixed:
  features   Extracted ONCE per split by a jitted eval-mode forward (BN
             running statistics, no augmentation, gate without noise at the
             *trained* temperature/threshold and `config.gate.eval_mode`),
             batch sharded over the mesh exactly as in training.
  linear     Softmax probe on the frozen backbone features h (train split),
             top-1/top-5 on the test split; SGD momentum 0.9, cosine lr,
             features standardised with train statistics (`linear_probe`).
  knn        Cosine kNN on h, votes weighted exp(s / T) (k=20, T=0.07).
  interp     `metrics.interpretability_report` of the test split's z:
             active dims, sparsity, class consistency (a fraction in [0, 1]),
             label entropies, effective rank (exp of the singular-value
             entropy), orthogonality (a scalar); plus the mean number of
             active dims per sample and, for BayesNCL, the gate open rate.
  retrieval  Cosine precision@10 on the test split's z (query excluded).
  selection  Projector dims ranked by Σ_n |z_nd| on the TRAIN split; for
             k = 1, 2, 4, …, D a linear probe on the top-k dims of z (train
             → test); with `retrieval` also precision@10 on those k dims.
  grids      For the most active test dims, the test images that activate
             each most, captioned with their classes.

Memory: features are (N, D) host arrays; no N×N matrix is formed (kNN and
retrieval map over query chunks in `metrics`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from etils import epath

from bayesncl_jax import cli
from bayesncl_jax import augment
from bayesncl_jax import datasets
from bayesncl_jax import input_pipeline
from bayesncl_jax import linear_probe
from bayesncl_jax import metrics
from bayesncl_jax import plots
from bayesncl_jax import preflight
from bayesncl_jax import sharding
from bayesncl_jax import train

ALL_PROTOCOLS = ("linear", "knn", "interp", "selection", "retrieval", "grids")
# Protocols that need the train split's features.
_NEEDS_TRAIN = ("linear", "knn", "selection")

CLASS_NAMES = {
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog",
                "frog", "horse", "ship", "truck"),
}


class EvaluationError(RuntimeError):
  """The workdir cannot be evaluated (no checkpoint, unknown step, ...)."""


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """What to evaluate and how; the defaults are the documented protocol.

  max_examples > 0 keeps only the first max_examples of each split (smoke
  runs). consistency_top_k = None: class consistency over all activating
  samples of a dim (§5); an int restricts it to each dim's top_k samples.
  selection_ks = None: 1, 2, 4, … below D, then D.
  """
  step: int | None = None
  protocols: tuple[str, ...] = ALL_PROTOCOLS
  batch_size: int = 512
  max_examples: int = -1
  probe: linear_probe.ProbeConfig = linear_probe.ProbeConfig()
  knn_k: int = 20
  knn_temperature: float = 0.07
  consistency_top_k: int | None = None
  selection_ks: tuple[int, ...] | None = None
  grid_dims: int = 10
  grid_images: int = 10
  out_dir: str | None = None  # default: workdir/eval


def class_names(config) -> tuple[str, ...]:
  """Human-readable class names of config.dataset (label i -> names[i])."""
  name = config.dataset.name
  if name in CLASS_NAMES:
    return CLASS_NAMES[name]
  if name == "imagenet100":
    return tuple(datasets.imagenet100_classes())
  return tuple(str(i) for i in range(config.dataset.num_classes))


# ----------------------------------------------------------------------------
# State.
# ----------------------------------------------------------------------------
def load_state(workdir: str, step: int | None = None, mesh=None
               ) -> tuple[train.Setup, train.TrainState]:
  """(setup, state) of the run in `workdir` at `step` (default: latest).

  Raises FileNotFoundError (no config.json), EvaluationError (no
  checkpoint, or no checkpoint of that step) or train.CheckpointError (the
  checkpoint cannot be restored: corrupt or another config).
  """
  workdir = os.fspath(workdir)
  config = train.load_config(workdir)
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  # Checked before the manager is built: it would create the folder.
  if not ckpt_dir.exists():
    raise EvaluationError(
        f"No checkpoints in {workdir} ({ckpt_dir} does not exist). Pre-train "
        "first: python -m bayesncl_jax.main --config=... --workdir="
        f"{workdir}")
  setup = train.build(config, mesh)
  mngr = train.checkpoint_manager(workdir, config)
  try:
    steps = sorted(mngr.all_steps())
    if not steps:
      raise EvaluationError(f"No checkpoint step in {ckpt_dir}: the run "
                            "saved none (or they were deleted).")
    if step is not None and step not in steps:
      raise EvaluationError(f"No checkpoint of step {step} in {ckpt_dir}; "
                            f"available steps: {steps}.")
    state = train.restore_checkpoint(mngr, setup, None, step=step,
                                     restore_data=False)
  finally:
    mngr.close()
  return setup, state


# ----------------------------------------------------------------------------
# Feature extraction.
# ----------------------------------------------------------------------------
def make_feature_fn(setup: train.Setup):
  """Jitted `(params, batch_stats, batch) -> features`, batch over `data`.

  batch: {"image": uint8 (B, S, S, C), "label", "mask", "index": (B,)}
  sharded over the mesh. Returns replicated {"h": (B, d_h), "z": (B, D),
  "label", "mask", "index"[, "gate_mask": (B, D)]}: replicated outputs are
  addressable on every host, so each process can read the whole batch.
  """
  config, model = setup.config, setup.model
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
  dtype = train.compute_dtype(config)

  def forward(params, batch_stats, batch):
    x = augment.normalize(batch["image"], mean, std, dtype)
    out = model.apply({"params": params, "batch_stats": batch_stats}, x,
                      train=False)
    feats = {"h": out["h"], "z": out["z"], "label": batch["label"],
             "mask": batch["mask"], "index": batch["index"]}
    if "gate_mask" in out:
      feats["gate_mask"] = out["gate_mask"]
    return feats

  rep = sharding.replicated(setup.mesh)
  return jax.jit(forward,
                 in_shardings=(rep, rep, sharding.batch_sharding(setup.mesh)),
                 out_shardings=rep)


def _global_eval_batch(batch_size: int, mesh) -> int:
  # A multiple of the device count (the batch is split over devices), and so
  # of the process count.
  return max(mesh.size, batch_size // mesh.size * mesh.size)


def extract_features(setup: train.Setup, state: train.TrainState, split: str,
                     batch_size: int = 512, max_examples: int = -1,
                     feature_fn=None) -> dict[str, np.ndarray]:
  """Eval-mode features of `split`, each real example exactly once.

  Returns host arrays, padding removed: h (N, d_h), z (N, D), label (N,),
  index (N,) (the example's index in `datasets.get_source(split)`) and for
  BayesNCL gate_mask (N, D). max_examples > 0 stops after the batches that
  cover that many examples and keeps the first max_examples rows.
  """
  mesh = setup.mesh
  batch_size = _global_eval_batch(batch_size, mesh)
  feature_fn = feature_fn or make_feature_fn(setup)
  n_batches = input_pipeline.num_eval_batches(setup.config, split, batch_size)
  if max_examples > 0:
    n_batches = min(n_batches, math.ceil(max_examples / batch_size))
  p, n_proc = jax.process_index(), jax.process_count()
  local = batch_size // n_proc
  it = input_pipeline.create_eval_iterator(setup.config, split, batch_size)
  chunks = []
  for b, batch in zip(range(n_batches), it):
    # Process p's position j of batch b is its example p + (b·local + j)·P
    # (EvalExample's striding); the index travels with the row.
    batch["index"] = (p + (b * local + np.arange(local)) * n_proc).astype(
        np.int32)
    out = feature_fn(state.params, state.batch_stats,
                     sharding.make_global_batch(batch, mesh))
    chunks.append(jax.device_get(out))
  del it
  feats = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
  keep = feats.pop("mask").astype(bool)
  feats = {k: v[keep] for k, v in feats.items()}
  if max_examples > 0:
    feats = {k: v[:max_examples] for k, v in feats.items()}
  return feats


# ----------------------------------------------------------------------------
# Protocols on extracted features.
# ----------------------------------------------------------------------------
def default_selection_ks(feature_dim: int) -> tuple[int, ...]:
  """1, 2, 4, … (powers of two below D), then D itself."""
  ks = [1 << i for i in range(max(feature_dim - 1, 0).bit_length())
        if 1 << i < feature_dim]
  return tuple(ks + [feature_dim])


def feature_selection(train_z, train_y, test_z, test_y, num_classes: int,
                      ks: Sequence[int] | None = None,
                      probe: linear_probe.ProbeConfig = (
                          linear_probe.ProbeConfig()),
                      retrieval: bool = True) -> dict[str, Any]:
  """NCL's feature-selection protocol.

  Dims ranked by Σ_n |train_z_nd| (metrics.most_active_dims on the TRAIN
  split: the test split chooses nothing); for each k the top-k dims of z
  feed a linear probe (train → test) and, if `retrieval`, cosine
  precision@10 on the test split.

  The k dims are kept by zeroing the other columns rather than slicing
  them: a zero input column has zero mean, unit (fallback) std and zero
  gradient, so its probe weights stay at their zero init, and it adds
  nothing to dot products or norms. The results are those of a probe /
  retrieval on the k dims alone, with one compiled shape for every k.

  train_z: (N_tr, D), test_z: (N_te, D). Returns {"ranking": (D,) dims in
  descending activation, "curve": [{"k", "linear_top1", "linear_top5"
  [, "retrieval_precision_at_10"]}, ...]}.
  """
  train_z = np.asarray(train_z, np.float32)
  test_z = np.asarray(test_z, np.float32)
  d = train_z.shape[1]
  ks = default_selection_ks(d) if ks is None else tuple(sorted(set(ks)))
  if not ks or ks[0] < 1 or ks[-1] > d:
    raise ValueError(f"selection ks must lie in [1, {d}], got {ks}")
  ranking = metrics.most_active_dims(train_z, d)
  curve = []
  for k in ks:
    keep = np.zeros((d,), np.float32)
    keep[ranking[:k]] = 1.0
    tr, te = train_z * keep, test_z * keep
    acc = linear_probe.linear_eval(tr, train_y, te, test_y, num_classes,
                                   probe)
    point = {"k": int(k), "linear_top1": acc["top1"],
             "linear_top5": acc["top5"]}
    if retrieval and te.shape[0] > 10:
      point["retrieval_precision_at_10"] = metrics.retrieval_precision_at_k(
          te, test_y, k=10)
    curve.append(point)
  return {"ranking": [int(x) for x in ranking], "curve": curve}


def top_activation_examples(config, split: str, feats: dict[str, np.ndarray],
                            n_dims: int, k: int) -> dict[str, np.ndarray]:
  """Images of the k samples activating each of the n_dims top dims most.

  Dims ranked by Σ_n |z_nd| over `feats` (only dims some sample activates);
  images re-read from the source by index and preprocessed as in
  extraction. Returns {"dims": (R,), "indices": (R, k) source indices,
  "labels": (R, k), "images": (R, k, S, S, C) uint8}, R <= n_dims.
  """
  z = feats["z"]
  n_dims = int(min(n_dims, metrics.active_dims(z)))
  k = int(min(k, z.shape[0]))
  if n_dims < 1:
    raise EvaluationError("No projector dim is active on the test split: "
                          "there is nothing to draw.")
  dims = metrics.most_active_dims(z, n_dims)
  rows = metrics.top_activating_indices(z, dims, k)            # (R, k)
  source = datasets.get_source(config.dataset, split)
  element = input_pipeline.EvalExample(
      source, 0, 1, config.dataset.image_size,
      center_crop=config.dataset.name == "imagenet100")
  indices = feats["index"][rows]
  images = np.stack([np.stack([element.map(int(i))["image"] for i in row])
                     for row in indices])
  return {"dims": np.asarray(dims), "indices": indices,
          "labels": feats["label"][rows], "images": images}


# ----------------------------------------------------------------------------
# The evaluation.
# ----------------------------------------------------------------------------
def _finite_or_none(value):
  """NaN (a metric over an empty set) becomes JSON null, not invalid 'NaN'."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _clean(obj):
  if isinstance(obj, dict):
    return {k: _clean(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_clean(v) for v in obj]
  if isinstance(obj, (np.floating, np.integer)):
    obj = obj.item()
  return _finite_or_none(obj)


def evaluate(workdir: str, options: EvalOptions = EvalOptions(), *,
             mesh=None) -> dict[str, Any]:
  """Runs the protocols on the checkpoint in `workdir`; writes the outputs.

  Returns the report (the content of report.json).
  """
  preflight.check_evaluation(workdir, train.load_config(workdir),
                             options.protocols, ALL_PROTOCOLS, _NEEDS_TRAIN,
                             options.out_dir)
  protocols = set(options.protocols)
  t0 = time.time()
  setup, state = load_state(workdir, options.step, mesh)
  config = setup.config
  num_classes = config.dataset.num_classes
  names = class_names(config)
  step = int(jax.device_get(state.step))
  out_dir = options.out_dir or os.path.join(os.fspath(workdir), "eval")
  seconds = {"restore": time.time() - t0}

  t = time.time()
  feature_fn = make_feature_fn(setup)
  test = extract_features(setup, state, config.dataset.eval_split,
                          options.batch_size, options.max_examples,
                          feature_fn)
  tr = None
  if protocols & set(_NEEDS_TRAIN):
    tr = extract_features(setup, state, config.dataset.train_split,
                          options.batch_size, options.max_examples,
                          feature_fn)
  seconds["features"] = time.time() - t
  feature_dim = int(test["z"].shape[1])
  report: dict[str, Any] = {
      "method": config.method, "step": step,
      "dataset": config.dataset.name,
      "num_train_examples": None if tr is None else int(tr["label"].size),
      "num_test_examples": int(test["label"].size),
      "backbone_dim": int(test["h"].shape[1]), "feature_dim": feature_dim,
  }

  if "linear" in protocols:
    t = time.time()
    acc = linear_probe.linear_eval(tr["h"], tr["label"], test["h"],
                                   test["label"], num_classes, options.probe)
    report.update(linear_top1=acc["top1"], linear_top5=acc["top5"],
                  linear_train_top1=acc["train_top1"])
    seconds["linear"] = time.time() - t
  if "knn" in protocols:
    t = time.time()
    knn = metrics.knn_accuracy(tr["h"], tr["label"], test["h"], test["label"],
                               num_classes, k=options.knn_k,
                               temperature=options.knn_temperature)
    report.update(knn_top1=knn["top1"], knn_top5=knn["top5"])
    seconds["knn"] = time.time() - t
  if "interp" in protocols:
    t = time.time()
    # Includes retrieval_precision_at_10 on all dims of z.
    report.update(metrics.interpretability_report(
        test["z"], test["label"], num_classes,
        top_k=options.consistency_top_k))
    per_sample = metrics.active_dims_per_sample(test["z"])
    report["active_dims_per_sample_mean"] = float(np.mean(per_sample))
    if "gate_mask" in test:
      report["gate_open_rate"] = float(np.mean(test["gate_mask"]))
    seconds["interp"] = time.time() - t
  elif "retrieval" in protocols:
    t = time.time()
    report["retrieval_precision_at_10"] = metrics.retrieval_precision_at_k(
        test["z"], test["label"], k=min(10, test["z"].shape[0] - 1))
    seconds["retrieval"] = time.time() - t
  if "selection" in protocols:
    t = time.time()
    sel = feature_selection(tr["z"], tr["label"], test["z"], test["label"],
                            num_classes, options.selection_ks, options.probe,
                            retrieval="retrieval" in protocols)
    report["feature_selection"] = sel["curve"]
    report["feature_selection_ranking"] = sel["ranking"]
    seconds["selection"] = time.time() - t
  grid = None
  if "grids" in protocols and metrics.active_dims(test["z"]) < 1:
    # Every gate closed / every unit dead: report the metrics, draw nothing.
    logging.warning("No projector dim is active on the test split: no "
                    "top-activation grid.")
  elif "grids" in protocols:
    t = time.time()
    grid = top_activation_examples(config, config.dataset.eval_split, test,
                                   options.grid_dims, options.grid_images)
    report["top_activation_purity"] = float(
        np.mean(plots.row_purity(grid["labels"])))
    seconds["grids"] = time.time() - t

  report["protocol"] = {
      "protocols": sorted(protocols),
      "max_examples": options.max_examples,
      "linear_probe": dataclasses.asdict(options.probe),
      "linear_probe_features": "h (backbone, eval mode)",
      "knn": {"k": options.knn_k, "temperature": options.knn_temperature,
              "features": "h", "similarity": "cosine"},
      "interp_features": "z of the test split (eval-mode gate)",
      "consistency_top_k": options.consistency_top_k,
      "selection_ranking": "sum |z| over the train split",
      "effective_rank": "exp(entropy of normalised singular values)",
      "semantic_entropy": "natural log (nats)",
  }
  seconds["total"] = time.time() - t0
  report["seconds"] = seconds
  report = _clean(report)
  if jax.process_index() == 0:
    write_outputs(out_dir, report, test, grid, names, feature_dim)
  return report


# ----------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------
# (key, label, how to read it) for report.md, in order.
REPORT_ROWS = (
    ("linear_top1", "linear probe top-1 (h)", "higher is better"),
    ("linear_top5", "linear probe top-5 (h)", "higher is better"),
    ("knn_top1", "kNN top-1 (h)", "higher is better"),
    ("knn_top5", "kNN top-5 (h)", "higher is better"),
    ("active_dims", "active dims of z (of feature_dim)", "dims any test "
     "sample activates"),
    ("active_dims_per_sample_mean", "active dims per sample (mean)",
     "lower = sparser"),
    ("sparsity", "sparsity", "fraction of zero entries of z"),
    ("semantic_consistency", "semantic consistency", "fraction in [0, 1], "
     "higher = more class-pure dims"),
    ("semantic_entropy", "semantic entropy (frequency)", "nats, lower = "
     "purer"),
    ("semantic_entropy_sum", "semantic entropy (sum of activations)",
     "nats"),
    ("semantic_entropy_mean", "semantic entropy (mean activation)", "nats"),
    ("effective_rank", "effective rank of z", "exp(singular-value entropy)"),
    ("orthogonality", "orthogonality (mean |C - I|)", "0 = orthogonal dims"),
    ("retrieval_precision_at_10", "retrieval precision@10 (z)",
     "higher is better"),
    ("top_activation_purity", "top-activation grid purity",
     "mean share of the top class in each grid row"),
    ("gate_open_rate", "gate open rate", "BayesNCL: mean of the eval mask"),
)


def _fmt(value) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def report_markdown(report: dict[str, Any]) -> str:
  """report.json as a readable markdown page."""
  lines = [f"# Evaluation: {report['method']} at step {report['step']}", "",
           f"Dataset `{report['dataset']}`: "
           f"{_fmt(report['num_train_examples'])} train / "
           f"{report['num_test_examples']} test examples; backbone "
           f"h has {report['backbone_dim']} dims, projector z "
           f"{report['feature_dim']}.", "",
           "| metric | value | note |", "|---|---|---|"]
  for key, label, note in REPORT_ROWS:
    if key in report:
      lines.append(f"| {label} | {_fmt(report[key])} | {note} |")
  if report.get("feature_selection"):
    curve = report["feature_selection"]
    has_ret = "retrieval_precision_at_10" in curve[0]
    lines += ["", "## Feature selection (dims ranked on the train split)", "",
              "| k | linear top-1 | linear top-5 |"
              + (" retrieval P@10 |" if has_ret else ""),
              "|---|---|---|" + ("---|" if has_ret else "")]
    for p in curve:
      lines.append(f"| {p['k']} | {_fmt(p['linear_top1'])} | "
                   f"{_fmt(p['linear_top5'])} |"
                   + (f" {_fmt(p['retrieval_precision_at_10'])} |"
                      if has_ret else ""))
  probe = report["protocol"]["linear_probe"]
  lines += ["", "## Protocol", "",
            f"- linear probe on frozen h: SGD momentum {probe['momentum']}, "
            f"lr {probe['lr']} (cosine), batch {probe['batch_size']}, "
            f"{probe['epochs']} epochs, weight decay {probe['weight_decay']},"
            f" features {'standardised (train mean/std)' if probe['standardize'] else 'raw'}.",
            f"- kNN: cosine, k={report['protocol']['knn']['k']}, "
            f"T={report['protocol']['knn']['temperature']}.",
            "- interpretability on the test split's z with the trained gate; "
            "activity threshold |z| > 1e-5.",
            f"- wall time: {report['seconds']['total']:.1f} s."]
  return "\n".join(lines) + "\n"


def write_outputs(out_dir: str, report: dict[str, Any],
                  test: dict[str, np.ndarray], grid, names, feature_dim: int):
  """report.json, report.md and the figures into out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(report_markdown(report))
  title = f"{report['method']}, step {report['step']}"
  plots.active_dims_histogram(metrics.active_dims_per_sample(test["z"]),
                              feature_dim,
                              os.path.join(out_dir, "active_dims_hist.png"),
                              title)
  if report.get("feature_selection"):
    plots.selection_curve({report["method"]: report["feature_selection"]},
                          os.path.join(out_dir, "feature_selection.png"),
                          title)
  if grid is not None:
    np.savez_compressed(os.path.join(out_dir, "top_activations.npz"), **grid)
    plots.top_activation_grid(grid["images"], grid["labels"], grid["dims"],
                              names,
                              os.path.join(out_dir, "top_activations.png"),
                              f"{title}: test images activating each of "
                              "the most active dims most")


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------
FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "Workdir of a bayesncl_jax.main run.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_list("protocols", list(ALL_PROTOCOLS),
                    f"Subset of {','.join(ALL_PROTOCOLS)}.")
  flags.DEFINE_integer("linear_epochs", 50, "Linear-probe epochs.")
  flags.DEFINE_float("linear_lr", 0.1, "Linear-probe peak learning rate.")
  flags.DEFINE_integer("linear_batch_size", 256, "Linear-probe batch size.")
  flags.DEFINE_float("linear_weight_decay", 0.0, "Linear-probe L2 weight.")
  flags.DEFINE_bool("linear_standardize", True, "Standardise probe inputs "
                    "with the train split's per-dim mean/std.")
  flags.DEFINE_integer("knn_k", 20, "Neighbours of the kNN classifier.")
  flags.DEFINE_float("knn_temperature", 0.07, "kNN vote temperature.")
  flags.DEFINE_integer("max_examples", -1, "> 0: only the first N examples "
                       "of each split (smoke runs).")
  flags.DEFINE_integer("batch_size", 512, "Feature-extraction global batch.")
  flags.DEFINE_integer("consistency_top_k", 0, "> 0: class consistency over "
                       "each dim's top-k samples only; 0: all active ones.")
  flags.DEFINE_integer("grid_dims", 10, "Rows (dims) of the top-activation "
                       "grid.")
  flags.DEFINE_integer("grid_images", 10, "Images per grid row.")
  flags.DEFINE_string("out_dir", None, "Default: WORKDIR/eval.")
  flags.mark_flags_as_required(["workdir"])
  from bayesncl_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.define_flags()


def options_from_flags() -> EvalOptions:
  return EvalOptions(
      step=FLAGS.step, protocols=tuple(FLAGS.protocols),
      batch_size=FLAGS.batch_size, max_examples=FLAGS.max_examples,
      probe=linear_probe.ProbeConfig(
          epochs=FLAGS.linear_epochs, batch_size=FLAGS.linear_batch_size,
          lr=FLAGS.linear_lr, weight_decay=FLAGS.linear_weight_decay,
          standardize=FLAGS.linear_standardize),
      knn_k=FLAGS.knn_k, knn_temperature=FLAGS.knn_temperature,
      consistency_top_k=FLAGS.consistency_top_k or None,
      grid_dims=FLAGS.grid_dims, grid_images=FLAGS.grid_images,
      out_dir=FLAGS.out_dir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  from bayesncl_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize_from_flags()
  report = evaluate(FLAGS.workdir, options_from_flags())
  if jax.process_index() == 0:
    out_dir = FLAGS.out_dir or os.path.join(FLAGS.workdir, "eval")
    print(report_markdown(report), flush=True)
    print(f"Wrote {out_dir}/report.json, report.md and figures.", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
