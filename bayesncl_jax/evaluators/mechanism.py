"""Protocol `mechanism`: do the features keep a nuisance (background) label?

BayesNCL's claim is mechanistic: dims that encode what classes share (a
background) get gated off, and the remaining dims are more class-consistent.
On a dataset whose examples carry a nuisance label (`datasets.
nuisance_names`, e.g. "background" for fashion_mnist_backgrounds) this
protocol measures it, for each nuisance label <name> with V values.

Two splits, two jobs. The dims are *chosen* on the train split and *scored*
on the test split (the report's protocol entry names both:
`selection_split`, `scoring_split`). Choosing and scoring on the same
samples is biased: a dim whose purities are pure noise still looks
<name>-pure on the samples that chose it, because it was chosen for
exceeding a threshold there.

  per dim d (on z before the gate: z_pregate for BayesNCL, z otherwise —
  what the projector encodes, whether or not the gate lets it through;
  samples with |z| > 1e-5 count as activating):
    class purity       share of the most frequent class among them;
    <name> purity      share of the most frequent <name> value.
  Selection (train split):
  <name>_dims          dims active on the train split with <name> purity >
                       class purity and <name> purity > factor / V (chance
                       1/V; factor = nuisance_purity_factor, 1.5 by
                       default; <name>_purity_threshold = factor / V);
  class_dims           the other dims active on the train split.
  Scores (test split):
  mean_class_purity, mean_<name>_purity  over the dims active on the test
                       split (no selection involved);
  mean_class_purity_<name>_dims, mean_<name>_purity_<name>_dims,
  mean_class_purity_class_dims, mean_<name>_purity_class_dims
                       the same purities averaged over each chosen group;
  class_consistency_all_dims, class_consistency_without_<name>_dims
                       the papers' class consistency of the final z over
                       its active dims, with and without the <name> dims;
  gate_open_rate_<name>_dims_all_samples, gate_open_rate_class_dims_all_samples
                       BayesNCL: each dim's eval-gate open rate over *all*
                       test samples, averaged over the group's dims (it
                       mixes gating with activity: a dim that rarely fires
                       has a low rate even with an open gate);
  gate_open_rate_<name>_dims_when_active, gate_open_rate_class_dims_when_active
                       BayesNCL: each dim's open rate over the test samples
                       on which it is active (|z_pregate| > 1e-5), averaged
                       over the group's dims that are active at all (the
                       paper predicts lower on <name> dims);
  <name>_probe_top1_h, <name>_probe_top1_z
                       a linear probe predicting <name> from h and from z
                       (train → test; lower = less <name> kept), beside
                       <name>_majority_share (the most frequent value's
                       share of the test split: what guessing it gets).

The probe is the fast standardised one on pre-extracted features
(`linear_probe.ProbeConfig()` with the linear probe's epochs), whatever
the class probe's recipe: a cheap, scale-free diagnostic. Per-dim arrays to
dims.npz: class_purity_pregate, <name>_purity (test split),
class_purity_pregate_selection, <name>_purity_selection (train split),
is_<name>_dim (the choice), gate_open_rate_when_active (BayesNCL).
Datasets without a nuisance label report nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from bayesncl_jax import metrics
from bayesncl_jax.evaluators import base
from bayesncl_jax.evaluators import features as features_lib
from bayesncl_jax.evaluators import linear_probe


def nuisance_dims(class_purity: np.ndarray, nuisance_purity: np.ndarray,
                  num_values: int, factor: float) -> np.ndarray:
  """(D,) bool: nuisance purity > class purity and > factor / num_values.

  NaN purities (inactive dims) are never nuisance dims.
  """
  with np.errstate(invalid="ignore"):
    return ((nuisance_purity > class_purity)
            & (nuisance_purity > factor / num_values)
            & np.isfinite(nuisance_purity) & np.isfinite(class_purity))


def _mean_or_nan(values: np.ndarray) -> float:
  """Mean of the finite entries (NaN: inactive dims), NaN if there are none."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(np.mean(values)) if values.size else float("nan")


