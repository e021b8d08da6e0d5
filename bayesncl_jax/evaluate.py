r"""Offline evaluation of a pre-trained checkpoint (docs/method.md §5, §9).

  python -m bayesncl_jax.evaluate --workdir=DIR [--step=N] \
      [--protocols=linear,knn,interp,retrieval,feature_selection,grids,mechanism,finetune] \
      [--linear_probe=features|augmented] [--linear_epochs=50] \
      [--selection_rule=ncl|gated_z] [--save_features] [--max_examples=N]

The config is the one the run saved (`DIR/config.json`); its `eval` fields
give the protocol settings, which the flags override. The state is the
checkpoint of `--step` (default: the latest). Outputs go to `DIR/eval/`
(or --out_dir, local or gs://): report.json, report.md, dims.npz (per-dim
arrays), the figures, and with --save_features features.npz.

One module per protocol in `bayesncl_jax/evaluators/` (each an `Evaluator`
with `run(ctx) -> {metric: value}`); this module builds the context, runs
the requested protocols in a fixed order and writes the report:

  linear             linear probe on the frozen backbone h (`linear`:
                     pre-extracted features or augmented images)
  knn                weighted cosine kNN on h, train pool, test queries
  interp             interpretability metrics of the test split's z
  retrieval          cosine precision@10 on z, all-zero rows excluded
  feature_selection  accuracy vs the k top-ranked dims (NCL's rule)
  grids              top-activation pictures
  mechanism          nuisance (background) dims, for datasets that have a
                     nuisance label
  finetune           backbone + head trained end to end (not by default)

Features are extracted ONCE per split (`evaluators.features`) and shared.
Memory: features are (N, D) host arrays; no N×N matrix is formed (kNN and
retrieval map over query chunks in `metrics`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np
from etils import epath

from bayesncl_jax import cli
from bayesncl_jax import integrity
from bayesncl_jax import paths
from bayesncl_jax import preflight
from bayesncl_jax import train
from bayesncl_jax import workdir_lock
from bayesncl_jax.evaluators import base
from bayesncl_jax.evaluators import feature_selection as feature_selection_lib
from bayesncl_jax.evaluators import features as features_lib
from bayesncl_jax.evaluators import finetune
from bayesncl_jax.evaluators import interpretability
from bayesncl_jax.evaluators import knn
from bayesncl_jax.evaluators import linear
from bayesncl_jax.evaluators import linear_probe
from bayesncl_jax.evaluators import mechanism
from bayesncl_jax.evaluators import pictures
from bayesncl_jax.evaluators import retrieval

# The protocols, in the order they run.
EVALUATORS = {e.name: e for e in (
    linear.LinearEvaluator, knn.KnnEvaluator,
    interpretability.InterpretabilityEvaluator,
    retrieval.RetrievalEvaluator,
    feature_selection_lib.FeatureSelectionEvaluator,
    pictures.PicturesEvaluator, mechanism.MechanismEvaluator,
    finetune.FinetuneEvaluator)}
ALL_PROTOCOLS = tuple(EVALUATORS)
# Protocols that read the train split (checked to exist before any work).
_NEEDS_TRAIN = ("linear", "knn", "feature_selection", "finetune", "mechanism")
DEFAULT_PROTOCOLS = base.DEFAULT_PROTOCOLS

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
def load_state(workdir: str, step: int | None = None, mesh=None,
               trust_unsealed: bool = False
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
    steps = integrity.committed_steps(ckpt_dir)
    if not steps:
      raise EvaluationError(f"No checkpoint step in {ckpt_dir}: the run "
                            "saved none (or they were deleted).")
    if step is not None and step not in steps:
      raise EvaluationError(f"No checkpoint of step {step} in {ckpt_dir}; "
                            f"available steps: {steps}.")
    state = train.restore_checkpoint(mngr, setup, None, step=step,
                                     restore_data=False,
                                     trust_unsealed=trust_unsealed)
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

  ctx.options must be resolved (`EvalOptions.resolve`). Returns {metric:
  value, ..., "protocol": {name: settings}}; the time of each protocol
  goes to ctx.seconds (the dataset/run fields are the caller's).
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
             mesh=None, trust_unsealed: bool = False) -> dict[str, Any]:
  """Runs the protocols on the checkpoint in `workdir`; writes the outputs.

  Returns the report (the content of report.json).
  """
  protocols = tuple(base.PROTOCOL_ALIASES.get(p, p) for p in options.protocols)
  preflight.check_evaluation(workdir, train.load_config(workdir), protocols,
                             ALL_PROTOCOLS, _NEEDS_TRAIN, options.out_dir)
  t0 = time.time()
  setup, state = load_state(workdir, options.step, mesh, trust_unsealed)
  config = setup.config
  options = options.resolve(config)
  step = int(jax.device_get(state.step))
  out_dir = epath.Path(options.out_dir or epath.Path(workdir) / "eval")
  with staged_output(out_dir) as staging:
    return _evaluate_into(staging, config, setup, state, options, step, t0)


@contextlib.contextmanager
def staged_output(out_dir: epath.Path):
  """A fresh folder to write the evaluation into, put in place at the end.

  Local: the outputs go to `<parent>/.<name>.partial-<pid>`, which replaces
  `out_dir` (two renames) only once everything is written: an evaluation
  that is interrupted or fails leaves the previous `out_dir` as it was, and
  the partial folder is removed. gs://: object stores cannot rename a
  folder (gcsfs copies object by object, which is no safer than writing in
  place), so the outputs are written in place; report.json is written last.
  Only process 0 writes.
  """
  if os.fspath(out_dir).startswith("gs://") or jax.process_index() != 0:
    yield out_dir
    return
  parent = out_dir.parent
  parent.mkdir(parents=True, exist_ok=True)
  staging = parent / f".{out_dir.name}.partial-{os.getpid()}"
  old = parent / f".{out_dir.name}.old-{os.getpid()}"
  if staging.exists():
    shutil.rmtree(staging)
  try:
    yield staging
    staging.mkdir(exist_ok=True)
    if out_dir.exists():
      out_dir.rename(old)
    staging.rename(out_dir)
  finally:
    if staging.exists():
      shutil.rmtree(staging)
  if old.exists():
    shutil.rmtree(old)


def _evaluate_into(out_dir, config, setup, state, options, step, t0
                   ) -> dict[str, Any]:
  ctx = base.Context(config, out_dir, options, setup=setup, state=state,
                     title=f"step {step}")
  ctx.seconds["restore"] = time.time() - t0
  test = ctx.test
  results = run_evaluators(ctx, set(options.protocols))
  if ctx.dim_arrays:
    ctx.save_npz("dims.npz", **ctx.dim_arrays)
  if options.save_features:
    t = time.time()
    ctx.save_npz("features.npz",
                 **features_lib.features_npz(ctx.train, ctx.test))
    ctx.seconds["save_features"] = time.time() - t
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
  report["files"] = sorted(ctx.files + ["report.json", "report.md"])
  report = _clean(report)
  if ctx.is_writer:
    ctx.write_text("report.json", json.dumps(report, indent=2))
    ctx.write_text("report.md", report_markdown(report))
  return report


# ----------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------
# (key, label, how to read it) for report.md, in order; a key that
# contains {name} is a nuisance-label metric (one row per nuisance label).
REPORT_ROWS = (
    ("linear_top1", "linear probe top-1 (h)", "higher is better"),
    ("linear_top5", "linear probe top-5 (h)", "higher is better"),
    ("finetune_top1", "fine-tuning top-1", "higher is better"),
    ("finetune_top5", "fine-tuning top-5", "higher is better"),
    ("knn_top1", "kNN top-1 (h)", "higher is better"),
    ("knn_top5", "kNN top-5 (h)", "higher is better"),
    ("active_dims", "active dims of z (of feature_dim)", "dims any test "
     "sample activates"),
    ("active_dims_per_sample_mean", "active dims per sample (mean)",
     "lower = sparser"),
    ("sparsity", "sparsity", "fraction of zero entries of z"),
    ("semantic_consistency", "semantic consistency (papers')",
     "share of the top class among a dim's active samples, mean over dims; "
     "= largest class share by construction for dense CL features"),
    ("top_k_consistency", "top-k consistency (by value)",
     "the same among each dim's k largest values; comparable across "
     "methods"),
    ("top_k_consistency_k", "k of the top-k consistency", "min(k, N)"),
    ("dim_support_min", "dim support (min)", "samples activating an "
     "active dim"),
    ("dim_support_median", "dim support (median)", "a dim on 1 sample "
     "scores consistency 1.0"),
    ("dims_with_support_below_k", "dims with support < k", "their top-k "
     "set is smaller than k"),
    ("semantic_entropy", "semantic entropy (frequency)", "nats, lower = "
     "purer"),
    ("semantic_entropy_sum", "semantic entropy (sum of activations)",
     "nats"),
    ("semantic_entropy_mean", "semantic entropy (mean activation)", "nats"),
    ("effective_rank", "effective rank of z", "exp(singular-value entropy)"),
    ("orthogonality", "orthogonality (mean abs(C - I), off-diagonal)",
     "0 = orthogonal dims"),
    ("disentanglement", "disentanglement (NCL: median abs(FᵀF - I))",
     "over dims with summed activation > 10; 0 = orthogonal"),
    ("disentanglement_dims", "dims in the disentanglement", ""),
    ("retrieval_precision_at_10", "retrieval precision@10 (z)",
     "higher is better; all-zero rows excluded"),
    ("retrieval_zero_rows", "all-zero rows of z (test)", "excluded from "
     "retrieval"),
    ("top_activation_purity", "top-activation grid purity",
     "mean share of the top class in each grid row"),
    ("gate_open_rate", "gate open rate", "BayesNCL: mean of the eval mask, test "
     "split"),
    ("{name}_dims", "{name} dims", "chosen on the train split: {name} "
     "purity > class purity and > threshold"),
    ("class_dims", "class dims", "the other active dims (train split)"),
    ("{name}_purity_threshold", "{name} purity threshold",
     "factor x chance (1 / #values)"),
    ("mean_class_purity", "mean class purity (z before the gate)",
     "test split, all active dims"),
    ("mean_{name}_purity", "mean {name} purity (z before the gate)",
     "test split, all active dims"),
    ("mean_class_purity_{name}_dims", "mean class purity of {name} dims",
     "test split"),
    ("mean_{name}_purity_{name}_dims", "mean {name} purity of {name} dims",
     "test split"),
    ("mean_class_purity_class_dims", "mean class purity of class dims",
     "test split"),
    ("mean_{name}_purity_class_dims", "mean {name} purity of class dims",
     "test split"),
    ("class_consistency_all_dims", "class consistency, all dims",
     "final z, test split"),
    ("class_consistency_without_{name}_dims",
     "class consistency without {name} dims", "final z, test split"),
    ("gate_open_rate_{name}_dims_all_samples",
     "gate open rate on {name} dims, all samples",
     "test split; mixes gating with activity"),
    ("gate_open_rate_class_dims_all_samples",
     "gate open rate on class dims, all samples", "test split"),
    ("gate_open_rate_{name}_dims_when_active",
     "gate open rate on {name} dims, when active",
     "test samples where the dim fires; the paper predicts lower"),
    ("gate_open_rate_class_dims_when_active",
     "gate open rate on class dims, when active",
     "test samples where the dim fires"),
    ("{name}_probe_top1_h", "{name} probe top-1 from h",
     "lower = less {name} kept"),
    ("{name}_probe_top1_z", "{name} probe top-1 from z",
     "lower = less {name} kept"),
    ("{name}_majority_share", "{name}: majority share (test)",
     "what always guessing the commonest value gets"),
)


def _fmt(value) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.4f}"
  return str(value)


def _rows(report: dict[str, Any]):
  names = report.get("protocol", {}).get("mechanism", {}).get(
      "nuisance_labels", [])
  for key, label, note in REPORT_ROWS:
    if "{name}" in key:
      for name in names:
        yield (key.format(name=name), label.format(name=name),
               note.format(name=name))
    else:
      yield key, label, note


def _describe_probe(probe: dict[str, Any]) -> str:
  schedule = probe["schedule"]
  if schedule == "warmup_cosine":
    schedule += f" ({probe['warmup_epochs']} warmup epochs)"
  elif schedule == "step":
    schedule += f" (x0.1 at epochs {probe['decay_epochs']})"
  optimizer = ("SGD" if probe["optimizer"] == "sgd" else
               f"LARS (eta {probe['trust_coefficient']}, clip_lr "
               f"{probe['clip_lr']})")
  return (f"{optimizer}, momentum {probe['momentum']}, lr {probe['lr']} "
          f"{schedule}, batch {probe['batch_size']}, epochs {probe['epochs']}, "
          f"weight decay {probe['weight_decay']}")


def report_markdown(report: dict[str, Any]) -> str:
  """report.json as a readable markdown page."""
  lines = [f"# Evaluation: {report['method']} at step {report['step']}", "",
           f"Dataset `{report['dataset']}`: "
           f"{_fmt(report['num_train_examples'])} train / "
           f"{report['num_test_examples']} test examples; backbone "
           f"h has {report['backbone_dim']} dims, projector z "
           f"{report['feature_dim']}.", "",
           "| metric | value | note |", "|---|---|---|"]
  for key, label, note in _rows(report):
    if key in report:
      lines.append(f"| {label} | {_fmt(report[key])} | {note} |")
  if report.get("feature_selection"):
    curve = report["feature_selection"]
    has_ret = "retrieval_precision_at_10" in curve[0]
    lines += ["", "## Feature selection (dims ranked on the train split, "
              f"rule `{report.get('feature_selection_rule')}`)", "",
              "| k | linear top-1 | linear top-5 |"
              + (" retrieval P@10 | all-zero rows |" if has_ret else ""),
              "|---|---|---|" + ("---|---|" if has_ret else "")]
    for p in curve:
      lines.append(f"| {p['k']} | {_fmt(p['linear_top1'])} | "
                   f"{_fmt(p['linear_top5'])} |"
                   + (f" {_fmt(p['retrieval_precision_at_10'])} | "
                      f"{p['retrieval_zero_rows']} |" if has_ret else ""))
  protocol = report["protocol"]
  lines += ["", "## Protocol", ""]
  if "linear" in protocol:
    probe = protocol["linear"]
    if probe["mode"] == "augmented":
      how = (f"random resized crop (scale {probe['crop_scale']}) + flip "
             "every epoch through the frozen backbone, raw h")
    else:
      how = ("h extracted once, "
             + ("standardised (train mean/std)" if probe["standardize"]
                else "raw"))
    lines.append(f"- linear probe ({probe['mode']}): {how}; "
                 f"{_describe_probe(probe)}.")
  if "finetune" in protocol:
    lines.append("- fine-tuning: backbone + linear head on random resized "
                 f"crops + flips; {_describe_probe(protocol['finetune'])}.")
  if "knn" in protocol:
    lines.append(f"- kNN on h: cosine, k={protocol['knn']['k']}, "
                 f"T={protocol['knn']['temperature']}, pool = train split, "
                 "queries = test split.")
  if "interp" in protocol:
    lines.append("- interpretability on the test split's z with the trained "
                 "gate; activity threshold |z| > 1e-5; top-k consistency "
                 "ranks each dim's samples by value.")
  if "feature_selection" in protocol:
    sel = protocol["feature_selection"]
    lines.append(f"- feature selection, rule `{sel['rule']}`: ranking = "
                 f"{sel['ranking']}; probe on {sel['probe_features']}.")
  if "retrieval" in protocol:
    lines.append("- retrieval: cosine on z, the query excluded; all-zero "
                 "rows are neither queries nor neighbours.")
  if "mechanism" in protocol:
    mech = protocol["mechanism"]
    if mech.get("nuisance_labels"):
      lines.append(f"- mechanism ({', '.join(mech['nuisance_labels'])}): "
                   f"a dim is a nuisance dim when {mech['nuisance_dim']} on "
                   f"the `{mech['selection_split']}` split (where the dims "
                   "are chosen); purities, consistency and gate open rates "
                   f"are scored on the `{mech['scoring_split']}` split; "
                   "purities on z before the gate.")
    else:
      lines.append("- mechanism: the dataset has no nuisance label.")
  lines.append(f"- wall time: {report['seconds']['total']:.1f} s.")
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------
FLAGS = flags.FLAGS


def define_flags():
  """The command-line flags (defined only when run as a program).

  Flags left unset take the run's config.eval values.
  """
  flags.DEFINE_string("workdir", None, "Workdir of a bayesncl_jax.main run.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_list("protocols", list(DEFAULT_PROTOCOLS),
                    f"Subset of {','.join(ALL_PROTOCOLS)} ('selection' = "
                    "feature_selection).")
  flags.DEFINE_enum("linear_probe", None, list(base.LINEAR_PROBES),
                    "features: probe on h extracted once; augmented: crop + "
                    "flip every epoch through the frozen backbone. Default: "
                    "config.eval.linear_probe.")
  flags.DEFINE_integer("linear_epochs", None, "Linear-probe epochs.")
  flags.DEFINE_float("linear_lr", None, "Linear-probe peak learning rate.")
  flags.DEFINE_integer("linear_batch_size", None, "Linear-probe batch size.")
  flags.DEFINE_float("linear_weight_decay", None, "Linear-probe weight "
                     "decay.")
  flags.DEFINE_enum("linear_optimizer", None, list(linear_probe.OPTIMIZERS),
                    "Linear-probe (and fine-tuning) optimiser.")
  flags.DEFINE_enum("linear_schedule", None, list(linear_probe.SCHEDULES),
                    "Linear-probe (and fine-tuning) lr schedule.")
  flags.DEFINE_bool("linear_standardize", None, "Standardise the features "
                    "probe's inputs with the train split's per-dim mean/std.")
  flags.DEFINE_integer("finetune_epochs", None, "Fine-tuning epochs.")
  flags.DEFINE_enum("selection_rule", None, list(base.SELECTION_RULES),
                    "Feature-selection ranking: ncl (docs/method.md §9) or "
                    "gated_z (sum |z| of the final features).")
  flags.DEFINE_integer("value_top_k", None, "k of the top-k-by-value class "
                       "consistency.")
  flags.DEFINE_float("nuisance_purity_factor", None, "A nuisance dim's "
                     "nuisance purity must exceed this x chance.")
  flags.DEFINE_integer("knn_k", 20, "Neighbours of the kNN classifier.")
  flags.DEFINE_float("knn_temperature", 0.07, "kNN vote temperature.")
  flags.DEFINE_integer("max_examples", -1, "> 0: only the first N examples "
                       "of each split (smoke runs).")
  flags.DEFINE_integer("batch_size", 512, "Feature-extraction global batch.")
  flags.DEFINE_integer("consistency_top_k", 0, "> 0: the papers' class "
                       "consistency over each dim's top-k samples by |z| "
                       "only; 0: all active ones.")
  flags.DEFINE_integer("grid_dims", 10, "Rows (dims) of the top-activation "
                       "grid.")
  flags.DEFINE_integer("grid_images", 10, "Images per grid row.")
  flags.DEFINE_bool("save_features", False, "Write eval/features.npz "
                    "(train/test h, z, labels; the eval gate for BayesNCL).")
  flags.DEFINE_string("out_dir", None, "Default: WORKDIR/eval.")
  flags.DEFINE_bool("trust_unsealed", False, "Evaluate a checkpoint that "
                    "has no integrity manifest (its bytes cannot be checked).")
  flags.DEFINE_bool("break_stale_lock", False, "Break the output folder's "
                    "lock if it is stale (its process is gone).")
  flags.mark_flags_as_required(["workdir"])
  from bayesncl_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.define_flags()


# Flag -> ProbeConfig field, for the probe flags.
_PROBE_FLAGS = {"linear_epochs": "epochs", "linear_lr": "lr",
                "linear_batch_size": "batch_size",
                "linear_weight_decay": "weight_decay",
                "linear_optimizer": "optimizer",
                "linear_schedule": "schedule",
                "linear_standardize": "standardize"}


def options_from_flags(values: dict[str, Any] | None = None,
                       config=None) -> EvalOptions:
  """EvalOptions from flag values (default: the parsed FLAGS).

  Unset (None) flags leave the field to config.eval; the probe flags
  override single fields of the run's probe (`config`, default: the one
  saved in --workdir), and a shorter probe keeps a feasible warmup.
  """
  v = FLAGS.flag_values_dict() if values is None else values
  probe = None
  overrides = {field: v[flag] for flag, field in _PROBE_FLAGS.items()
               if v.get(flag) is not None}
  if overrides:
    config = config or train.load_config(v["workdir"])
    base_probe = EvalOptions().resolve(config).probe
    if "epochs" in overrides:
      overrides["warmup_epochs"] = min(base_probe.warmup_epochs,
                                       float(overrides["epochs"]))
    probe = dataclasses.replace(base_probe, **overrides)
  return EvalOptions(
      step=v["step"], protocols=tuple(v["protocols"]),
      batch_size=v["batch_size"], max_examples=v["max_examples"],
      linear_probe=v["linear_probe"], probe=probe,
      finetune_epochs=v["finetune_epochs"],
      knn_k=v["knn_k"], knn_temperature=v["knn_temperature"],
      consistency_top_k=v["consistency_top_k"] or None,
      value_top_k=v["value_top_k"], selection_rule=v["selection_rule"],
      nuisance_purity_factor=v["nuisance_purity_factor"],
      grid_dims=v["grid_dims"], grid_images=v["grid_images"],
      save_features=v["save_features"], out_dir=v["out_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  from bayesncl_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize_from_flags()
  workdir = paths.check(FLAGS.workdir)  # gs:///x: refused before any I/O
  out_dir = FLAGS.out_dir or epath.Path(workdir) / "eval"
  if paths.is_remote(out_dir):
    paths.ensure_dir(out_dir)  # the bucket exists (before its lock object)
  # Two evaluations into one folder would mix their outputs.
  with workdir_lock.hold_output(out_dir, "evaluation",
                                break_stale=FLAGS.break_stale_lock,
                                enabled=jax.process_index() == 0):
    report = evaluate(workdir, options_from_flags(),
                      trust_unsealed=FLAGS.trust_unsealed)
  if jax.process_index() == 0:
    print(report_markdown(report), flush=True)
    print(f"Wrote {out_dir}/report.json, report.md and figures.", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
