"""Protocol `selection`: NCL's feature selection, accuracy vs k dims.

Projector dims are ranked on the TRAIN split (the test split chooses
nothing); for k = 1, 2, 4, …, D a linear probe is trained on the top-k dims
(train → test) and, with the `retrieval` protocol, the test split's
precision@10 on those dims is measured too. Writes feature_selection.png.
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


class FeatureSelectionEvaluator(base.Evaluator):
  """feature_selection (the curve) and feature_selection_ranking."""
  name = "selection"

  def run(self, ctx: base.Context) -> dict[str, Any]:
    tr, te = ctx.train, ctx.test
    sel = feature_selection(tr["z"], tr["label"], te["z"], te["label"],
                            ctx.num_classes, self.options.selection_ks,
                            self.options.probe,
                            retrieval="retrieval" in self.options.protocols)
    curve = sel["curve"]
    ctx.save_figure("feature_selection.png",
                    lambda path: plots.selection_curve(
                        {ctx.config.method: curve}, path, ctx.title))
    return {"feature_selection": curve,
            "feature_selection_ranking": sel["ranking"]}

  def describe(self, ctx):
    return {"ranking": "sum |z| over the train split",
            "ks": self.options.selection_ks}
