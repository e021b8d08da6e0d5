"""Protocol `mechanism`: do the features keep a nuisance (background) label?

BayesNCL's claim is mechanistic: dims that encode what classes share (a
background) get gated off, and the remaining dims are more class-consistent.
On a dataset whose examples carry a nuisance label (`datasets.
nuisance_names`, e.g. "background" for fashion_mnist_backgrounds) this
protocol measures it, for each nuisance label <name> with V values:

  per dim d (test split, on z before the gate: z_pregate for BayesNCL, z
  otherwise — what the projector encodes, whether or not the gate lets it
  through; samples with |z| > 1e-5 count as activating):
    class purity       share of the most frequent class among them;
    <name> purity      share of the most frequent <name> value.
  <name>_dims          active dims with <name> purity > class purity and
                       <name> purity > factor / V (chance 1/V; factor =
                       nuisance_purity_factor, 1.5 by default;
                       <name>_purity_threshold = factor / V);
  class_dims           the other active dims;
  mean_class_purity, mean_<name>_purity  over active dims;
  class_consistency_all_dims, class_consistency_without_<name>_dims
                       the papers' class consistency of the final z over
                       its active dims, with and without the <name> dims;
  gate_open_rate_<name>_dims, gate_open_rate_class_dims
                       BayesNCL: mean eval-gate open rate over the test
                       samples and the dims of each group (the paper
                       predicts lower on <name> dims);
  <name>_probe_top1_h, <name>_probe_top1_z
                       a linear probe predicting <name> from h and from z
                       (train → test; lower = less <name> kept), beside
                       <name>_majority_share (the most frequent value's
                       share of the test split: what guessing it gets).

The probe is the fast standardised one on pre-extracted features
(`linear_probe.ProbeConfig()` with the linear probe's epochs), whatever
the class probe's recipe: a cheap, scale-free diagnostic. Per-dim arrays
(class_purity_pregate, <name>_purity, is_<name>_dim) go to dims.npz.
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
  return float(np.mean(values)) if values.size else float("nan")


def mechanism_metrics(test: dict[str, np.ndarray], num_classes: int,
                      name: str, factor: float,
                      train: dict[str, np.ndarray] | None = None,
                      probe: linear_probe.ProbeConfig | None = None
                      ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(report entries, per-dim arrays) for nuisance label `name`.

  test (and train, for the probes; None skips them): features with "z",
  "label", "nuisance_<name>" and optionally "z_pregate", "gate_mask", "h".
  """
  key = features_lib.NUISANCE_PREFIX + name
  nuisance = np.asarray(test[key])
  values = [nuisance] + ([np.asarray(train[key])] if train else [])
  num_values = int(max(v.max() for v in values)) + 1
  z_pre = test.get("z_pregate", test["z"])
  y = test["label"]
  class_purity = metrics.dim_purity(z_pre, y, num_classes)
  nuisance_purity = metrics.dim_purity(z_pre, nuisance, num_values)
  active = np.isfinite(class_purity)
  is_nuisance = nuisance_dims(class_purity, nuisance_purity, num_values,
                              factor)
  is_class = active & ~is_nuisance
  z_purity = metrics.dim_purity(test["z"], y, num_classes)
  z_active = np.isfinite(z_purity)
  out = {
      f"{name}_values": num_values,
      f"{name}_purity_threshold": factor / num_values,
      f"{name}_dims": int(is_nuisance.sum()),
      "class_dims": int(is_class.sum()),
      "mean_class_purity": _mean_or_nan(class_purity[active]),
      f"mean_{name}_purity": _mean_or_nan(nuisance_purity[active]),
      "class_consistency_all_dims": _mean_or_nan(z_purity[z_active]),
      f"class_consistency_without_{name}_dims": _mean_or_nan(
          z_purity[z_active & ~is_nuisance]),
  }
  if "gate_mask" in test:
    open_rate = np.mean(test["gate_mask"], axis=0)
    out[f"gate_open_rate_{name}_dims"] = _mean_or_nan(open_rate[is_nuisance])
    out["gate_open_rate_class_dims"] = _mean_or_nan(open_rate[is_class])
  if train is not None:
    probe = probe or linear_probe.ProbeConfig()
    for feature in ("h", "z"):
      acc = linear_probe.linear_eval(train[feature], train[key],
                                     test[feature], nuisance, num_values,
                                     probe)
      out[f"{name}_probe_top1_{feature}"] = acc["top1"]
    out[f"{name}_majority_share"] = float(
        np.bincount(nuisance, minlength=num_values).max() / nuisance.size)
  arrays = {"class_purity_pregate": class_purity,
            f"{name}_purity": nuisance_purity,
            f"is_{name}_dim": is_nuisance}
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
          ctx.test, ctx.num_classes, name,
          self.options.nuisance_purity_factor, ctx.train, self._probe())
      out.update(metrics_)
      ctx.dim_arrays.update(arrays)
    return out

  def describe(self, ctx):
    names = features_lib.nuisance_names(ctx.config)
    if not names:
      return {"nuisance_labels": [], "note": "the dataset has no nuisance "
              "label: nothing to measure"}
    return {"nuisance_labels": list(names),
            "dim_features": "z before the gate (test split)",
            "nuisance_dim": "nuisance purity > class purity and > "
                            f"{self.options.nuisance_purity_factor} / "
                            "#values",
            "probe": {**dataclasses.asdict(self._probe()),
                      "features": "h and z, train -> test"}}
