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

import json
import math
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np
from etils import epath

from bayesncl_jax import cli
from bayesncl_jax import config_lib
from bayesncl_jax import train
from bayesncl_jax.evaluators import base
from bayesncl_jax.evaluators import feature_selection as feature_selection_lib
from bayesncl_jax.evaluators import features as features_lib
from bayesncl_jax.evaluators import interpretability
from bayesncl_jax.evaluators import knn
from bayesncl_jax.evaluators import linear
from bayesncl_jax.evaluators import linear_probe
from bayesncl_jax.evaluators import pictures
from bayesncl_jax.evaluators import retrieval

# The protocols, in the order they run.
EVALUATORS = {e.name: e for e in (
    linear.LinearEvaluator, knn.KnnEvaluator,
    interpretability.InterpretabilityEvaluator,
    retrieval.RetrievalEvaluator,
    feature_selection_lib.FeatureSelectionEvaluator,
    pictures.PicturesEvaluator)}
ALL_PROTOCOLS = tuple(EVALUATORS)

# Re-exported: the public names of this module before the protocols moved
# to bayesncl_jax/evaluators/ (other tools import them from here).
EvalOptions = base.EvalOptions
EvaluationError = base.EvaluationError
class_names = base.class_names
make_feature_fn = features_lib.make_feature_fn
extract_features = features_lib.extract_features
feature_selection = feature_selection_lib.feature_selection
default_selection_ks = feature_selection_lib.default_selection_ks
top_activation_examples = pictures.top_activation_examples


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
  if isinstance(obj, (np.floating, np.integer, np.bool_)):
    obj = obj.item()
  return _finite_or_none(obj)


def run_evaluators(ctx: base.Context, protocols) -> dict[str, Any]:
  """Runs the named protocols in EVALUATORS order on ctx; the raw report.

  Returns {metric: value, ..., "protocol": {name: settings}, "seconds":
  {name: s}} (the dataset/run fields are the caller's).
  """
  report: dict[str, Any] = {}
  described = {}
  for name, cls in EVALUATORS.items():
    if name not in protocols:
      continue
    evaluator = cls(ctx.options)
    t = time.time()
    features_before = ctx.seconds.get("features", 0.0)
    report.update(evaluator.run(ctx))
    # Feature extraction triggered by this protocol is timed on its own.
    ctx.seconds[name] = (time.time() - t
                         - (ctx.seconds.get("features", 0.0)
                            - features_before))
    described[name] = evaluator.describe(ctx)
  report["protocol"] = described
  return report


def evaluate(workdir: str, options: EvalOptions = EvalOptions(), *,
             mesh=None) -> dict[str, Any]:
  """Runs the protocols on the checkpoint in `workdir`; writes the outputs.

  Returns the report (the content of report.json).
  """
  unknown = set(options.protocols) - set(ALL_PROTOCOLS)
  if unknown or not options.protocols:
    raise ValueError(f"protocols must be a non-empty subset of "
                     f"{ALL_PROTOCOLS}, got {options.protocols}")
  t0 = time.time()
  setup, state = load_state(workdir, options.step, mesh)
  config = setup.config
  step = int(jax.device_get(state.step))
  out_dir = options.out_dir or os.path.join(os.fspath(workdir), "eval")
  ctx = base.Context(config, out_dir, options, setup=setup, state=state,
                     title=f"step {step}")
  ctx.seconds["restore"] = time.time() - t0
  test = ctx.test
  results = run_evaluators(ctx, set(options.protocols))
  train_split = config.dataset.train_split
  report: dict[str, Any] = {
      "method": config.method, "step": step,
      "dataset": config.dataset.name,
      "num_train_examples": (int(ctx.train["label"].size)
                             if ctx.has_features(train_split) else None),
      "num_test_examples": int(test["label"].size),
      "backbone_dim": int(test["h"].shape[1]),
      "feature_dim": int(test["z"].shape[1]),
  }
  report.update(results)
  report["protocol"] = {"protocols": sorted(options.protocols),
                        "max_examples": options.max_examples,
                        **results["protocol"]}
  ctx.seconds["total"] = time.time() - t0
  report["seconds"] = dict(ctx.seconds)
  report = _clean(report)
  if ctx.is_writer:
    ctx.write_text("report.json", json.dumps(report, indent=2))
    ctx.write_text("report.md", report_markdown(report))
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
  protocol = report["protocol"]
  lines += ["", "## Protocol", ""]
  if "linear" in protocol:
    probe = protocol["linear"]
    lines.append(
        f"- linear probe on frozen h: SGD momentum {probe['momentum']}, "
        f"lr {probe['lr']} (cosine), batch {probe['batch_size']}, "
        f"{probe['epochs']} epochs, weight decay {probe['weight_decay']}, "
        "features "
        f"{'standardised (train mean/std)' if probe['standardize'] else 'raw'}"
        ".")
  if "knn" in protocol:
    lines.append(f"- kNN: cosine, k={protocol['knn']['k']}, "
                 f"T={protocol['knn']['temperature']}.")
  if "interp" in protocol:
    lines.append("- interpretability on the test split's z with the trained "
                 "gate; activity threshold |z| > 1e-5.")
  lines.append(f"- wall time: {report['seconds']['total']:.1f} s.")
  return "\n".join(lines) + "\n"


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
  try:
    report = evaluate(FLAGS.workdir, options_from_flags())
  except (FileNotFoundError, EvaluationError, train.CheckpointError,
          config_lib.ConfigError) as e:
    logging.error("%s", e)
    sys.exit(f"error: {e}")
  if jax.process_index() == 0:
    out_dir = FLAGS.out_dir or os.path.join(FLAGS.workdir, "eval")
    print(report_markdown(report), flush=True)
    print(f"Wrote {out_dir}/report.json, report.md and figures.", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
