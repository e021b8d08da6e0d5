"""Protocol `interp`: interpretability metrics of the test split's z.

z is the normalised (gated, for BayesNCL) projector output the method
trains with, extracted in eval mode (docs/method.md §5). Reported:

  semantic_consistency    the papers' class consistency: per active dim,
                          the share of its most frequent class among the
                          samples with |z| > 1e-5, averaged over dims.
                          Caveat: on dense signed features (CL) every entry
                          is active, so this is exactly the largest class
                          share (0.1 on 10 balanced classes) by
                          construction — not a measurement. And a dim
                          active on one sample scores 1.0.
  top_k_consistency       the same share among each dim's k largest
                          activations *by value* (k = value_top_k, 100 by
                          default, or N if the split is smaller; reported
                          as top_k_consistency_k), keeping those > 1e-5:
                          comparable across CL, NCL and BayesNCL.
  dim_support_min/median  over active dims, the number of samples that
                          activate the dim (what each purity rests on);
                          dims_with_support_below_k counts the dims whose
                          top-k set is smaller than k.
  semantic_entropy(_sum, _mean), effective_rank, singular_value_entropy,
  orthogonality           see `metrics`.
  disentanglement         NCL's: median |F̂ᵀF̂ − I| over the dims whose
                          summed test activation exceeds 10
                          (disentanglement_dims of them).
  active_dims, sparsity, active_dims_per_sample_mean, gate_open_rate
                          (BayesNCL: mean of the eval gate mask).

Per-dim arrays go to dims.npz (support, class_purity, top_k_class_purity,
activation_sum, BayesNCL gate_open_rate); the histogram of active dims
per sample to active_dims_hist.png.
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
    c = ctx.num_classes
    k = min(self.options.value_top_k, z.shape[0])
    rank = metrics.effective_rank(z)
    support = metrics.dim_support(z)
    active = support > 0
    top_k_purity = metrics.dim_purity(z, y, c, top_k=k, rank_by="value")
    out = {
        "active_dims": metrics.active_dims(z),
        "sparsity": metrics.sparsity(z),
        "semantic_consistency": metrics.semantic_consistency(
            z, y, c, top_k=self.options.consistency_top_k),
        "top_k_consistency": metrics.semantic_consistency(
            z, y, c, top_k=k, rank_by="value"),
        "top_k_consistency_k": int(k),
        "dim_support_min": (int(support[active].min()) if active.any()
                            else None),
        "dim_support_median": (float(np.median(support[active]))
                               if active.any() else None),
        "dims_with_support_below_k": int(np.sum(active & (support < k))),
        "semantic_entropy": metrics.semantic_entropy(z, y, c, "frequency"),
        "semantic_entropy_sum": metrics.semantic_entropy(z, y, c, "sum"),
        "semantic_entropy_mean": metrics.semantic_entropy(z, y, c, "mean"),
        "effective_rank": rank["effective_rank"],
        "singular_value_entropy": rank["singular_value_entropy"],
        "orthogonality": metrics.orthogonality(z),
        **metrics.disentanglement(z),
    }
    per_sample = metrics.active_dims_per_sample(z)
    out["active_dims_per_sample_mean"] = float(np.mean(per_sample))
    ctx.dim_arrays.update(
        support=support, class_purity=metrics.dim_purity(z, y, c),
        top_k_class_purity=top_k_purity,
        activation_sum=np.asarray(z, np.float64).sum(axis=0))
    if "gate_mask" in te:
      out["gate_open_rate"] = float(np.mean(te["gate_mask"]))
      ctx.dim_arrays["gate_open_rate"] = np.mean(te["gate_mask"], axis=0)
    feature_dim = int(z.shape[1])
    ctx.save_figure("active_dims_hist.png",
                    lambda path: plots.active_dims_histogram(
                        per_sample, feature_dim, path, ctx.title))
    return out

  def describe(self, ctx):
    return {"features": "z of the test split (eval-mode gate)",
            "activity_threshold": metrics.ZERO_TOL,
            "semantic_consistency": (
                "papers' definition: all samples with |z| > threshold"
                if self.options.consistency_top_k is None else
                f"top {self.options.consistency_top_k} samples by |z|"),
            "top_k_consistency": "top k samples by value (z > threshold)",
            "value_top_k": self.options.value_top_k,
            "disentanglement": (
                "median |F^T F - I| (diagonal included) over dims with "
                f"summed test activation > {metrics.DISENTANGLEMENT_MIN_TOTAL}"),
            "effective_rank": "exp(entropy of normalised singular values)",
            "semantic_entropy": "natural log (nats)"}
