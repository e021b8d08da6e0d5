r"""Mutation check: plants one small bug at a time and runs the tests that
should catch it (a script, not a test; see docs/test_strength.md).

  python tests/mutation_check.py                 # every mutant
  python tests/mutation_check.py rng_reuse ...   # only these
  python tests/mutation_check.py --new-only ...  # skip the "existing" runs

Each mutant is a one-line edit applied to a fresh copy of the repository in
a temporary folder (never to the checkout itself). Two pytest runs follow in
that copy: the tests that existed before the pinned tests ("existing") and
the tests written for the behaviour ("new"). A mutant is caught when a run
fails. One JSON line per mutant goes to stdout and to --out.

Slow: a few minutes per mutant on 2 cores (some runs train or start
multi-process jobs).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = "tests/test_train.py"
MH = "tests/test_multihost.py"

# (id, area, description, file, old text, new text, existing tests, new
# tests). area "other" = a behaviour whose tests belong to other work (the
# evaluator protocols, the NaN guard); only the existing tests are run.
MUTANTS = [
  ("rng_reuse", "pinned", "one PRNG key every step (fold_in(rng, 0))",
   "bayesncl_jax/train.py", "rng = jax.random.fold_in(rng, state.step)",
   "rng = jax.random.fold_in(rng, 0)",
   [T, "-k", "sigkill or 8_devices"], ["tests/test_pinned_training.py"]),
  ("views_same_key", "pinned", "both views augmented with one key",
   "bayesncl_jax/train.py",
   "rng_v1, rng_v2, rng_gate = jax.random.split(rng, 3)",
   "rng_v1, rng_gate = jax.random.split(rng, 2); rng_v2 = rng_v1",
   [T, "-k", "sigkill or 8_devices"], ["tests/test_pinned_training.py"]),
  ("loop_split_key", "pinned", "loop splits a new key per step (not resumable)",
   "bayesncl_jax/train.py",
   "state, metrics = train_step(state, batch, rng_train)",
   "rng_train, step_key = jax.random.split(rng_train); "
   "state, metrics = train_step(state, batch, step_key)",
   [T, "-k", "sigkill"], ["tests/test_pinned_training.py"]),
  ("metrics_tol_1e-3", "pinned", "metrics ZERO_TOL 1e-5 -> 1e-3",
   "bayesncl_jax/metrics.py", "ZERO_TOL = 1e-5", "ZERO_TOL = 1e-3",
   ["tests/test_metrics.py"], ["tests/test_pinned_metrics.py"]),
  ("metrics_tol_1e-7", "pinned", "metrics ZERO_TOL 1e-5 -> 1e-7",
   "bayesncl_jax/metrics.py", "ZERO_TOL = 1e-5", "ZERO_TOL = 1e-7",
   ["tests/test_metrics.py"], ["tests/test_pinned_metrics.py"]),
  ("consistency_eps", "pinned", "semantic_consistency default eps 1e-3",
   "bayesncl_jax/metrics.py",
   "                         top_k: int | None = None,\n"
   "                         eps: float = ZERO_TOL) -> float:",
   "                         top_k: int | None = None,\n"
   "                         eps: float = 1e-3) -> float:",
   ["tests/test_metrics.py"], ["tests/test_pinned_metrics.py"]),
  ("loss_tol_1e-3", "pinned", "training sparsity threshold 1e-5 -> 1e-3",
   "bayesncl_jax/losses.py", "ZERO_TOL = 1e-5", "ZERO_TOL = 1e-3",
   ["tests/test_losses.py"],
   ["tests/test_pinned_training.py", "tests/test_pinned_online_eval.py"]),
  ("online_tol_1e-3", "pinned", "online-eval sparsity threshold 1e-3",
   "bayesncl_jax/train.py", "(jnp.abs(out[\"z\"]) <= losses.ZERO_TOL)",
   "(jnp.abs(out[\"z\"]) <= 1e-3)",
   [T, "-k", "each_method"],
   ["tests/test_pinned_online_eval.py"]),
  ("kl_half_loss", "pinned", "KL weight halved in total_loss",
   "bayesncl_jax/losses.py", "loss = loss + kl_weight * kl",
   "loss = loss + 0.5 * kl_weight * kl",
   ["tests/test_losses.py"], ["tests/test_pinned_training.py"]),
  ("kl_half_step", "pinned", "KL weight halved where the step passes it",
   "bayesncl_jax/train.py", "kl_weight=config.gate.kl_weight,",
   "kl_weight=config.gate.kl_weight / 2,",
   [T, "-k", "8_devices"],
   ["tests/test_pinned_training.py"]),
  ("open_rate_probs", "pinned", "train gate_open_rate from probs > 0.5",
   "bayesncl_jax/losses.py", "(outputs[\"gate_mask\"] > 0.5)",
   "(outputs[\"gate_probs\"] > 0.5)",
   ["tests/test_losses.py"], ["tests/test_pinned_training.py"]),
  ("train_threshold_0.5", "pinned", "training gate ignores threshold (0.5)",
   "bayesncl_jax/models.py",
   "        gumbel_sigmoid_probs(rng, logits, temperature), threshold), p",
   "        gumbel_sigmoid_probs(rng, logits, temperature), 0.5), p",
   ["tests/test_models.py"], ["tests/test_pinned_training.py"]),
  ("eval_count_padding", "pinned", "online eval counts padding rows",
   "bayesncl_jax/train.py", "\"count\": jnp.sum(mask),",
   "\"count\": jnp.float32(mask.shape[0]),",
   [T, "-k", "each_method"],
   ["tests/test_pinned_online_eval.py"]),
  ("eval_correct_unmasked", "pinned", "online acc counts padding hits",
   "bayesncl_jax/train.py", "jnp.sum(correct * mask)", "jnp.sum(correct)",
   [T, "-k", "each_method"],
   ["tests/test_pinned_online_eval.py"]),
  ("eval_open_probs", "pinned", "online open rate from gate_probs",
   "bayesncl_jax/train.py", "jnp.mean(out[\"gate_mask\"], -1) * mask",
   "jnp.mean(out[\"gate_probs\"], -1) * mask",
   [T, "-k", "each_method"],
   ["tests/test_pinned_online_eval.py"]),
  ("cfg_eval_mode", "pinned", "model_from_config drops gate eval_mode",
   "bayesncl_jax/models.py", "gate_threshold=g.threshold, "
   "gate_eval_mode=g.eval_mode,", "gate_threshold=g.threshold,",
   ["tests/test_models.py", "tests/test_config.py"],
   ["tests/test_pinned_config.py"]),
  ("cfg_threshold", "pinned", "model_from_config threshold fixed at 0.5",
   "bayesncl_jax/models.py", "gate_threshold=g.threshold,",
   "gate_threshold=0.5,",
   ["tests/test_models.py", "tests/test_config.py"],
   ["tests/test_pinned_config.py"]),
  ("eval_gate_tau_1", "pinned", "eval-mode gate at temperature 1",
   "bayesncl_jax/models.py",
   "logits, gate_type=self.gate_type, temperature=self.gate_temperature,",
   "logits, gate_type=self.gate_type, temperature=("
   "self.gate_temperature if train else 1.0),",
   ["tests/test_models.py", "tests/test_config.py"],
   ["tests/test_pinned_config.py"]),
  ("classifier_grad", "pinned", "no stop_gradient on the classifier input",
   "bayesncl_jax/models.py",
   "out[\"logits\"] = self.classifier(jax.lax.stop_gradient(h))",
   "out[\"logits\"] = self.classifier(h)",
   ["tests/test_models.py"], ["tests/test_pinned_config.py"]),
  ("cli_knn_k", "pinned", "--knn_k ignored (k = 20)",
   "bayesncl_jax/evaluate.py", "knn_k=FLAGS.knn_k,", "knn_k=20,",
   ["tests/test_evaluate.py"],
   [MH, "-k", "evaluate_flags"]),
  ("eval_stride_source", "pinned",
   "eval shards: every process reads 0, P, 2P, ...",
   "bayesncl_jax/input_pipeline.py",
   "index = self.process_index + int(position) * self.process_count",
   "index = int(position) * self.process_count",
   ["tests/test_evaluate.py", "tests/test_input_pipeline.py",
    MH, "-k", "two_processes_match"],
   [MH, "-k", "two_process_evaluation or two_process_online or "
    "evaluate_flags"]),
  ("extract_index", "pinned", "extract_features drops the process offset",
   "bayesncl_jax/evaluate.py",
   "batch[\"index\"] = (p + (b * local + np.arange(local)) * n_proc)",
   "batch[\"index\"] = ((b * local + np.arange(local)) * n_proc)",
   ["tests/test_evaluate.py"],
   [MH, "-k", "two_process_evaluation"]),
  ("eval_wrong_split", "pinned", "online eval reads the train split",
   "bayesncl_jax/train.py",
   "config, config.dataset.eval_split, batch_size // jax.process_count())",
   "config, config.dataset.train_split, batch_size // jax.process_count())",
   [T, "-k", "each_method"], ["tests/test_pinned_online_eval.py"]),
  ("cfg_tau_from_threshold", "pinned",
   "model_from_config: temperature = threshold",
   "bayesncl_jax/models.py", "gate_temperature=g.temperature,",
   "gate_temperature=g.threshold,",
   ["tests/test_models.py", "tests/test_config.py"],
   ["tests/test_pinned_config.py"]),
  ("cfg_non_neg", "pinned", "model_from_config ignores non_neg",
   "bayesncl_jax/models.py", "non_neg=m.non_neg,", "non_neg=\"rep_relu\",",
   ["tests/test_models.py", "tests/test_config.py"],
   ["tests/test_pinned_config.py"]),
  ("cli_knn_temperature", "pinned", "--knn_temperature ignored (0.07)",
   "bayesncl_jax/evaluate.py", "knn_temperature=FLAGS.knn_temperature,",
   "knn_temperature=0.07,",
   ["tests/test_evaluate.py"], [MH, "-k", "evaluate_flags"]),
  ("gate_fixed_key", "pinned", "gate noise from one fixed key",
   "bayesncl_jax/models.py", "eval_mode=self.gate_eval_mode, rng=gate_rng)",
   "eval_mode=self.gate_eval_mode, rng=jax.random.key(0) if train else None)",
   [T, "-k", "8_devices"], ["tests/test_pinned_training.py"]),
  # Behaviours outside the pinned tests: existing tests only.
  ("probe_on_z", "other", "linear probe on z instead of h",
   "bayesncl_jax/evaluate.py",
   "acc = linear_probe.linear_eval(tr[\"h\"], tr[\"label\"], test[\"h\"],",
   "acc = linear_probe.linear_eval(tr[\"z\"], tr[\"label\"], test[\"z\"],",
   ["tests/test_evaluate.py"], []),
  ("knn_pool_test", "other", "kNN pool = test split (query in its pool)",
   "bayesncl_jax/evaluate.py",
   "knn = metrics.knn_accuracy(tr[\"h\"], tr[\"label\"], test[\"h\"],",
   "knn = metrics.knn_accuracy(test[\"h\"], test[\"label\"], test[\"h\"],",
   ["tests/test_evaluate.py"], []),
  ("ranking_on_test", "other", "feature ranking on the test split",
   "bayesncl_jax/evaluate.py",
   "ranking = metrics.most_active_dims(train_z, d)",
   "ranking = metrics.most_active_dims(test_z, d)",
   ["tests/test_evaluate.py"], []),
  ("nan_guard_off", "other", "NaN guard checks only the last step",
   "bayesncl_jax/train.py", "_check_finite(pending, pending_start)",
   "_check_finite(pending[-1:], done - 1)",
   [T, "-k", "nan"], []),
]


def _run(workdir: str, args: list[str]) -> dict:
  env = {**os.environ, "PYTHONPATH": workdir}
  env.pop("XLA_FLAGS", None)
  start = time.time()
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-rfE", "-p",
       "no:cacheprovider", *args], cwd=workdir, env=env,
      capture_output=True, text=True, timeout=1800)
  failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout,
                                 re.M)))
  lines = proc.stdout.strip().splitlines()
  return {"rc": proc.returncode, "failed": failed,
          "summary": lines[-1] if lines else proc.stderr[-300:],
          "seconds": round(time.time() - start)}


def _copy(dst: str) -> None:
  shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
      ".git", ".venv", "__pycache__", "*.egg-info"))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("ids", nargs="*", help="mutant ids (default: all)")
  parser.add_argument("--new-only", action="store_true")
  parser.add_argument("--out", default="mutation_check.jsonl")
  args = parser.parse_args(argv)
  known = {m[0] for m in MUTANTS}
  unknown = set(args.ids) - known
  if unknown:
    parser.error(f"unknown mutant ids {sorted(unknown)}; known: "
                 f"{sorted(known)}")
  for mid, area, desc, path, old, new, existing, new_tests in MUTANTS:
    if args.ids and mid not in args.ids:
      continue
    with tempfile.TemporaryDirectory(prefix=f"mut_{mid}_") as tmp:
      work = os.path.join(tmp, "repo")
      _copy(work)
      target = os.path.join(work, path)
      with open(target) as f:
        src = f.read()
      if src.count(old) != 1:
        raise SystemExit(f"{mid}: the text to mutate occurs "
                         f"{src.count(old)} times in {path}; update the "
                         "mutant to the current code.")
      with open(target, "w") as f:
        f.write(src.replace(old, new))
      res = {"id": mid, "area": area, "desc": desc, "file": path}
      if not args.new_only:
        res["existing"] = _run(work, existing)
      if new_tests:
        res["new"] = _run(work, new_tests)
    line = json.dumps(res)
    print(line, flush=True)
    with open(args.out, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  main()