def gate_open_rates(z_pregate: np.ndarray, gate_mask: np.ndarray,
                    eps: float = metrics.ZERO_TOL
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Per-dim gate open rates (D,): (over all samples, when active).

  all samples: mean_n m_nd. When active: Σ_n m_nd·1[|z_nd| > eps] /
  Σ_n 1[|z_nd| > eps] with z = z_pregate, NaN for a dim active on no sample.
  The first mixes the gate with the dim's activity; the second asks only
  whether the gate lets the dim through when the projector fires it.
  """
  mask = np.asarray(gate_mask, np.float64)
  active = np.abs(np.asarray(z_pregate)) > eps
  count = active.sum(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    when_active = np.where(count > 0,
                           (mask * active).sum(axis=0) / count, np.nan)
  return mask.mean(axis=0), when_active


def _pregate(features: dict[str, np.ndarray], split: str,
             gated: bool) -> np.ndarray:
  if gated and "z_pregate" not in features:
    raise ValueError(
        f"The {split} features have no 'z_pregate' (z before the gate), "
        "which the mechanism protocol chooses the dims on: extract them with "
        "keys including 'z_pregate' (evaluators.base.TRAIN_FEATURE_KEYS).")
  return features.get("z_pregate", features["z"])


def mechanism_metrics(train: dict[str, np.ndarray],
                      test: dict[str, np.ndarray], num_classes: int,
                      name: str, factor: float,
                      probe: linear_probe.ProbeConfig | None = None,
                      run_probes: bool = True
                      ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(report entries, per-dim arrays) for nuisance label `name`.

  train: the split the dims are chosen on (and the probes trained on);
  test: the split everything is scored on. Both: features with "z",
  "label", "nuisance_<name>" and, for BayesNCL, "z_pregate"; test also
  "gate_mask" (BayesNCL) and, with `run_probes`, both "h".
  """
  key = features_lib.NUISANCE_PREFIX + name
  nuisance = np.asarray(test[key])
  num_values = int(max(np.max(nuisance), np.max(train[key]))) + 1
  gated = "z_pregate" in test
  # Selection on the train split.
  sel_pre = _pregate(train, "train", gated)
  sel_class_purity = metrics.dim_purity(sel_pre, train["label"], num_classes)
  sel_nuisance_purity = metrics.dim_purity(sel_pre, train[key], num_values)
  is_nuisance = nuisance_dims(sel_class_purity, sel_nuisance_purity,
                              num_values, factor)
  is_class = np.isfinite(sel_class_purity) & ~is_nuisance
  # Scores on the test split.
  z_pre = _pregate(test, "test", gated)
  y = test["label"]
  class_purity = metrics.dim_purity(z_pre, y, num_classes)
  nuisance_purity = metrics.dim_purity(z_pre, nuisance, num_values)
  z_purity = metrics.dim_purity(test["z"], y, num_classes)
  out = {
      f"{name}_values": num_values,
      f"{name}_purity_threshold": factor / num_values,
      f"{name}_dims": int(is_nuisance.sum()),
      "class_dims": int(is_class.sum()),
      "mean_class_purity": _mean_or_nan(class_purity),
      f"mean_{name}_purity": _mean_or_nan(nuisance_purity),
      f"mean_class_purity_{name}_dims": _mean_or_nan(
          class_purity[is_nuisance]),
      f"mean_{name}_purity_{name}_dims": _mean_or_nan(
          nuisance_purity[is_nuisance]),
      "mean_class_purity_class_dims": _mean_or_nan(class_purity[is_class]),
      f"mean_{name}_purity_class_dims": _mean_or_nan(
          nuisance_purity[is_class]),
      "class_consistency_all_dims": _mean_or_nan(z_purity),
      f"class_consistency_without_{name}_dims": _mean_or_nan(
          z_purity[~is_nuisance]),
  }
  arrays = {"class_purity_pregate": class_purity,
            f"{name}_purity": nuisance_purity,
            "class_purity_pregate_selection": sel_class_purity,
            f"{name}_purity_selection": sel_nuisance_purity,
            f"is_{name}_dim": is_nuisance}
  if "gate_mask" in test:
    all_samples, when_active = gate_open_rates(z_pre, test["gate_mask"])
    for group, dims in ((name, is_nuisance), ("class", is_class)):
      out[f"gate_open_rate_{group}_dims_all_samples"] = _mean_or_nan(
          all_samples[dims])
      out[f"gate_open_rate_{group}_dims_when_active"] = _mean_or_nan(
          when_active[dims])
    arrays["gate_open_rate_when_active"] = when_active
  if run_probes:
    probe = probe or linear_probe.ProbeConfig()
    for feature in ("h", "z"):
      acc = linear_probe.linear_eval(train[feature], train[key],
                                     test[feature], nuisance, num_values,
                                     probe)
      out[f"{name}_probe_top1_{feature}"] = acc["top1"]
    out[f"{name}_majority_share"] = float(
        np.bincount(nuisance, minlength=num_values).max() / nuisance.size)
  return out, arrays


class MechanismEvaluator(base.Evaluator):
  """Nuisance-label (background) metrics; nothing without such a label."""
  name = "mechanism"

  def _probe(self) -> linear_probe.ProbeConfig:
    return dataclasses.replace(linear_probe.ProbeConfig(),
                               epochs=self.options.probe.epochs)

  def run(self, ctx: base.Context) -> dict[str, Any]:
    names = features_lib.nuisance_names(ctx.config)
    out = {}
    for name in names:
      metrics_, arrays = mechanism_metrics(
          ctx.train, ctx.test, ctx.num_classes, name,
          self.options.nuisance_purity_factor, self._probe())
      out.update(metrics_)
      ctx.dim_arrays.update(arrays)
    return out

  def describe(self, ctx):
    names = features_lib.nuisance_names(ctx.config)
    if not names:
      return {"nuisance_labels": [], "note": "the dataset has no nuisance "
              "label: nothing to measure"}
    return {"nuisance_labels": list(names),
            "selection_split": ctx.config.dataset.train_split,
            "scoring_split": ctx.config.dataset.eval_split,
            "dim_features": "z before the gate",
            "selection": "nuisance and class dims chosen on the "
                         "selection split",
            "scores": "purities, consistency and gate open rates on the "
                      "scoring split",
            "nuisance_dim": "nuisance purity > class purity and > "
                            f"{self.options.nuisance_purity_factor} / "
                            "#values",
            "probe": {**dataclasses.asdict(self._probe()),
                      "features": "h and z, train -> test"}}
