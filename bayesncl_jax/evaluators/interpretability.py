"""Protocol `interp`: interpretability metrics of the test split's z.

z is the normalised (gated, for BayesNCL) projector output the method
trains with, extracted in eval mode (METHOD.md §5). The metrics are those
of `metrics`: active dims, sparsity, class consistency, label entropies,
effective rank, orthogonality; plus the mean number of active dims per
sample (and its histogram, active_dims_hist.png) and, for BayesNCL, the
gate open rate.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from bayesncl_jax import metrics
from bayesncl_jax import plots
from bayesncl_jax.evaluators import base


class InterpretabilityEvaluator(base.Evaluator):
  """The §5 interpretability metrics of the test split's z."""
  name = "interp"

  def run(self, ctx: base.Context) -> dict[str, Any]:
    te = ctx.test
    z, y = te["z"], te["label"]
    rank = metrics.effective_rank(z)
    out = {
        "active_dims": metrics.active_dims(z),
        "sparsity": metrics.sparsity(z),
        "semantic_consistency": metrics.semantic_consistency(
            z, y, ctx.num_classes, top_k=self.options.consistency_top_k),
        "semantic_entropy": metrics.semantic_entropy(z, y, ctx.num_classes,
                                                     "frequency"),
        "semantic_entropy_sum": metrics.semantic_entropy(
            z, y, ctx.num_classes, "sum"),
        "semantic_entropy_mean": metrics.semantic_entropy(
            z, y, ctx.num_classes, "mean"),
        "effective_rank": rank["effective_rank"],
        "singular_value_entropy": rank["singular_value_entropy"],
        "orthogonality": metrics.orthogonality(z),
    }
    per_sample = metrics.active_dims_per_sample(z)
    out["active_dims_per_sample_mean"] = float(np.mean(per_sample))
    if "gate_mask" in te:
      out["gate_open_rate"] = float(np.mean(te["gate_mask"]))
    feature_dim = int(z.shape[1])
    ctx.save_figure("active_dims_hist.png",
                    lambda path: plots.active_dims_histogram(
                        per_sample, feature_dim, path, ctx.title))
    return out

  def describe(self, ctx):
    return {"features": "z of the test split (eval-mode gate)",
            "activity_threshold": metrics.ZERO_TOL,
            "consistency_top_k": self.options.consistency_top_k,
            "effective_rank": "exp(entropy of normalised singular values)",
            "semantic_entropy": "natural log (nats)"}
