"""Protocol `retrieval`: cosine precision@10 on the test split's z.

Each test sample queries the other test samples (itself excluded); the
score is the share of its 10 nearest neighbours with its class.
"""
from __future__ import annotations

from typing import Any

from bayesncl_jax import metrics
from bayesncl_jax.evaluators import base


class RetrievalEvaluator(base.Evaluator):
  """retrieval_precision_at_10 on the test split's z."""
  name = "retrieval"

  def run(self, ctx: base.Context) -> dict[str, Any]:
    te = ctx.test
    k = min(10, te["z"].shape[0] - 1)
    value = (metrics.retrieval_precision_at_k(te["z"], te["label"], k=k)
             if k >= 1 else float("nan"))
    return {"retrieval_precision_at_10": value}

  def describe(self, ctx):
    return {"features": "z of the test split", "similarity": "cosine",
            "k": 10, "query_excluded": True}
