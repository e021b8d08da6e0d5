"""Protocol `feature_selection`: accuracy vs the k top-ranked projector dims.

The NCL paper's protocol: rank the projector dims on the TRAIN split (the
test split chooses nothing), keep the top k, train a linear probe on those
k dims (train → test) for k = 1, 2, 4, …, D; with the `retrieval` protocol
also the test split's cosine precision@10 on those dims (all-zero rows
excluded and counted, as in `retrieval`). Two ranking rules
(`EvalOptions.selection_rule`, config `eval.selection_rule`):

  ncl (default)  NCL's rule (docs/method.md §9): on the raw projector output
                 z_raw (before σ+), score_d = Σ_n relu(z_raw_nd) /
                 ||relu(z_raw_n)|| (rows with no positive entry add 0),
                 from one pass over the un-augmented train images (NCL
                 sums the augmented features of its probe's first epoch and
                 then freezes the ranking; one clean pass is the documented
                 equivalent here). The probe is trained on z_raw's top-k
                 columns, as NCL's code does; retrieval uses z before the
                 gate (z, or z_pregate for BayesNCL). The gate plays no
                 part: this ranks what the projector encodes. CL is ranked
                 the same way (relu for the ranking only).
  gated_z        score_d = Σ_n |z_nd| of the final (normalised, gated) z;
                 probe and retrieval on z's top-k columns: what the gate
                 lets through. For NCL (relu / rep_relu) it ranks exactly
                 as `ncl` does; it differs for CL (|z| mixes a dim's two
                 ends) and BayesNCL (the gate).

Writes feature_selection.png; the report names the rule that ran
(feature_selection_rule).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from bayesncl_jax import metrics
from bayesncl_jax import plots
from bayesncl_jax.evaluators import base
from bayesncl_jax.evaluators import linear_probe


def default_selection_ks(feature_dim: int) -> tuple[int, ...]:
  """1, 2, 4, … (powers of two below D), then D itself."""
  ks = [1 << i for i in range(max(feature_dim - 1, 0).bit_length())
        if 1 << i < feature_dim]
  return tuple(ks + [feature_dim])


def ncl_selection_scores(z_raw) -> np.ndarray:
  """(D,) Σ_n relu(z_raw_n) / ||relu(z_raw_n)|| (0 for an all-zero row)."""
  pos = np.maximum(np.asarray(z_raw, np.float64), 0.0)
  norms = np.linalg.norm(pos, axis=1, keepdims=True)
  return (pos / np.where(norms > 0, norms, 1.0)).sum(axis=0)


def rank_dims(scores) -> np.ndarray:
  """Dims by descending score; ties keep the lower index first."""
  return np.argsort(-np.asarray(scores), kind="stable")


def feature_selection(train_z, train_y, test_z, test_y, num_classes: int,
                      ks: Sequence[int] | None = None,
                      probe: linear_probe.ProbeConfig = (
                          linear_probe.ProbeConfig()),
                      retrieval: bool = True, *, scores=None,
                      retrieval_z=None) -> dict[str, Any]:
  """Linear probe (and retrieval) on the top-k dims, for each k in ks.

  Dims ranked by descending `scores` (D,), default Σ_n |train_z_nd| (the
  `gated_z` rule); for each k the top-k columns of train_z / test_z feed a
  linear probe (train → test) and, if `retrieval`, cosine precision@10 on
  the top-k columns of `retrieval_z` (default test_z; all-zero rows
  excluded and counted).

  The k dims are kept by zeroing the other columns rather than slicing
  them: a zero input column has zero mean, unit (fallback) std and zero
  gradient, so its probe weights stay at their zero init (weight decay
  and LARS see the same norms), and it adds nothing to dot products or
  norms. The results are those of a probe / retrieval on the k dims
  alone, with one compiled shape for every k.

  train_z: (N_tr, D), test_z: (N_te, D). Returns {"ranking": (D,) dims in
  descending score, "curve": [{"k", "linear_top1", "linear_top5"
  [, "retrieval_precision_at_10", "retrieval_zero_rows"]}, ...]}.
  """
  train_z = np.asarray(train_z, np.float32)
  test_z = np.asarray(test_z, np.float32)
  retrieval_z = (test_z if retrieval_z is None
                 else np.asarray(retrieval_z, np.float32))
  d = train_z.shape[1]
  ks = default_selection_ks(d) if ks is None else tuple(sorted(set(ks)))
  if not ks or ks[0] < 1 or ks[-1] > d:
    raise ValueError(f"selection ks must lie in [1, {d}], got {ks}")
  ranking = (metrics.most_active_dims(train_z, d) if scores is None
             else rank_dims(scores))
  curve = []
  for k in ks:
    keep = np.zeros((d,), np.float32)
    keep[ranking[:k]] = 1.0
    acc = linear_probe.linear_eval(train_z * keep, train_y, test_z * keep,
                                   test_y, num_classes, probe)
    point = {"k": int(k), "linear_top1": acc["top1"],
             "linear_top5": acc["top5"]}
    if retrieval and retrieval_z.shape[0] > 10:
      ret = metrics.retrieval_report(retrieval_z * keep, test_y, k=10)
      point["retrieval_precision_at_10"] = ret["precision"]
      point["retrieval_zero_rows"] = ret["zero_rows"]
    curve.append(point)
  return {"ranking": [int(x) for x in ranking], "curve": curve}


class FeatureSelectionEvaluator(base.Evaluator):
  """feature_selection (the curve), its ranking and the rule that ran."""
  name = "feature_selection"

  def run(self, ctx: base.Context) -> dict[str, Any]:
    tr, te = ctx.train, ctx.test
    retrieval = "retrieval" in self.options.protocols
    common = dict(num_classes=ctx.num_classes, ks=self.options.selection_ks,
                  probe=self.options.probe, retrieval=retrieval)
    if self.options.selection_rule == "ncl":
      sel = feature_selection(
          tr["z_raw"], tr["label"], te["z_raw"], te["label"],
          scores=ncl_selection_scores(tr["z_raw"]),
          retrieval_z=te.get("z_pregate", te["z"]), **common)
    else:
      sel = feature_selection(tr["z"], tr["label"], te["z"], te["label"],
                              **common)
    curve = sel["curve"]
    ctx.save_figure("feature_selection.png",
                    lambda path: plots.selection_curve(
                        {ctx.config.method: curve}, path, ctx.title))
    return {"feature_selection": curve,
            "feature_selection_ranking": sel["ranking"],
            "feature_selection_rule": self.options.selection_rule}

  def describe(self, ctx):
    if self.options.selection_rule == "ncl":
      rule = {"rule": "ncl",
              "ranking": "sum over the un-augmented train split of "
                         "relu(z_raw) / ||relu(z_raw)|| (z_raw: projector "
                         "output before the non-negative map)",
              "probe_features": "z_raw, top-k dims",
              "retrieval_features": "z before the gate, top-k dims"}
    else:
      rule = {"rule": "gated_z",
              "ranking": "sum |z| over the train split (final, gated z)",
              "probe_features": "z, top-k dims",
              "retrieval_features": "z, top-k dims"}
    return {**rule, "ks": self.options.selection_ks,
            "probe": "the linear probe's settings, on pre-extracted "
                     "features"}
